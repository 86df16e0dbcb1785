/* internal.h — engine internals shared between the engine sources (not installed).
 * Internal non-static names use the eng__ / st_ / kv_ / fwd_ prefixes. */
#ifndef KVSERVE_ENG_INTERNAL_H
#define KVSERVE_ENG_INTERNAL_H

#include "eng.h"
#include <stdarg.h>
#include <stdbool.h>

/* ---- invariants ---------------------------------------------------------- */
/* ENG_CHECK(x): an invariant (reference counts, free lists, sequence states),
 * checked in debug and sanitizer builds (KVSERVE_CHECKS), free elsewhere. */
#ifdef KVSERVE_CHECKS
#include <assert.h>
#define ENG_CHECK(x) assert(x)
#else
#define ENG_CHECK(x) ((void)0)
#endif

/* ---- errors ------------------------------------------------------------ */
/* Write a formatted message to err (if err) and return code. */
int eng__fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Read a whole file into a malloc'd NUL-terminated buffer. */
int eng__read_file(const char *path, char **data, size_t *size, char *err, size_t errlen);
/* Map a whole regular file read-only (*map NULL for an empty one); eng__unmap_file undoes it. */
int eng__map_file(const char *path, uint8_t **map, size_t *size, char *err, size_t errlen);
void eng__unmap_file(uint8_t *map, size_t size);

double eng__now(void); /* monotonic seconds */

/* 64-bit hash of n bytes (word at a time; not cryptographic). */
uint64_t eng__hash64(const void *p, size_t n, uint64_t seed);

/* ---- UTF-8 ------------------------------------------------------------- */
/* Length of the valid UTF-8 sequence starting at s (1..4), 0 if s[0..n) is a
 * valid but incomplete prefix, -1 if invalid at s[0]. */
int eng__utf8_seq(const unsigned char *s, size_t n);
bool eng__utf8_valid(const char *s, size_t n);

/* A growable byte buffer, always NUL-terminated after its n bytes. */
typedef struct {
    char *p;
    size_t n, cap;
} eng__buf;
/* Append n bytes: ENG_OK or ENG_ENOMEM (the buffer is unchanged then). */
int eng__buf_add(eng__buf *b, const char *s, size_t n);

/* ---- string -> int32 hash map (open addressing, keys not owned) -------- */
typedef struct {
    const char **keys;
    uint32_t *klen;
    int32_t *vals;
    size_t cap, count;
} eng__strmap;
int eng__strmap_init(eng__strmap *m, size_t expect);
void eng__strmap_free(eng__strmap *m);
int eng__strmap_put(eng__strmap *m, const char *k, size_t klen, int32_t v);
int32_t eng__strmap_get(const eng__strmap *m, const char *k, size_t klen); /* -1 if absent */

/* ---- config.json ------------------------------------------------------- */
/* Parse config.json text; name is used in messages. */
int eng__config_parse(const char *json, size_t len, const char *name, eng_config *cfg,
                      char *err, size_t errlen);
/* Add generation_config.json's eos_token_id (an id or a list) to cfg's end-of-sequence ids. */
int eng__config_generation(const char *json, size_t len, const char *name, eng_config *cfg,
                           char *err, size_t errlen);

/* ---- safetensors ------------------------------------------------------- */
enum st_dtype { ST_F32, ST_F16, ST_BF16 };

typedef struct {
    char *name;
    enum st_dtype dtype;
    int ndim;
    int64_t shape[4];
    const uint8_t *data;  /* points into the file's data section */
    size_t nbytes;
} st_tensor;

typedef struct {
    st_tensor *t;
    int n;
} st_file;

/* Parse a whole safetensors file image (data, size). Validates the header
 * length, the JSON, dtypes, shapes, and that every tensor's byte range lies in
 * the data section, matches its shape and overlaps no other. Tensor data
 * pointers point into data (keep it alive). name is for messages. */
int st_parse(const uint8_t *data, size_t size, const char *name, st_file *out,
             char *err, size_t errlen);
