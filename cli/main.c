/* main.c — the kvserve command line: generate, score, tokenize, logits, chat-template. */
#include "eng.h"
#include "srv.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <sys/stat.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

static const char USAGE[] =
    "usage: kvserve COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  serve    --model MODEL [server options]          run the gRPC service (see docs/operations.md)\n"
    "  generate --model MODEL [sampling options] PROMPT stream a generation to stdout\n"
    "  score    --model MODEL TEXT                      per-token log-probabilities and perplexity\n"
    "  tokenize (--tokenizer FILE | --model MODEL)      token ids of stdin (or --decode ids)\n"
    "  logits   --model MODEL --ids \"1 2 3\" --out FILE  raw float32 logits for every position\n"
    "  chat-template MODEL|TOKENIZER_CONFIG [--json]    render the chat template for the JSON context on stdin\n"
    "\n"
    "model options:\n"
    "  --model MODEL        a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)\n"
    "                       or a GGUF file (llama, qwen2, qwen3; F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K)\n"
    "  --threads N          compute threads (default: all CPUs)\n"
    "  --ctx N              context length cap (default: the model's)\n"
    "  --batch N            tokens per forward pass during prefill (default 512)\n"
    "  --weights f32|bf16|q8_0|q4_k  what the weight matrices are kept in (default: f32; a GGUF\n"
    "                       file's own Q8_0, or Q4_K/Q6_K, blocks); bf16 halves the bytes read per\n"
    "                       token, q8_0 quarters them (8-bit blocks of 32), q4_k is ggml's 4-bit\n"
    "                       K-quant (see docs/engine.md and docs/performance.md)\n"
    "  --kv f32|f16         precision of the KV cache (default f32; f16 halves its memory)\n"
    "\n"
    "generation options:\n"
    "  -n, --max-tokens N   tokens to generate (default 64)\n"
    "  --temperature T      0 = greedy (default 0)\n"
    "  --top-k K            keep the K most likely tokens (0 = off)\n"
    "  --top-p P            nucleus sampling (1 = off)\n"
    "  --min-p P            drop tokens below P x the top probability (0 = off)\n"
    "  --repeat-penalty R   penalise tokens already seen (1 = off)\n"
    "  --repeat-last-n N    window of the penalty (0 = whole history)\n"
    "  --seed S             sampling seed (default 0)\n"
    "  --stop STR           stop string, repeatable (not included in the output)\n"
    "  --ignore-eos         keep generating past the end-of-sequence token\n"
    "  --ids \"1 2 3\"        prompt as token ids instead of text\n"
    "  --no-special         do not add the tokenizer's BOS to a text prompt\n"
    "  --print-ids          print generated token ids instead of text\n"
    "\n"
    "server options: kvserve serve --help (each also as a KVSERVE_* variable; docs/operations.md)\n"
    "\n"
    "tokenize options:\n"
    "  --decode             read ids from stdin, write the decoded bytes\n"
    "  --special            add the post-processor's BOS when encoding\n"
    "  --json               batch mode: stdin is a JSON array of strings (or, with --decode,\n"
    "                       of id arrays); stdout the JSON array of results\n"
    "\n"
    "chat-template: stdin is {\"messages\": [...], \"add_generation_prompt\": true, ...}; stdout the text,\n"
    "  or with --json {\"text\": ...} / {\"error\": ...}. bos_token and eos_token come from the config.\n";

enum {
    O_MODEL = 256, O_THREADS, O_CTX, O_BATCH, O_TEMP, O_TOPK, O_TOPP, O_MINP, O_RPEN, O_RLAST, O_SEED, O_STOP,
    O_IGNORE_EOS, O_IDS, O_PRINT_IDS, O_NO_SPECIAL, O_TOKENIZER, O_DECODE, O_SPECIAL, O_OUT, O_HELP, O_JSON,
    O_WEIGHTS, O_KV
};

