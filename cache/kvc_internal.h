/* kvc_internal.h — shared between the cache sources (not installed). */
#ifndef KVSERVE_KVC_INTERNAL_H
#define KVSERVE_KVC_INTERNAL_H

#include "kvc.h"

#include <hiredis/hiredis.h>

/* Run one command (binary-safe arguments) on a pooled connection. NULL when
 * Redis failed, timed out, answered an error or the circuit is open (the
 * failure is counted). Free the reply with freeReplyObject. */
redisReply *kvc__command_argv(kvc_redis *r, int argc, const char **argv, const size_t *lens);

/* kvc__command_argv for a command whose reply does not matter: 0 if it
 * succeeded, -1 if not (tests and maintenance). */
int kvc__command_ok(kvc_redis *r, int argc, const char **argv, const size_t *lens);

/* n commands pipelined on one connection: out[i] is each reply, or NULL for
 * an error reply or a failed link. 0 when every command succeeded. */
typedef struct {
    int argc;
    const char **argv;
    const size_t *lens;
} kvc__cmd;
int kvc__pipeline(kvc_redis *r, size_t n, const kvc__cmd *cmds, redisReply **out);

/* out[i] = dot(m[i], q) for the n rows of the row-major n x dim matrix m
 * (cosine similarities when rows and q are normalised): big matrices in
 * slices on threads of their own. */
void kvc__dot_rows(const float *m, size_t n, size_t dim, const float *q, float *out);

/* SHA-256 over length-prefixed fields (no two inputs encode alike). */
typedef struct evp_md_ctx_st kvc__hash;
kvc__hash *kvc__hash_begin(const char *domain); /* NULL when out of memory */
void kvc__hash_bytes(kvc__hash *h, const void *d, size_t n);
void kvc__hash_str(kvc__hash *h, const char *s);
void kvc__hash_u64(kvc__hash *h, uint64_t v);
/* Finish and free h; write the first nbytes of the digest as hex (2*nbytes+1 chars). */
void kvc__hash_hex(kvc__hash *h, char *out, int nbytes);

#endif