void st_free(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);
/* Convert n elements of src (dtype) to float. */
void st_to_f32(enum st_dtype dt, const uint8_t *src, float *dst, size_t n);

/* ---- GGUF model files (gguf.c, gguf_model.c, gguf_vocab.c) ------------- */
#include "gguf.h"
/* A mapped, parsed GGUF file. */
typedef struct {
    uint8_t *map;
    size_t size;
    gguf_file g;
} eng__gguf;
/* path is a regular file that starts with the GGUF magic. */
int eng__is_gguf_path(const char *path);
int eng__gguf_open(eng__gguf *f, const char *path, char *err, size_t errlen);
void eng__gguf_close(eng__gguf *f);
/* The metadata as config.json (llama, qwen2, qwen3). */
int eng__gguf_config(const gguf_file *g, const char *path, eng_config *cfg, char *err, size_t errlen);
/* The tokenizer metadata as the tokenizer.json it stands for (*out: the caller deletes it). */
struct cJSON;
int eng__gguf_tokenizer(const gguf_file *g, const char *path, struct cJSON **out, char *err, size_t errlen);
/* A checkpoint tensor name's GGUF name (in buf, or a constant), or NULL if it has none. */
const char *eng__gguf_name(const char *hf, char *buf, size_t n);
/* The file stores q and k rows in llama.cpp's interleaved order (architecture llama). */
int eng__gguf_permuted(const gguf_file *g);
/* tokenizer.chat_template and the BOS and EOS texts (malloc'd; bos, eos may be NULL). */
int eng__gguf_chat(const gguf_file *g, const char *path, char **tpl, char **bos, char **eos, char *err, size_t errlen);
/* Build a tokenizer from a parsed tokenizer.json (root is not taken). */
int eng__tok_from_json(eng_tok **out, const struct cJSON *root, const char *path, char *err, size_t errlen);

/* ---- weights ----------------------------------------------------------- */
/* A weight matrix of out rows by in columns, packed in panels of 16 rows
 * (matmul.c): F32 as loaded, or BF16 when the model was opened with bf16
 * weights (converted after packing). eng__mat_elems(out, in) elements. */
typedef struct {
    void *p;
    int bf16;
    int q8;     /* Q8_0 blocks (matmul_q8.c) */
    int kq;     /* K-quant panels (matmul_k.c): panel i's format ktype[i] (GGML_Q4_K or GGML_Q6_K), at p + koff[i] */
    uint8_t *ktype;
    size_t *koff;
    int out, in; /* its shape, once loaded (0 for a scratch matrix) */
} eng__mat;
void eng__mat_free(eng__mat *m);
static inline float *eng__f32(const eng__mat *m) { return (float *)m->p; } /* while loading: always F32 */
/* Elements of a packed out x in matrix (out rounded up to whole panels). */
size_t eng__mat_elems(int out, int in);
/* Pack a row-major F32 matrix (allocated with eng__mat_elems elements, the
 * first out * in set) into panels, in place. */
int eng__mat_pack(eng__mat *m, int out, int in);
/* Decode products (up to this many rows: bound by reading the weights)
 * share their panels out between the threads (eng__share) rather than as
 * tasks of the pool (matmul.c). */
#define DECODE_ROWS 4
/* Whether a product of n rows of W (out x in) takes the shared-out path: a
 * decode product of a loaded matrix, whose shape the shares are cut by. */
static inline int eng__decode_shared(const eng__mat *W, int n, int in, int out) {
    return n <= DECODE_ROWS && W->out == out && W->in == in;
}
/* Where panel p (0 .. panels) of a loaded matrix starts in m->p, bytes. */
size_t eng__mat_panel_off(const eng__mat *m, int p);
/* Thread t of T's share of a decode product: panels [*p0, *p1), about
 * 1/T of the bytes. */
