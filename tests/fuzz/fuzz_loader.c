/* fuzz_loader.c — libFuzzer target for the model-file parsers. The first
 * byte picks the parser: even -> safetensors image, odd -> config.json. Any
 * input must give ENG_OK or an error code with a message, never a crash,
 * a leak or undefined behaviour. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    char err[256];
    /* copy so that reads past the end are caught by ASan */
    uint8_t *buf = malloc(size - 1 ? size - 1 : 1);
    if (!buf) return 0;
    memcpy(buf, data + 1, size - 1);
    if (data[0] % 2 == 0) {
        st_file f;
        if (st_parse(buf, size - 1, "fuzz.safetensors", &f, err, sizeof err) == ENG_OK) {
            float tmp[16];
            for (int i = 0; i < f.n; i++) { /* touch every tensor's bytes */
                size_t es = f.t[i].dtype == ST_F32 ? 4 : 2, n = f.t[i].nbytes / es;
                for (size_t k = 0; k < n; k += 16) st_to_f32(f.t[i].dtype, f.t[i].data + k * es, tmp, n - k < 16 ? n - k : 16);
            }
            st_free(&f);
        }
    } else {
        eng_config c;
        eng__config_parse((const char *)buf, size - 1, "fuzz/config.json", &c, err, sizeof err);
    }
    free(buf);
    return 0;
}
