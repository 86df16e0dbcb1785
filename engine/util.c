/* util.c — small shared helpers: error messages, file reading and mapping, UTF-8, a
 * string hash map. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int eng__fail(char *err, size_t errlen, int code, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

const char *eng_strerror(int code) {
    switch (code) {
    case ENG_OK: return "ok";
    case ENG_EIO: return "file missing or unreadable";
    case ENG_EFORMAT: return "malformed file";
    case ENG_EUNSUPPORTED: return "unsupported";
    case ENG_ENOMEM: return "out of memory";
    case ENG_EINVAL: return "invalid argument";
    case ENG_EEMPTY: return "empty prompt";
    case ENG_EMAXTOK: return "max_tokens must be positive";
    case ENG_ECONTEXT: return "context length exceeded";
    case ENG_ETOKEN: return "token id out of range";
    case ENG_EUTF8: return "text is not valid UTF-8";
    case ENG_ESAMPLING: return "sampling parameter out of range";
    case ENG_EQUEUE: return "queue full";
    case ENG_EPOOL: return "request cannot fit in the KV pool";
    case ENG_ENOTFOUND: return "not found";
    case ENG_EBUSY: return "agent busy";
    case ENG_EEXIST: return "agent exists";
    case ENG_ECORRUPT: return "corrupt agent data";
    case ENG_EMODEL: return "agent data from another model";
    default: return "unknown error";
    }
}

int eng__map_file(const char *path, uint8_t **map, size_t *size, char *err, size_t errlen) {
    *map = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return eng__fail(err, errlen, ENG_EIO, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return eng__fail(err, errlen, ENG_EIO, "%s: not a regular file", path);
    }
    if (sb.st_size) {
        void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            close(fd);
            return eng__fail(err, errlen, ENG_EIO, "%s: mmap: %s", path, strerror(errno));
        }
        *map = p;
        *size = (size_t)sb.st_size;
    }
    close(fd);
    return ENG_OK;
}

void eng__unmap_file(uint8_t *map, size_t size) {
    if (map && size) munmap(map, size);
}

int eng__read_file(const char *path, char **data, size_t *size, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) return eng__fail(err, errlen, ENG_EIO, "%s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t cap = 0, len = 0;
    for (;;) {
        if (cap - len < 65536) {
            size_t ncap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, ncap + 1);
            if (!nb) { free(buf); fclose(f); return eng__fail(err, errlen, ENG_ENOMEM, "%s: out of memory", path); }
            buf = nb; cap = ncap;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(buf); return eng__fail(err, errlen, ENG_EIO, "%s: read error", path); }
    buf[len] = 0;
    *data = buf;
    *size = len;
    return ENG_OK;
}

double eng__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int eng__utf8_seq(const unsigned char *s, size_t n) {
    if (n == 0) return 0;
    unsigned c = s[0];
    int need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    else if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return -1;
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) return 0;
        unsigned b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return -1;
    }
    return need + 1;
}

int eng__buf_add(eng__buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t nc = (b->n + n + 1) * 2;
        char *np = realloc(b->p, nc);
        if (!np) return ENG_ENOMEM;
        b->p = np;
        b->cap = nc;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return ENG_OK;
}

bool eng__utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        int k = eng__utf8_seq(p + i, n - i);
        if (k <= 0) return false;
        i += (size_t)k;
    }
    return true;
}

/* FNV-1a */
static uint64_t strhash(const char *k, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)k[i]; h *= 1099511628211ull; }
    return h;
}

int eng__strmap_init(eng__strmap *m, size_t expect) {
    size_t cap = 16;
    while (cap < expect * 2) cap <<= 1;
    m->keys = calloc(cap, sizeof *m->keys);
    m->klen = calloc(cap, sizeof *m->klen);
    m->vals = calloc(cap, sizeof *m->vals);
    m->cap = cap;
    m->count = 0;
    if (!m->keys || !m->klen || !m->vals) { eng__strmap_free(m); return ENG_ENOMEM; }
    return ENG_OK;
}

void eng__strmap_free(eng__strmap *m) {
    free(m->keys); free(m->klen); free(m->vals);
    memset(m, 0, sizeof *m);
}

static int strmap_grow(eng__strmap *m) {
    eng__strmap n;
    if (eng__strmap_init(&n, m->cap) != ENG_OK) return ENG_ENOMEM;
    for (size_t i = 0; i < m->cap; i++)
        if (m->keys[i]) eng__strmap_put(&n, m->keys[i], m->klen[i], m->vals[i]);
    eng__strmap_free(m);
    *m = n;
    return ENG_OK;
}

int eng__strmap_put(eng__strmap *m, const char *k, size_t klen, int32_t v) {
    if ((m->count + 1) * 2 > m->cap && strmap_grow(m) != ENG_OK) return ENG_ENOMEM;
    size_t mask = m->cap - 1, i = strhash(k, klen) & mask;
    while (m->keys[i]) {
        if (m->klen[i] == klen && memcmp(m->keys[i], k, klen) == 0) { m->vals[i] = v; return ENG_OK; }
        i = (i + 1) & mask;
    }
    m->keys[i] = k; m->klen[i] = (uint32_t)klen; m->vals[i] = v;
    m->count++;
    return ENG_OK;
}

int32_t eng__strmap_get(const eng__strmap *m, const char *k, size_t klen) {
    if (!m->cap) return -1;
    size_t mask = m->cap - 1, i = strhash(k, klen) & mask;
    while (m->keys[i]) {
        if (m->klen[i] == klen && memcmp(m->keys[i], k, klen) == 0) return m->vals[i];
        i = (i + 1) & mask;
    }
    return -1;
}

uint64_t eng__hash64(const void *p, size_t n, uint64_t seed) {
    const unsigned char *b = p;
    uint64_t h = seed ^ (n * 0x9e3779b97f4a7c15ull);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    for (; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 33);
}