void eng__mat_share(const eng__mat *m, int t, int T, int *p0, int *p1);
/* The panels of a decode product shared out between the threads: each
 * starts on its own share (eng__mat_share) and takes its panels one at a
 * time; one that runs out takes half of what another has left, from the
 * end. Which thread computes a panel changes nothing in it. */
#define SHARE_MAX 64
typedef struct {
    struct {
        _Alignas(64) uint64_t c; /* next panel | end << 32, a line per thread */
    } cell[SHARE_MAX];
    int T;
} eng__share;
void eng__share_init(eng__share *s, const eng__mat *m, int T);
/* Panels [*a, *b) for thread t to compute next; 0 when none is left. */
int eng__share_next(eng__share *s, int t, int *a, int *b);

typedef struct {
    float *attn_norm;  /* [H] */
    eng__mat wqkv;     /* [(nh + 2*nkv) * hd][H]: q, k, v projections stacked */
    eng__mat wo;       /* [H][nh*hd] */
    float *ffn_norm;   /* [H] */
    eng__mat w13;      /* [2F][H]: gate then up stacked */
    eng__mat w2;       /* [H][F] */
    float *bqkv;       /* [nh*hd + 2*nkv*hd] q, k, v biases, or NULL (cfg.qkv_bias) */
    float *bo;         /* [H] or NULL (cfg.o_bias) */
    float *b13;        /* [2F] gate, up biases, or NULL (cfg.mlp_bias) */
    float *b2;         /* [H] or NULL (cfg.mlp_bias) */
    float *q_norm, *k_norm; /* [hd] each, or NULL (cfg.qk_norm) */
    float *post_attn_norm, *post_ffn_norm; /* [H] each (gemma): on the sublayers' outputs */
    /* a mixture-of-experts layer (cfg.layer_flags & ENG_LAYER_MOE) has no w13/w2 but: */
    eng__mat router;   /* [E][H] */
    eng__mat *ew13;    /* [E]: each [2 Fe][H] gate then up */
    eng__mat *ew2;     /* [E]: each [H][Fe] */
} eng__layer;

typedef struct {
    eng__mat embed;    /* [V][H] */
    eng__layer *layers;
    float *norm;       /* [H] */
    eng__mat lm_head;  /* [V][H]; the same memory as embed when tied */
    size_t bytes;
} eng__weights;

/* One packed F32/BF16 matrix to Q8_0 (frees the F32); a matrix whose rows
 * are not whole blocks of 32 stays as it is. */
int eng__mat_to_q8(eng__weights *w, eng__mat *m, int out, int in);
size_t eng__q8_bytes(int out, int in);
void eng__q8_row(const eng__mat *W, size_t r, int in, float *dst);
/* A packed F32/BF16 matrix to K-quant panels (frees the F32), from its rows
 * as GGUF Q4_K or Q6_K blocks: row r at raw + r * stride, its format
 * types[r]. ENG_EFORMAT (nothing changed) when a panel's rows differ in
 * format, or one is neither, or in is not whole super-blocks of 256. */
int eng__mat_to_k(eng__weights *w, eng__mat *m, int out, int in, const uint8_t *raw, size_t stride,
                  const uint8_t *types);
/* One panel of K-quant rows: rows[j] is row j's GGUF blocks of type (NULL:
 * zeros), to the panel's eng__k_panel_bytes at dst. */
void eng__k_panel(uint8_t *dst, int type, const uint8_t *const rows[16], int in);
size_t eng__k_panel_bytes(int type, int in);
/* n values to 8-bit: returns d = max|x| / 127, q = round(x / d) in [-127, 127] (the
 * activations of the quantized products; Q8_0's values with d kept in float). */
float eng__quant8(const float *x, int n, int8_t *q);
float eng__quant8_ref(const float *x, int n, int8_t *q); /* the scalar definition (tests) */
/* One panel's F32 values as packed ([in][16]) to its Q8_0 bytes (eng__q8_bytes(16, in)). */
void eng__q8_panel(uint8_t *dst, const float *panel, int in);
/* 256 values to one GGUF Q4_K block (144 bytes), with our quantizer. */
void eng__k4_quantize(const float *x, uint8_t *b);
void eng__k_row(const eng__mat *W, size_t r, int in, float *dst);
/* IEEE half of f, round to nearest even (model.c). */
uint16_t eng__f32_to_f16(float f);

