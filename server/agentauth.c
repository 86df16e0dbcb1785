/* agentauth.c — the HMAC-SHA256 tag of agent exports (see agentauth.h).
 * Pure functions over OpenSSL; any thread, no locks. */
#include "agentauth.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char DOMAIN[] = "kvserve agent export v1"; /* with its NUL: a prefix no blob can extend */

int srv__agent_key_init(srv_agent_key *k, const char *path, char *err, size_t errlen) {
    memset(k, 0, sizeof *k);
    if (!path) {
        k->len = 32;
        k->generated = 1;
        if (RAND_bytes(k->key, (int)k->len) != 1) {
            snprintf(err, errlen, "cannot make an export key: no randomness");
            return -1;
        }
        return 0;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "--export-key %s: %s", path, strerror(errno));
        return -1;
    }
    unsigned char extra;
    k->len = fread(k->key, 1, sizeof k->key, f);
    int longer = fread(&extra, 1, 1, f) == 1, bad = ferror(f);
    fclose(f);
    if (bad || longer || k->len < SRV_AGENT_KEY_MIN) {
        snprintf(err, errlen, "--export-key %s: %s", path,
                 bad ? "cannot read it" : longer ? "longer than 256 bytes" : "shorter than 32 bytes (make one with "
                                                                           "head -c 32 /dev/urandom)");
        OPENSSL_cleanse(k->key, sizeof k->key);
        return -1;
    }
    return 0;
}

/* HMAC(key, DOMAIN || fingerprint (LE) || tenant length (LE) || tenant || blob) */
static int tag_of(const srv_agent_key *k, uint64_t fp, const char *tenant, const uint8_t *blob, size_t n,
                  unsigned char out[SRV_AGENT_TAG]) {
    unsigned char fpb[8], tlb[4];
    size_t tl = strlen(tenant ? tenant : "");
    for (int i = 0; i < 8; i++) fpb[i] = (unsigned char)(fp >> (8 * i));
    for (int i = 0; i < 4; i++) tlb[i] = (unsigned char)(tl >> (8 * i));
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *h = mac ? EVP_MAC_CTX_new(mac) : NULL;
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0), OSSL_PARAM_construct_end()};
    size_t olen = 0;
    int ok = h && EVP_MAC_init(h, k->key, k->len, params) &&
             EVP_MAC_update(h, (const unsigned char *)DOMAIN, sizeof DOMAIN) && EVP_MAC_update(h, fpb, 8) &&
             EVP_MAC_update(h, tlb, 4) && EVP_MAC_update(h, (const unsigned char *)(tenant ? tenant : ""), tl) &&
             EVP_MAC_update(h, blob, n) && EVP_MAC_final(h, out, &olen, SRV_AGENT_TAG) && olen == SRV_AGENT_TAG;
    EVP_MAC_CTX_free(h);
    EVP_MAC_free(mac);
    return ok ? 0 : -1;
}

int srv__agent_seal(const srv_agent_key *k, uint64_t fingerprint, const char *tenant, uint8_t **buf, size_t *len) {
    uint8_t *nb = realloc(*buf, *len + SRV_AGENT_TAG);
    if (!nb) return -1;
    *buf = nb;
    if (tag_of(k, fingerprint, tenant, nb, *len, nb + *len)) return -1;
    *len += SRV_AGENT_TAG;
    return 0;
}

int srv__agent_verify(const srv_agent_key *k, uint64_t fingerprint, const char *tenant, const uint8_t *buf,
                      size_t len, size_t *blob_len) {
    unsigned char want[SRV_AGENT_TAG];
    if (len < SRV_AGENT_TAG || tag_of(k, fingerprint, tenant, buf, len - SRV_AGENT_TAG, want)) return -1;
    if (CRYPTO_memcmp(want, buf + len - SRV_AGENT_TAG, SRV_AGENT_TAG) != 0) return -1;
    *blob_len = len - SRV_AGENT_TAG;
    return 0;
}