static const struct option LONGOPTS[] = {
    {"model", required_argument, 0, O_MODEL},       {"threads", required_argument, 0, O_THREADS},
    {"ctx", required_argument, 0, O_CTX},           {"batch", required_argument, 0, O_BATCH},
    {"weights", required_argument, 0, O_WEIGHTS},   {"kv", required_argument, 0, O_KV},
    {"max-tokens", required_argument, 0, 'n'},      {"temperature", required_argument, 0, O_TEMP},
    {"top-k", required_argument, 0, O_TOPK},        {"top-p", required_argument, 0, O_TOPP},
    {"min-p", required_argument, 0, O_MINP},        {"repeat-penalty", required_argument, 0, O_RPEN},
    {"repeat-last-n", required_argument, 0, O_RLAST}, {"seed", required_argument, 0, O_SEED},
    {"stop", required_argument, 0, O_STOP},         {"ignore-eos", no_argument, 0, O_IGNORE_EOS},
    {"ids", required_argument, 0, O_IDS},           {"print-ids", no_argument, 0, O_PRINT_IDS},
    {"no-special", no_argument, 0, O_NO_SPECIAL},   {"tokenizer", required_argument, 0, O_TOKENIZER},
    {"decode", no_argument, 0, O_DECODE},           {"special", no_argument, 0, O_SPECIAL},
    {"out", required_argument, 0, O_OUT},           {"help", no_argument, 0, O_HELP},
    {"json", no_argument, 0, O_JSON},
    {0, 0, 0, 0}};

typedef struct {
    const char *model, *tokenizer, *ids, *out;
    eng_options eo;
    eng_gen_params gp;
    const char *stop[64];
    int print_ids, no_special, decode, special, json;
} cli;

/* "f32" -> 0, `low` -> 1; anything else is an error naming the flag. */
static int parse_precision(const char *s, const char *low, const char *flag, int *out) {
    if (strcmp(s, "f32") && strcmp(s, low)) {
        fprintf(stderr, "kvserve: %s: f32 or %s (got \"%s\")\n", flag, low, s);
        return -1;
    }
    *out = !strcmp(s, low);
    return 0;
}

static int parse_num(const char *s, double lo, double hi, double *v, const char *flag) {
    char *end;
    errno = 0;
    *v = strtod(s, &end);
    if (errno || end == s || *end || *v < lo || *v > hi) {
        fprintf(stderr, "kvserve: %s: invalid value '%s' (expected a number in [%g, %g])\n", flag, s, lo, hi);
        return -1;
    }
    return 0;
}

/* Parse "1 2 3" or "1,2,3" into a malloc'd array. */
static int parse_ids(const char *s, int32_t **ids, size_t *n) {
    size_t cap = 16, k = 0;
    int32_t *v = malloc(cap * sizeof *v);
    if (!v) return -1;
    while (*s) {
        while (*s == ' ' || *s == ',' || *s == '\n' || *s == '\t') s++;
        if (!*s) break;
        char *end;
        errno = 0;
        long x = strtol(s, &end, 10);
        if (errno || end == s || x < 0 || x > INT32_MAX) {
            fprintf(stderr, "kvserve: bad token id near '%.20s'\n", s);
            free(v);
            return -1;
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (cap *= 2) * sizeof *v);
            if (!nv) { free(v); return -1; }
            v = nv;
        }
        v[k++] = (int32_t)x;
        s = end;
    }
    *ids = v;
    *n = k;
    return 0;
}