/* Y[n][out] = X[n][in] · Wᵀ with our kernel; xt: workspace of n * in
 * floats. Each output is the same arithmetic whatever n (batch invariant). */
typedef struct eng__pool eng__pool;
void eng__matmul(float *Y, const float *X, const eng__mat *W, int n, int in, int out, float *xt, eng__pool *pool);
/* The CPU has the AVX-512 subsets our kernels use (F, BW, VL), and
 * KVSERVE_NO_AVX512 is not set. */
int eng__cpu_avx512(void);
/* ... and AVX512-VNNI (the quantized kernels' integer dot products). */
int eng__cpu_vnni(void);
/* Force the matmul kernel's instruction set (tests); -1: the best there is. */
enum { ENG__ISA_SCALAR, ENG__ISA_AVX2, ENG__ISA_AVX512 };
void eng__matmul_isa(int isa);
/* eng__matmul on a Q8_0 matrix (matmul_q8.c); xt: n * in floats of workspace. */
void eng__matmul_q8(float *Y, const float *X, const eng__mat *W, int n, int in, int out, float *xt, eng__pool *pool,
                    int isa);
/* eng__matmul on a K-quant matrix (matmul_k.c); xt: n * in floats of workspace. */
void eng__matmul_k(float *Y, const float *X, const eng__mat *W, int n, int in, int out, float *xt, eng__pool *pool,
                   int isa);
/* Row r of a matrix as F32. */
void eng__mat_row(const eng__mat *W, size_t r, int in, float *dst);

/* ---- KV storage ---------------------------------------------------------
 * Keys and values live in fixed-size blocks of `block_tokens` positions cut
 * from one pool. A block holds K and V for every layer:
 *   block b, layer l:  K at element b*block_elems + (2l)  *B*kvd,  [B][kvd]
 *                      V at element b*block_elems + (2l+1)*B*kvd,  [B][kvd]
 * Elements are float, or IEEE half with f16 (half the memory and the bytes
 * attention reads; converted on store and load). A sequence sees its KV
 * through a block table (block ids in position order). This is the one
 * interface the forward pass uses; the batch engine manages blocks (free
 * list, sharing), a single sequence just takes a run. */
typedef struct {
    void *mem;
    int n_blocks;
    int block_tokens;
    int n_layers;
    int kv_dim;
    int f16;
    size_t esz;             /* bytes per element: 4, or 2 with f16 */
    size_t block_elems;
} kv_pool;

typedef struct {
    const int32_t *blocks;  /* block ids, position p lives in blocks[p / B] */
    int n_blocks;
} kv_table;

int kv_pool_init(kv_pool *p, int n_blocks, int block_tokens, int n_layers, int kv_dim, int f16);
void kv_pool_free(kv_pool *p);

/* The K (V) row of (layer, pos): kv_dim elements; rows of a block are
 * kv_dim elements apart. */
static inline void *kv_k(const kv_pool *p, const kv_table *t, int layer, int pos) {
    int B = p->block_tokens;
    size_t e = (size_t)t->blocks[pos / B] * p->block_elems + (size_t)(2 * layer) * B * p->kv_dim +
               (size_t)(pos % B) * p->kv_dim;
    return (char *)p->mem + e * p->esz;
}
static inline void *kv_v(const kv_pool *p, const kv_table *t, int layer, int pos) {
    return (char *)kv_k(p, t, layer, pos) + (size_t)p->block_tokens * p->kv_dim * p->esz;
}
/* Element i of a row onward. */
static inline const void *kv_at(const kv_pool *p, const void *row, size_t i) {
    return (const char *)row + i * p->esz;
}
/* n elements between a KV row and floats (src / dst need no alignment). */
void kv_put(const kv_pool *p, void *dst, const void *src, int n);
void kv_get(const kv_pool *p, const void *src, void *dst, int n);

