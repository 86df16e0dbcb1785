/* fuzz_gguf.c — libFuzzer target for GGUF files: the parser, the metadata
 * read as a model config and as a tokenizer (which then encodes a text),
 * and every tensor converted to F32. Any input must give ENG_OK or an error
 * code with a message, never a crash, a leak or undefined behaviour. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256];
    uint8_t *buf = malloc(size ? size : 1); /* a copy: reads past the end are caught by ASan */
    if (!buf) return 0;
    memcpy(buf, data, size);
    gguf_file g;
    if (gguf_parse(buf, size, "fuzz.gguf", &g, err, sizeof err) == ENG_OK) {
        eng_config c;
        eng__gguf_config(&g, "fuzz.gguf", &c, err, sizeof err);
        cJSON *tj = NULL;
        if (eng__gguf_tokenizer(&g, "fuzz.gguf", &tj, err, sizeof err) == ENG_OK) {
            eng_tok *t = NULL;
            if (eng__tok_from_json(&t, tj, "fuzz.gguf", err, sizeof err) == ENG_OK) {
                int32_t *ids = NULL;
                size_t n = 0;
                if (eng_tok_encode(t, "Hello, world! 123", 17, 1, &ids, &n) == ENG_OK) free(ids);
                eng_tok_close(t);
            }
            cJSON_Delete(tj);
        }
        char *tpl, *bos, *eos;
        if (eng__gguf_chat(&g, "fuzz.gguf", &tpl, &bos, &eos, err, sizeof err) == ENG_OK) {
            free(tpl);
            free(bos);
            free(eos);
        }
        float tmp[256];
        for (size_t i = 0; i < g.n_t; i++) { /* touch every tensor's bytes, a block at a time */
            const gguf_tensor *t = &g.t[i];
            size_t be, bb;
            gguf_block(t->type, &be, &bb);
            for (size_t k = 0; k < t->n_elems;) {
                size_t m = be > 1 ? be : t->n_elems - k < 256 ? t->n_elems - k : 256;
                gguf_to_f32(t->type, t->data + k / be * bb, tmp, m);
                k += m;
            }
        }
        gguf_free(&g);
    }
    free(buf);
    return 0;
}