static int parse_args(int argc, char **argv, cli *c) {
    memset(c, 0, sizeof *c);
    eng_sampling_default(&c->gp.sampling);
    c->gp.max_tokens = 64;
    c->gp.stop = c->stop;
    int o;
    double v;
    optind = 2;
    while ((o = getopt_long(argc, argv, "n:h", LONGOPTS, NULL)) != -1) {
        switch (o) {
        case O_MODEL: c->model = optarg; break;
        case O_TOKENIZER: c->tokenizer = optarg; break;
        case O_IDS: c->ids = optarg; break;
        case O_OUT: c->out = optarg; break;
        case O_THREADS: if (parse_num(optarg, 1, 256, &v, "--threads")) return -1; c->eo.n_threads = (int)v; break;
        case O_CTX: if (parse_num(optarg, 1, 1 << 24, &v, "--ctx")) return -1; c->eo.max_context = (int)v; break;
        case O_BATCH: if (parse_num(optarg, 1, 65536, &v, "--batch")) return -1; c->eo.max_batch_tokens = (int)v; break;
        case O_WEIGHTS:
            if (!strcmp(optarg, "f32")) c->eo.weights = ENG_WEIGHTS_F32;
            else if (!strcmp(optarg, "bf16")) c->eo.weights = ENG_WEIGHTS_BF16;
            else if (!strcmp(optarg, "q8_0")) c->eo.weights = ENG_WEIGHTS_Q8_0;
            else if (!strcmp(optarg, "q4_k")) c->eo.weights = ENG_WEIGHTS_Q4_K;
            else {
                fprintf(stderr, "kvserve: --weights: f32, bf16, q8_0 or q4_k (got \"%s\")\n", optarg);
                return -1;
            }
            break;
        case O_KV: if (parse_precision(optarg, "f16", "--kv", &c->eo.kv_f16)) return -1; break;
        case 'n': if (parse_num(optarg, -1e9, 1e9, &v, "--max-tokens")) return -1; c->gp.max_tokens = (int)v; break;
        case O_TEMP: if (parse_num(optarg, -1e9, 1e9, &v, "--temperature")) return -1; c->gp.sampling.temperature = (float)v; break;
        case O_TOPK: if (parse_num(optarg, -1e9, 1e9, &v, "--top-k")) return -1; c->gp.sampling.top_k = (int)v; break;
        case O_TOPP: if (parse_num(optarg, -1e9, 1e9, &v, "--top-p")) return -1; c->gp.sampling.top_p = (float)v; break;
        case O_MINP: if (parse_num(optarg, -1e9, 1e9, &v, "--min-p")) return -1; c->gp.sampling.min_p = (float)v; break;
        case O_RPEN: if (parse_num(optarg, -1e9, 1e9, &v, "--repeat-penalty")) return -1; c->gp.sampling.repeat_penalty = (float)v; break;
        case O_RLAST: if (parse_num(optarg, -1e9, 1e9, &v, "--repeat-last-n")) return -1; c->gp.sampling.repeat_last_n = (int)v; break;
        case O_SEED: if (parse_num(optarg, 0, 1.8e19, &v, "--seed")) return -1; c->gp.sampling.seed = (uint64_t)v; break;
        case O_STOP:
            if (c->gp.n_stop == 64) { fprintf(stderr, "kvserve: at most 64 --stop strings\n"); return -1; }
            c->stop[c->gp.n_stop++] = optarg;
            break;
        case O_IGNORE_EOS: c->gp.ignore_eos = 1; break;
        case O_PRINT_IDS: c->print_ids = 1; break;
        case O_NO_SPECIAL: c->no_special = 1; break;
        case O_DECODE: c->decode = 1; break;
        case O_SPECIAL: c->special = 1; break;
        case O_JSON: c->json = 1; break;
        case 'h': case O_HELP: fputs(USAGE, stdout); exit(0);
        default: fputs("kvserve: see kvserve --help\n", stderr); return -1;
        }
    }
    return 0;
}

static eng_model *open_model(const cli *c) {
    if (!c->model) { fprintf(stderr, "kvserve: --model DIR is required\n"); return NULL; }
    eng_model *m;
    char err[512];
    if (eng_model_open(&m, c->model, &c->eo, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "kvserve: %s\n", err);
        return NULL;
    }
    if (eng_model_warning(m)) fprintf(stderr, "kvserve: warning: %s\n", eng_model_warning(m));
    return m;
}

/* Prompt ids from --ids or the positional text. */
static int prompt_ids(const cli *c, eng_model *m, int argc, char **argv, int32_t **ids, size_t *n) {
    if (c->ids) return parse_ids(c->ids, ids, n);
    if (optind >= argc) { fprintf(stderr, "kvserve: give a prompt (text argument or --ids)\n"); return -1; }
    const char *text = argv[optind];
    int rc = eng_tok_encode(eng_model_tok(m), text, strlen(text), !c->no_special, ids, n);
    if (rc) { fprintf(stderr, "kvserve: prompt: %s\n", eng_strerror(rc)); return -1; }
    return 0;
}