/* ---- BLAS (blas.c: the only file that calls OpenBLAS) ------------------ */
/* The OpenBLAS core to force, or NULL to keep `current`. */
const char *eng__blas_better_core(const char *current, int avx512);
/* C[m][n] = alpha * A[m][k] · op(B), row-major; op(B) = Bᵀ (B [n][k]) when b_trans, else B [k][n]. */
void eng__sgemm(int b_trans, int m, int n, int k, float alpha, const float *A, int lda, const float *B, int ldb,
                float *C, int ldc);
/* Set OpenBLAS's own threads to n (n > 0); returns how many it had. */
int eng__blas_threads(int n);

/* ---- thread pool (the engine's own parallel loops) --------------------- */
eng__pool *eng__pool_new(int n_threads);   /* n_threads - 1 workers; the caller is the last */
void eng__pool_free(eng__pool *p);
int eng__pool_threads(const eng__pool *p);
/* KVSERVE_PROFILE set: seconds the callers of eng__pool_run waited for the workers (else 0). */
double eng__pool_wait(const eng__pool *p);
/* Run fn(ctx, task, thread) for task in [0, n_tasks) on all threads; thread
 * is in [0, eng__pool_threads). Returns when all are done. One job at a time. */
void eng__pool_run(eng__pool *p, int n_tasks, void (*fn)(void *ctx, int task, int thread), void *ctx);
/* Run fn(ctx, t, t) once on each thread t in [0, eng__pool_threads): a
 * static split (thread t always takes the same share, so it can fetch its
 * share of what comes next ahead of time). Returns when all are done. */
void eng__pool_each(eng__pool *p, void (*fn)(void *ctx, int task, int thread), void *ctx);

/* ---- forward pass ------------------------------------------------------ */
/* A batch of tokens from one or more sequences. Token i is at position pos[i]
 * of sequence seq[i], whose KV is seen through tables[seq[i]]; positions
 * 0..pos[i]-1 of that sequence must already be in its blocks or earlier in
 * this batch. Logits are computed for the rows listed in out_rows. */
typedef struct {
    int n;
    const int32_t *tokens;
    const int32_t *pos;
    const int32_t *seq;
    const kv_table *tables;
    int n_out;
    const int32_t *out_rows;
    float *logits;          /* [n_out][V] */
} fwd_batch;

typedef struct fwd_scratch fwd_scratch;
fwd_scratch *fwd_scratch_new(const eng_config *c, int max_tokens, int max_ctx, int threads);
void fwd_scratch_free(fwd_scratch *s);
/* Run the transformer over the batch (b->n <= max_tokens). */
void fwd_run(const eng_config *c, const eng__weights *w, const kv_pool *kv,
             fwd_scratch *s, const float *const *rope, eng__pool *pool, const fwd_batch *b);
/* cos/sin table [max_ctx][hd/2][2] for RoPE: the model's (local = 0), or the
 * sliding layers' own (rope_local_theta, unscaled). */
float *fwd_rope_table(const eng_config *c, int max_ctx, int local);

/* ---- sampling ---------------------------------------------------------- */
typedef struct { uint64_t s[4]; } eng__rng;
void eng__rng_seed(eng__rng *r, uint64_t seed);
double eng__rng_uniform(eng__rng *r); /* [0,1) */

typedef struct eng__sampler eng__sampler;
eng__sampler *eng__sampler_new(int vocab);
void eng__sampler_free(eng__sampler *s);
/* Pick a token from logits (modified in place). history: tokens before
 * (prompt then output) for the repetition penalty. */
int32_t eng__sample(eng__sampler *s, const eng_sampling *p, eng__rng *rng, float *logits,
                    const int32_t *history, size_t n_history);
/* log-softmax of logits x in parts: log P(j) = (double)x[j] - *mx - *logsum
 * (what eng_score and the batch engine's logprobs compute). */
