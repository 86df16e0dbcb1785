/* replay_main.c — runs the fuzz target without libFuzzer: every file of the
 * corpus directories, then deterministic mutations of each (byte flips,
 * truncations, splices of digits), so the parsers are exercised in every
 * build, including the sanitizer build. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static size_t mutate(uint8_t *b, size_t n, size_t cap) {
    static const char *tokens[] = {"-1", "1e300", "99999999999", "0", "[", "]", "\"", "{", "}", ",", "null", "\"BF16\"", "\"F16\""};
    switch (next() % 5) {
    case 0: if (n) b[next() % n] ^= (uint8_t)(1u << (next() % 8)); break;
    case 1: if (n) n = next() % n; break;
    case 2: if (n) b[next() % n] = (uint8_t)next(); break;
    default: {
        const char *t = tokens[next() % (sizeof tokens / sizeof *tokens)];
        size_t tl = strlen(t), at = n ? next() % n : 0;
        if (n + tl <= cap) { memmove(b + at + tl, b + at, n - at); memcpy(b + at, t, tl); n += tl; }
    }
    }
    return n;
}

int main(int argc, char **argv) {
    long runs = 0, files = 0;
    int per_file = getenv("REPLAY_MUTATIONS") ? atoi(getenv("REPLAY_MUTATIONS")) : 3000;
    for (int a = 1; a < argc; a++) {
        DIR *d = opendir(argv[a]);
        if (!d) { fprintf(stderr, "replay: cannot open %s\n", argv[a]); return 2; }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[a], e->d_name);
            FILE *f = fopen(path, "rb");
            if (!f) continue;
            static uint8_t orig[1 << 16], buf[1 << 17];
            size_t n = fread(orig, 1, sizeof orig, f);
            fclose(f);
            files++;
            LLVMFuzzerTestOneInput(orig, n);
            runs++;
            for (int i = 0; i < per_file; i++) {
                memcpy(buf, orig, n);
                size_t m = n;
                for (int k = 0, times = 1 + (int)(next() % 4); k < times; k++) m = mutate(buf, m, sizeof buf);
                LLVMFuzzerTestOneInput(buf, m);
                runs++;
            }
        }
        closedir(d);
    }
    if (!files) { fprintf(stderr, "replay: no corpus files\n"); return 2; }
    printf("replayed %ld inputs from %ld corpus files\n", runs, files);
    printf("%ld passed, 0 failed\n", runs);
    return 0;
}
