/* hash.c — SHA-256 (OpenSSL EVP) over length-prefixed fields, for cache keys. */
#include "kvc_internal.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

kvc__hash *kvc__hash_begin(const char *domain) {
    EVP_MD_CTX *h = EVP_MD_CTX_new();
    if (h && EVP_DigestInit_ex(h, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(h);
        return NULL;
    }
    if (h) kvc__hash_str(h, domain);
    return h;
}

void kvc__hash_bytes(kvc__hash *h, const void *d, size_t n) {
    uint64_t len = n;
    EVP_DigestUpdate(h, &len, sizeof len);
    EVP_DigestUpdate(h, d, n);
}

void kvc__hash_str(kvc__hash *h, const char *s) { kvc__hash_bytes(h, s ? s : "", s ? strlen(s) : 0); }
void kvc__hash_u64(kvc__hash *h, uint64_t v) { kvc__hash_bytes(h, &v, sizeof v); }

void kvc__hash_hex(kvc__hash *h, char *out, int nbytes) {
    unsigned char d[32] = {0};
    unsigned int n = 32;
    if (h) {
        EVP_DigestFinal_ex(h, d, &n);
        EVP_MD_CTX_free(h);
    }
    for (int i = 0; i < nbytes && i < 32; i++) snprintf(out + 2 * i, 3, "%02x", d[i]);
}
