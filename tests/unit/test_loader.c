/* test_loader.c — safetensors and config.json parsing: every malformed input
 * is refused with a message naming the file and tensor, never a crash. */
#include "internal.h"
#include "test.h"

#include <math.h>

/* Build a safetensors image: 8-byte length, header, data of dsize bytes. */
static uint8_t *image(const char *header, size_t dsize, size_t *size) {
    size_t h = strlen(header);
    *size = 8 + h + dsize;
    uint8_t *b = calloc(1, *size);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)h >> (8 * i));
    memcpy(b + 8, header, h);
    for (size_t i = 0; i < dsize; i++) b[8 + h + i] = (uint8_t)i;
    return b;
}

static int parse(const char *header, size_t dsize, char *err, size_t errlen) {
    size_t n;
    uint8_t *b = image(header, dsize, &n);
    st_file f;
    int rc = st_parse(b, n, "x.safetensors", &f, err, errlen);
    if (rc == ENG_OK) st_free(&f);
    free(b);
    return rc;
}

static void test_valid_file(void) {
    size_t n;
    uint8_t *b = image("{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                       "\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]}}",
                       32, &n);
    st_file f;
    char err[256];
    CHECK(st_parse(b, n, "x", &f, err, sizeof err) == ENG_OK);
    CHECK(f.n == 2);
    const st_tensor *a = st_find(&f, "a"), *bb = st_find(&f, "b");
    CHECK(a && a->ndim == 2 && a->shape[0] == 2 && a->shape[1] == 3 && a->nbytes == 24 && a->dtype == ST_F32);
    CHECK(bb && bb->dtype == ST_BF16 && bb->nbytes == 8);
    CHECK(st_find(&f, "__metadata__") == NULL);
    st_free(&f);
    free(b);
}

static void test_bad_headers(void) {
    char err[256];
    struct { const char *hdr; size_t dsize; int code; const char *needle; } cases[] = {
        {"{\"a\":{\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, ENG_EUNSUPPORTED, "\"a\": dtype I8"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, ENG_EFORMAT, "truncated"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, ENG_EFORMAT, "need 12"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, ENG_EFORMAT, "\"a\""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],"
         "\"data_offsets\":[4,12]}}", 12, ENG_EFORMAT, "overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, ENG_EFORMAT, "bad shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1e15,1e15],\"data_offsets\":[0,8]}}", 8, ENG_EFORMAT, "\"a\""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, ENG_EFORMAT, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0.5,8.5]}}", 9, ENG_EFORMAT,
         "data_offsets must be two whole numbers (got [0.5, 8.5])"},
        {"{\"a\":[1,2]}", 0, ENG_EFORMAT, "not an object"},
        {"[1,2,3]", 0, ENG_EFORMAT, "not a JSON object"},
        {"{\"a\":{\"dtype\":\"F32\",", 0, ENG_EFORMAT, "not a JSON object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        err[0] = 0;
        int rc = parse(cases[i].hdr, cases[i].dsize, err, sizeof err);
        CHECK_MSG(rc == cases[i].code, "case %zu: rc %d, want %d (%s)", i, rc, cases[i].code, err);
        CHECK_MSG(strstr(err, cases[i].needle) && strstr(err, "x.safetensors"), "case %zu: message '%s' lacks '%s'", i,
                  err, cases[i].needle);
    }
    /* header length that lies */
    uint8_t b[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    st_file f;
    CHECK(st_parse(b, sizeof b, "x.safetensors", &f, err, sizeof err) == ENG_EFORMAT && strstr(err, "header length"));
    CHECK(st_parse(b, 5, "x.safetensors", &f, err, sizeof err) == ENG_EFORMAT && strstr(err, "truncated"));
}

static void test_dtype_conversion(void) {
    /* 1.0, -2.5, 65504 (max half), 2^-24 (smallest subnormal) */
    uint8_t f16[] = {0x00, 0x3c, 0x00, 0xc1, 0xff, 0x7b, 0x01, 0x00};
    float out[4];
    st_to_f32(ST_F16, f16, out, 4);
    CHECK(out[0] == 1.0f && out[1] == -2.5f && out[2] == 65504.0f && out[3] == ldexpf(1.0f, -24));
    uint8_t bf16[] = {0x80, 0x3f, 0x20, 0xc0}; /* 1.0, -2.5 */
    st_to_f32(ST_BF16, bf16, out, 2);
    CHECK(out[0] == 1.0f && out[1] == -2.5f);
}

static int cfg(const char *json, eng_config *c, char *err, size_t errlen) {
    return eng__config_parse(json, strlen(json), "config.json", c, err, errlen);
}

