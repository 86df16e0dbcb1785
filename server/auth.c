/* auth.c — bearer tokens and tenants, TLS credentials */
#include "internal.h"

/* The token file: one "TOKEN TENANT" per line (blank lines and lines starting
 * with # aside). Anything else refuses start-up with the line's number: more
 * or fewer fields, a token over 4096 bytes, a tenant over 255 bytes or not
 * UTF-8, a token given twice. Nothing is cut to fit. */
int srv__load_tokens(srv *s, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvserve: token file %s: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    int lineno = 0;
    const char *why = NULL;
    while (!why && (got = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (memchr(line, 0, (size_t)got)) { why = "a NUL byte"; break; }
        char *save = NULL, *tok = strtok_r(line, " \t\r\n", &save);
        if (!tok || tok[0] == '#') continue;
        char *ten = strtok_r(NULL, " \t\r\n", &save), *more = strtok_r(NULL, " \t\r\n", &save);
        if (!ten || more) why = "expected \"TOKEN TENANT\"";
        else if (strlen(tok) > 4096) why = "the token is longer than 4096 bytes";
        else if (strlen(ten) > 255) why = "the tenant is longer than 255 bytes";
        else if (*srv__utf8_problem((const uint8_t *)ten, strlen(ten))) why = "the tenant is not valid UTF-8";
        if (why) break;
        token_ent *nt = realloc(s->tokens, (size_t)(s->n_tokens + 1) * sizeof *nt);
        if (!nt) { why = "out of memory"; break; }
        s->tokens = nt;
        token_ent *t = &s->tokens[s->n_tokens];
        SHA256((const unsigned char *)tok, strlen(tok), t->hash);
        snprintf(t->tenant, sizeof t->tenant, "%s", ten);
        t->line = lineno;
        for (int k = 0; k < s->n_tokens && !why; k++)
            if (!memcmp(s->tokens[k].hash, t->hash, sizeof t->hash)) {
                fprintf(stderr, "kvserve: token file %s:%d: the token of line %d again\n", path, lineno,
                        s->tokens[k].line);
                why = ""; /* said */
            }
        s->n_tokens++;
    }
    free(line);
    if (!why && ferror(f)) why = strerror(errno);
    fclose(f);
    if (why && *why) fprintf(stderr, "kvserve: token file %s:%d: %s\n", path, lineno, why);
    if (why) return -1;
    if (!s->n_tokens) {
        fprintf(stderr, "kvserve: token file %s holds no tokens\n", path);
        return -1;
    }
    return 0;
}

/* Tenant of the call's bearer token (constant-time comparison of digests);
 * 0 when allowed. Without a token file every caller is tenant "". */
int srv__authenticate(call *c) {
    srv *s = c->s;
    c->tenant[0] = 0;
    if (!s->n_tokens) return 0;
    for (size_t i = 0; i < c->md.count; i++) {
        if (grpc_slice_str_cmp(c->md.metadata[i].key, "authorization")) continue;
        const grpc_slice v = c->md.metadata[i].value;
        size_t n = GRPC_SLICE_LENGTH(v);
        const char *p = (const char *)GRPC_SLICE_START_PTR(v);
        if (n < 7 || strncasecmp(p, "Bearer ", 7)) return -1;
        unsigned char h[SHA256_DIGEST_LENGTH];
        SHA256((const unsigned char *)p + 7, n - 7, h);
        int found = -1;
        for (int k = 0; k < s->n_tokens; k++)
            if (CRYPTO_memcmp(h, s->tokens[k].hash, sizeof h) == 0) found = k;
        if (found < 0) return -1;
        snprintf(c->tenant, sizeof c->tenant, "%s", s->tokens[found].tenant);
        return 0;
    }
    return -1;
}

/* ---- start-up and shutdown -------------------------------------------------------------- */
static char *read_pem(const char *path, const char *what, int key) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvserve: %s %s: %s\n", what, path, strerror(errno));
        return NULL;
    }
    /* check that it parses as PEM before handing it to gRPC */
    void *obj = key ? (void *)PEM_read_PrivateKey(f, NULL, NULL, NULL) : (void *)PEM_read_X509(f, NULL, NULL, NULL);
    if (!obj) {
        fprintf(stderr, "kvserve: %s %s: not a valid PEM %s\n", what, path, key ? "private key" : "certificate");
        fclose(f);
        return NULL;
    }
    if (key) EVP_PKEY_free(obj); else X509_free(obj);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

grpc_server_credentials *srv__make_creds(const srv_config *c) {
    if (!c->tls_cert && !c->tls_key) return grpc_insecure_server_credentials_create();
    if (!c->tls_cert || !c->tls_key) {
        fprintf(stderr, "kvserve: TLS needs both --tls-cert and --tls-key\n");
        return NULL;
    }
    char *cert = read_pem(c->tls_cert, "--tls-cert", 0), *key = cert ? read_pem(c->tls_key, "--tls-key", 1) : NULL;
    char *ca = key && c->tls_client_ca ? read_pem(c->tls_client_ca, "--tls-client-ca", 0) : NULL;
    grpc_server_credentials *cr = NULL;
    if (cert && key) { /* the key must belong to the certificate */
        BIO *bc = BIO_new_mem_buf(cert, -1), *bk = BIO_new_mem_buf(key, -1);
        X509 *x = PEM_read_bio_X509(bc, NULL, NULL, NULL);
        EVP_PKEY *k = PEM_read_bio_PrivateKey(bk, NULL, NULL, NULL);
        int match = x && k && X509_check_private_key(x, k) == 1;
        X509_free(x);
        EVP_PKEY_free(k);
        BIO_free(bc);
        BIO_free(bk);
        if (!match) {
            fprintf(stderr, "kvserve: --tls-key %s does not match --tls-cert %s\n", c->tls_key, c->tls_cert);
            free(cert);
            free(key);
            free(ca);
            return NULL;
        }
    }
    if (cert && key && (!c->tls_client_ca || ca)) {
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        cr = grpc_ssl_server_credentials_create_ex(
            ca, &pair, 1, ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    }
    free(cert);
    free(key);
    free(ca);
    return cr;
}