static int print_token(void *ud, int32_t token, const char *text, size_t len) {
    const cli *c = ud;
    if (c->print_ids) return 0;
    (void)token;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

static int cmd_generate(int argc, char **argv) {
    cli c;
    if (parse_args(argc, argv, &c)) return 2;
    eng_model *m = open_model(&c);
    if (!m) return 1;
    int32_t *ids = NULL;
    size_t n = 0;
    int ret = 1;
    if (prompt_ids(&c, m, argc, argv, &ids, &n)) goto out;
    eng_gen_result r;
    char err[512];
    if (eng_generate(m, ids, n, &c.gp, print_token, &c, &r, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "kvserve: %s\n", err);
        goto out;
    }
    if (c.print_ids)
        for (int i = 0; i < r.generated_tokens; i++) printf("%s%d", i ? " " : "", r.tokens[i]);
    printf("\n");
    fflush(stdout);
    double dec_tps = r.generated_tokens > 1 ? (r.generated_tokens - 1) / r.decode_seconds : 0;
    fprintf(stderr, "\n[prompt %d tokens, %.1f t/s | generated %d tokens, %.1f t/s | finish: %s]\n", r.prompt_tokens,
            r.prompt_tokens / r.prefill_seconds, r.generated_tokens, dec_tps, eng_finish_name(r.finish));
    eng_gen_result_free(&r);
    ret = 0;
out:
    free(ids);
    eng_model_close(m);
    return ret;
}

static int cmd_score(int argc, char **argv) {
    cli c;
    if (parse_args(argc, argv, &c)) return 2;
    eng_model *m = open_model(&c);
    if (!m) return 1;
    int32_t *ids = NULL;
    size_t n = 0;
    double *lp = NULL, ppl;
    int ret = 1;
    char err[512];
    if (prompt_ids(&c, m, argc, argv, &ids, &n)) goto out;
    lp = malloc((n ? n : 1) * sizeof *lp);
    if (!lp || eng_score(m, ids, n, lp, &ppl, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "kvserve: %s\n", lp ? err : "out of memory");
        goto out;
    }
    double sum = 0;
    printf("%5s %8s %12s  %s\n", "pos", "id", "logprob", "token");
    for (size_t i = 1; i < n; i++) {
        size_t pl;
        const char *p = eng_tok_piece(eng_model_tok(m), ids[i], &pl);
        printf("%5zu %8d %12.6f  ", i, ids[i], lp[i - 1]);
        for (size_t k = 0; k < pl; k++) {
            unsigned char ch = (unsigned char)p[k];
            if (ch < 0x20) printf("\\x%02x", ch); else putchar(ch);
        }
        putchar('\n');
        sum += lp[i - 1];
    }
    printf("tokens %zu  mean logprob %.6f  perplexity %.4f\n", n - 1, sum / (double)(n - 1), ppl);
    ret = 0;
out:
    free(lp);
    free(ids);
    eng_model_close(m);
    return ret;
}

static char *read_stdin(size_t *len) {
    size_t cap = 4096, n = 0;
    char *b = malloc(cap + 1);
    size_t r;
    while (b && (r = fread(b + n, 1, cap - n, stdin)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(b, (cap *= 2) + 1);
            if (!nb) { free(b); return NULL; }
            b = nb;
        }
    }
    if (b) b[n] = 0;
    *len = n;
    return b;
}

/* Batch mode for tests and tools: one process, many texts. */
/* Does the JSON text hold the escape \u0000 inside a string? cJSON's strings
 * are C strings, so such a string would be cut there. */
static int json_has_nul_escape(const char *in, size_t len) {
    for (size_t i = 0; i + 5 < len; i++) {
        if (in[i] != '\\') continue;
        if (in[i + 1] == 'u' && !strncmp(in + i + 2, "0000", 4)) return 1;
        i++; /* the escaped character (possibly a backslash) */
    }
    return 0;
}

/* Write bytes as a JSON string: invalid UTF-8 as U+FFFD (one per bad byte,
 * as the streaming detokenizer does), control characters and NUL escaped. */
static void put_json_string(FILE *o, const char *s, size_t n) {
    putc('"', o);
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0 || cp < 0) { fputs("\xEF\xBF\xBD", o); i++; continue; }
        if (cp == '"' || cp == '\\') fprintf(o, "\\%c", (char)cp);
        else if (cp < 0x20) fprintf(o, "\\u%04x", (unsigned)cp);
        else fwrite(s + i, 1, (size_t)k, o);
        i += (size_t)k;
    }
    putc('"', o);
}