#define BASE "\"vocab_size\":100,\"hidden_size\":64,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
static void test_config(void) {
    eng_config c;
    char err[256];
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"num_key_value_heads\":2,\"eos_token_id\":[5,6],"
              "\"tie_word_embeddings\":true,\"rope_theta\":500000}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.head_dim == 16 && c.n_kv_heads == 2 && c.eos_id == 5 && c.bos_id == -1 && c.tie_embeddings);
    CHECK(c.n_eos == 2 && c.eos_ids[0] == 5 && c.eos_ids[1] == 6);
    /* generation_config.json adds its end-of-turn ids (duplicates once) */
    const char *gen = "{\"eos_token_id\": [6, 7, 9]}";
    CHECK(eng__config_generation(gen, strlen(gen), "generation_config.json", &c, err, sizeof err) == ENG_OK);
    CHECK(c.n_eos == 4 && c.eos_ids[2] == 7 && c.eos_ids[3] == 9 && c.eos_id == 5);
    gen = "{\"eos_token_id\": [100]}";
    CHECK(eng__config_generation(gen, strlen(gen), "generation_config.json", &c, err, sizeof err) == ENG_EFORMAT &&
          strstr(err, "generation_config.json") && strstr(err, "eos_token_id"));
    CHECK(c.rope_theta == 500000.0f && fabsf(c.rms_eps - 1e-6f) < 1e-12f && c.max_position == 2048);
    CHECK(!strcmp(c.model_type, "llama") && !c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm && !c.rope_scaling);
    /* the relatives' switches */
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen2\",\"sliding_window\":32768,"
              "\"use_sliding_window\":false}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen3\"}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.qk_norm && !c.qkv_bias);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"attention_bias\":true,\"mlp_bias\":true,\"rope_scaling\":{"
              "\"rope_type\":\"llama3\",\"factor\":8,\"original_max_position_embeddings\":8192}}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.qkv_bias && c.o_bias && c.mlp_bias && c.rope_scaling == ENG_ROPE_LLAMA3 && c.rope_factor == 8.0f &&
          c.rope_low_freq_factor == 1.0f && c.rope_high_freq_factor == 4.0f && c.rope_original_max == 8192);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"mistral\",\"sliding_window\":null}", &c, err,
              sizeof err) == ENG_OK);
    CHECK(c.sliding_window == 0 && c.n_sliding == 0);
    /* dynamic RoPE: the context grows by the factor past the trained one */
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"max_position_embeddings\":4096,\"rope_scaling\":{\"type\":\"dynamic\","
              "\"factor\":2}}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.rope_scaling == ENG_ROPE_DYNAMIC && c.rope_original_max == 4096 && c.max_position == 8192);
    /* sliding windows: every layer (mistral), from max_window_layers on (qwen), all but every
     * sliding_window_pattern-th (gemma3), or as layer_types lists them; none when the window
     * covers the context */
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"mistral\",\"sliding_window\":8}", &c, err,
              sizeof err) == ENG_OK);
    CHECK(c.sliding_window == 8 && c.n_sliding == 2 && c.layer_flags[0] == ENG_LAYER_SLIDING && c.layer_flags[1] == ENG_LAYER_SLIDING);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"mistral\",\"sliding_window\":4096,"
              "\"max_position_embeddings\":4096}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.sliding_window == 0 && c.n_sliding == 0);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen2\",\"use_sliding_window\":true,"
              "\"sliding_window\":8,\"max_window_layers\":1}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.sliding_window == 8 && c.n_sliding == 1 && !c.layer_flags[0] && c.layer_flags[1] == ENG_LAYER_SLIDING);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen2\",\"use_sliding_window\":false,"
              "\"sliding_window\":8,\"max_window_layers\":0}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.n_sliding == 0);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"gemma3_text\",\"sliding_window\":8,"
              "\"sliding_window_pattern\":2,\"query_pre_attn_scalar\":64,\"head_dim\":16}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.gemma && c.qk_norm && c.tie_embeddings && c.n_sliding == 1 && c.layer_flags[0] == ENG_LAYER_SLIDING &&
          !c.layer_flags[1] && c.rope_theta == 1e6f && c.rope_local_theta == 1e4f && c.attn_scale == 0.125f);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"gemma3_text\",\"sliding_window\":8,"
              "\"layer_types\":[\"full_attention\",\"sliding_attention\"]}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.n_sliding == 1 && !c.layer_flags[0] && c.layer_flags[1] == ENG_LAYER_SLIDING && c.head_dim == 256);
    /* mixtures of experts */
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen3_moe\",\"num_experts\":8,"
              "\"num_experts_per_tok\":2,\"moe_intermediate_size\":32,\"norm_topk_prob\":true,"
              "\"mlp_only_layers\":[0]}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.n_experts == 8 && c.n_experts_used == 2 && c.moe_intermediate_size == 32 && c.moe_norm_topk && c.qk_norm &&
          !c.layer_flags[0] && c.layer_flags[1] == ENG_LAYER_MOE);
    CHECK(cfg("{" BASE "\"intermediate_size\":128,\"model_type\":\"mixtral\",\"num_local_experts\":4,"
              "\"num_experts_per_tok\":2}", &c, err, sizeof err) == ENG_OK);
    CHECK(c.n_experts == 4 && c.moe_intermediate_size == 128 && c.moe_norm_topk && !c.qk_norm &&
          c.layer_flags[0] == ENG_LAYER_MOE && c.layer_flags[1] == ENG_LAYER_MOE);
    struct { const char *json; int code; const char *needle; } bad[] = {
        {"{" BASE "\"num_key_value_heads\":2}", ENG_EFORMAT, "intermediate_size"},
        {"{" BASE "\"intermediate_size\":128,\"num_key_value_heads\":3}", ENG_EFORMAT, "multiple"},
        {"{" BASE "\"intermediate_size\":-1}", ENG_EFORMAT, "intermediate_size"},
        {"{" BASE "\"intermediate_size\":1.5}", ENG_EFORMAT, "integer"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"gpt2\"}", ENG_EUNSUPPORTED, "gpt2"},
        {"{" BASE "\"intermediate_size\":128,\"rope_scaling\":{\"type\":\"llama3\"}}", ENG_EFORMAT, "positive factor"},
        {"{" BASE "\"intermediate_size\":128,\"rope_scaling\":{\"rope_type\":\"longrope\",\"factor\":2}}", ENG_EUNSUPPORTED,
         "rope_scaling type \"longrope\" is not supported"},
        {"{" BASE "\"intermediate_size\":128,\"rope_scaling\":{\"rope_type\":\"dynamic\",\"factor\":0.5}}", ENG_EFORMAT,
         "factor >= 1"},
        {"{" BASE "\"intermediate_size\":128,\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}}", ENG_EUNSUPPORTED,
         "\"yarn\""},
        {"{" BASE "\"intermediate_size\":128,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":4,"
         "\"high_freq_factor\":1}}", ENG_EFORMAT, "high_freq_factor > low_freq_factor"},
        {"{" BASE "\"intermediate_size\":128,\"eos_token_id\":100}", ENG_EFORMAT, "eos_token_id"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"mistral\",\"sliding_window\":8,"
         "\"layer_types\":[\"sliding_attention\"]}", ENG_EFORMAT, "layer_types must list num_hidden_layers (2)"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"mistral\",\"sliding_window\":8,"
         "\"layer_types\":[\"sliding_attention\",\"chunked_attention\"]}", ENG_EUNSUPPORTED,
         "layer_types[1] \"chunked_attention\" is not supported"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"gemma3\",\"text_config\":{}}", ENG_EUNSUPPORTED,
         "Gemma 3 with vision"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"gemma3_text\",\"hidden_activation\":\"gelu\"}",
         ENG_EUNSUPPORTED, "hidden_activation \"gelu\""},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen3_moe\",\"num_experts\":4,"
         "\"num_experts_per_tok\":5,\"moe_intermediate_size\":32}", ENG_EFORMAT, "num_experts_per_tok 5 exceeds"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen3_moe\",\"num_experts\":4,"
         "\"num_experts_per_tok\":2}", ENG_EFORMAT, "moe_intermediate_size"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"qwen3_moe\",\"num_experts\":4,"
         "\"num_experts_per_tok\":2,\"moe_intermediate_size\":32,\"mlp_only_layers\":[7]}", ENG_EFORMAT,
         "mlp_only_layers holds 7"},
        {"{" BASE "\"intermediate_size\":128,\"model_type\":\"mixtral\"}", ENG_EFORMAT, "num_local_experts"},
        {"not json", ENG_EFORMAT, "JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        int rc = cfg(bad[i].json, &c, err, sizeof err);
        CHECK_MSG(rc == bad[i].code && strstr(err, bad[i].needle) && strstr(err, "config.json"),
                  "case %zu: rc %d msg '%s'", i, rc, err);
    }
}

int main(int argc, char **argv) {
    static const test_case tests[] = {
        {"safetensors_valid_file", test_valid_file},
        {"safetensors_bad_headers_named_errors", test_bad_headers},
        {"safetensors_f16_bf16_conversion", test_dtype_conversion},
        {"config_fields_and_errors", test_config},
        {0, 0}};
    return run_tests(tests, argc, argv);
}