void eng__logsoftmax_parts(const float *x, size_t V, double *mx, double *logsum);
/* The n (<= V) largest logits, largest first, ties by lower id: n ids into ids. */
void eng__top_logits(const float *x, int V, int n, int32_t *ids);

/* ---- per-sequence generation state (stop strings, streaming text) ------ */
typedef struct eng__gen eng__gen;
eng__gen *eng__gen_new(const eng_tok *tok, const eng_gen_params *p, const eng_config *c);
void eng__gen_free(eng__gen *g);
/* Feed a sampled token. Returns the finish reason (ENG_FINISH_NONE to go on)
 * and the newly emittable text in *delta, *dlen (valid until next call). */
int eng__gen_push(eng__gen *g, int32_t token, const char **delta, size_t *dlen);
/* Final text (whole output, stop string removed) after finishing. */
const char *eng__gen_text(eng__gen *g, size_t *len);
/* Text still held back when finishing for a reason other than a stop string. */
void eng__gen_flush(eng__gen *g, const char **delta, size_t *dlen);

int eng__tok_is_special(const eng_tok *t, int32_t id);
/* Leading spaces the decoder strips from a decoded text (0, or 1 for
 * SentencePiece-style tokenizers whose encoder prepends one). */
int eng__tok_strip_start(const eng_tok *t);
/* A token's bytes, as the first token of a text (first) or anywhere else;
 * they differ with a Metaspace decoder. NULL for a bad id. */
const char *eng__tok_piece_at(const eng_tok *t, int32_t id, int first, size_t *len);

/* A tokenizer.json regex (Rust syntax) compiled by PCRE2 (tokenizer.c); NULL
 * and why in msg if it does not compile. Free with pcre2_code_free. */
struct pcre2_real_code_8;
struct pcre2_real_code_8 *eng__re_compile(const char *pat, size_t len, char *msg, size_t msglen);

/* ---- normalizers (normalize.c) ----------------------------------------- */
struct cJSON;
typedef struct eng__norm eng__norm;
/* Load tokenizer.json's "normalizer" (NULL or null: *out NULL, none). Refuses
 * the kinds it does not know with ENG_EUNSUPPORTED naming them. */
int eng__norm_open(eng__norm **out, const struct cJSON *j, const char *path, char *err, size_t errlen);
void eng__norm_free(eng__norm *z);
/* Normalize valid UTF-8: *out malloc'd, NUL-terminated. */
int eng__norm_apply(const eng__norm *z, const char *s, size_t n, char **out, size_t *out_len);

/* ---- model ------------------------------------------------------------- */
struct eng_model {
    eng_config cfg;
    eng_options opt;
    eng__weights w;
    eng_tok *tok;
    float *rope[2];      /* RoPE tables: [0] the model's, [1] the sliding layers' (gemma3) or NULL */
    int max_ctx;
    kv_pool kv;          /* single-sequence dense cache: blocks 0..n-1 */
    int32_t *kv_ids;
    fwd_scratch *scratch;
    eng__sampler *sampler;
    eng__pool *pool;     /* the engine's threads (OpenBLAS runs single-threaded inside their tasks) */
    float *logits;       /* [max_batch_tokens][V] output rows of one forward call */
    int32_t *bpos, *bseq, *brows; /* max_batch_tokens each: batch description buffers */
    int wkind;             /* ENG_WEIGHTS_* the matrices are held in (never AUTO) */
    uint64_t fingerprint;  /* config + sampled weights, see eng_model_fingerprint */
    char warning[512];     /* eng_model_warning */
};

/* From the safetensors files of dir, or from the GGUF file gg (not NULL):
 * each layer loaded in F32, hashed into m->fingerprint and converted to
 * m->wkind before the next (the peak is the final size plus one layer). */
int eng__load_weights(eng_model *m, const char *dir, const eng__gguf *gg, char *err, size_t errlen);
void eng__free_weights(eng__weights *w, const eng_config *c);

#endif