static int tokenize_json(const eng_tok *t, const cli *c, const char *in, size_t len) {
    if (!c->decode && json_has_nul_escape(in, len)) {
        fprintf(stderr, "kvserve: --json: a string holds U+0000 (\\u0000), which this tool cannot pass on\n");
        return 1;
    }
    cJSON *arr = cJSON_ParseWithLength(in, len), *res = cJSON_CreateArray(), *it;
    int ret = 1, first = 1;
    if (!cJSON_IsArray(arr)) { fprintf(stderr, "kvserve: --json: stdin is not a JSON array\n"); goto out; }
    if (c->decode) putchar('[');
    cJSON_ArrayForEach(it, arr) {
        if (c->decode) { /* decoded text may hold any bytes: written by hand, not through cJSON's C strings */
            int n = cJSON_GetArraySize(it), k = 0;
            int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
            if (!ids) goto out;
            const cJSON *x;
            cJSON_ArrayForEach(x, it) ids[k++] = cJSON_IsNumber(x) ? (int32_t)x->valuedouble : -1;
            char *text;
            size_t tl;
            int rc = eng_tok_decode(t, ids, (size_t)n, 0, &text, &tl);
            free(ids);
            if (rc) { fprintf(stderr, "kvserve: %s\n", eng_strerror(rc)); goto out; }
            if (!first) putchar(',');
            first = 0;
            put_json_string(stdout, text, tl);
            free(text);
        } else {
            if (!cJSON_IsString(it)) { fprintf(stderr, "kvserve: --json: expected strings\n"); goto out; }
            int32_t *ids;
            size_t n;
            int rc = eng_tok_encode(t, it->valuestring, strlen(it->valuestring), c->special, &ids, &n);
            if (rc) { fprintf(stderr, "kvserve: %s\n", eng_strerror(rc)); goto out; }
            cJSON *r = cJSON_CreateArray();
            for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(r, cJSON_CreateNumber(ids[i]));
            free(ids);
            cJSON_AddItemToArray(res, r);
        }
    }
    if (c->decode) {
        puts("]");
        ret = 0;
    } else {
        char *o = cJSON_PrintUnformatted(res);
        if (o) { fputs(o, stdout); putchar('\n'); free(o); ret = 0; }
    }
out:
    cJSON_Delete(arr);
    cJSON_Delete(res);
    return ret;
}

static int cmd_tokenize(int argc, char **argv) {
    cli c;
    if (parse_args(argc, argv, &c)) return 2;
    char err[512], path[4096];
    if (!c.tokenizer && !c.model) { fprintf(stderr, "kvserve: --tokenizer FILE or --model DIR is required\n"); return 2; }
    struct stat sb;
    const char *dir = c.tokenizer && stat(c.tokenizer, &sb) == 0 && S_ISDIR(sb.st_mode) ? c.tokenizer : c.model;
    if (dir && !c.tokenizer && !(stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode))) { /* --model FILE.gguf */
        c.tokenizer = dir;
        dir = NULL;
    }
    if (dir) snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    eng_tok *t;
    if (eng_tok_open(&t, dir ? path : c.tokenizer, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "kvserve: %s\n", err);
        return 1;
    }
    size_t len;
    char *in = read_stdin(&len);
    int ret = 1;
    if (!in) { fprintf(stderr, "kvserve: cannot read stdin\n"); goto out; }
    if (c.json) {
        ret = tokenize_json(t, &c, in, len);
        goto out;
    }
    if (c.decode) {
        int32_t *ids;
        size_t n;
        char *text;
        size_t tl;
        if (parse_ids(in, &ids, &n)) goto out;
        int rc = eng_tok_decode(t, ids, n, 0, &text, &tl);
        free(ids);
        if (rc) { fprintf(stderr, "kvserve: %s\n", eng_strerror(rc)); goto out; }
        fwrite(text, 1, tl, stdout);
        free(text);
    } else {
        int32_t *ids;
        size_t n;
        int rc = eng_tok_encode(t, in, len, c.special, &ids, &n);
        if (rc) { fprintf(stderr, "kvserve: %s\n", eng_strerror(rc)); goto out; }
        for (size_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
        printf("\n");
        free(ids);
    }
    ret = 0;
out:
    free(in);
    eng_tok_close(t);
    return ret;
}

/* The rendered text, or with --json {"text": ...} / {"error": ...}; exit 1 on an error either way. */
static int cmd_chat_template(int argc, char **argv) {
    cli c;
    if (parse_args(argc, argv, &c)) return 2;
    const char *path = optind < argc ? argv[optind] : c.model;
    if (!path) { fprintf(stderr, "kvserve: chat-template needs a model directory or a tokenizer_config.json\n"); return 2; }
    char err[512];
    eng_chat *chat;
    int rc = eng_chat_open(&chat, path, err, sizeof err);
    size_t len = 0, tl = 0;
    char *in = rc ? NULL : read_stdin(&len), *text = NULL;
    if (!rc && !in) { rc = ENG_EIO; snprintf(err, sizeof err, "cannot read stdin"); }
    if (!rc) rc = eng_chat_render_json(chat, in, len, &text, &tl, err, sizeof err);
    if (c.json) {
        fputs(rc ? "{\"error\":" : "{\"text\":", stdout);
        put_json_string(stdout, rc ? err : text, rc ? strlen(err) : tl);
        puts("}");
    } else if (rc) {
        fprintf(stderr, "kvserve: chat template: %s\n", err);
    } else {
        fwrite(text, 1, tl, stdout);
    }
    free(text);
    free(in);
    eng_chat_close(chat);
    return rc ? 1 : 0;
}

static int cmd_logits(int argc, char **argv) {
    cli c;
    if (parse_args(argc, argv, &c)) return 2;
    if (!c.ids || !c.out) { fprintf(stderr, "kvserve: logits needs --ids and --out\n"); return 2; }
    eng_model *m = open_model(&c);
    if (!m) return 1;
    int32_t *ids = NULL;
    size_t n = 0;
    float *lg = NULL;
    int ret = 1;
    char err[512];
    if (parse_ids(c.ids, &ids, &n)) goto out;
    size_t V = (size_t)eng_model_config(m)->vocab_size;
    lg = malloc((n ? n : 1) * V * sizeof *lg);
    if (!lg || eng_logits(m, ids, n, lg, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "kvserve: %s\n", lg ? err : "out of memory");
        goto out;
    }
    FILE *f = fopen(c.out, "wb");
    if (!f || fwrite(lg, sizeof *lg, n * V, f) != n * V || fclose(f) != 0) {
        fprintf(stderr, "kvserve: %s: %s\n", c.out, strerror(errno));
        goto out;
    }
    ret = 0;
out:
    free(lg);
    free(ids);
    eng_model_close(m);
    return ret;
}

static int cmd_serve(int argc, char **argv) {
    srv_config c;
    char err[320];
    int rc = srv_config_load(&c, argc - 2, argv + 2, err, sizeof err);
    if (rc == 1) {
        printf("usage: kvserve serve [options]: each option also as its KVSERVE_* variable (the flag wins)\n\n");
        srv_config_usage(stdout);
        return 0;
    }
    if (rc) {
        fprintf(stderr, "kvserve: %s\n", err);
        return 2;
    }
    return srv_run(&c);
}

int main(int argc, char **argv) {
    eng_blas_select(argv); /* AVX-512 BLAS kernels where OpenBLAS would not pick them */
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(USAGE, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "serve")) return cmd_serve(argc, argv);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc, argv);
    if (!strcmp(cmd, "score")) return cmd_score(argc, argv);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc, argv);
    if (!strcmp(cmd, "logits")) return cmd_logits(argc, argv);
    if (!strcmp(cmd, "chat-template")) return cmd_chat_template(argc, argv);
    fprintf(stderr, "kvserve: unknown command '%s' (see kvserve --help)\n", cmd);
    return 2;
}
