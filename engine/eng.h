/* eng.h — kvserve engine: a LLaMA-family transformer runtime on OpenBLAS.
 *
 * The engine loads a Hugging Face model directory (config.json, safetensors
 * weights, tokenizer.json), tokenizes, runs the forward pass, samples and
 * scores. It knows nothing of gRPC or Redis.
 *
 * Conventions (as in SQLite / libuv):
 *   - every public name starts with eng_ / ENG_; handles are opaque;
 *   - functions return ENG_OK (0) or a negative ENG_E* code; those that can
 *     fail for a reason worth showing take (char *err, size_t errlen) and
 *     write a one-line message naming the file / tensor / field at fault;
 *   - an eng_model is read-only once open and may be shared by threads;
 *     an eng_tok likewise. Generation and scoring calls on one model must
 *     not run concurrently (they share the model's scratch buffers).
 */
#ifndef KVSERVE_ENG_H
#define KVSERVE_ENG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ------------------------------------------------------ */
enum {
    ENG_OK = 0,
    ENG_EIO = -1,          /* a file is missing or unreadable */
    ENG_EFORMAT = -2,      /* a file is malformed (JSON, safetensors header, shapes) */
    ENG_EUNSUPPORTED = -3, /* valid input we do not support (dtype, tokenizer type) */
    ENG_ENOMEM = -4,       /* allocation failed */
    ENG_EINVAL = -5,       /* invalid argument (generic) */
    ENG_EEMPTY = -6,       /* empty prompt */
    ENG_EMAXTOK = -7,      /* max_tokens <= 0 */
    ENG_ECONTEXT = -8,     /* prompt (plus generation) longer than the context */
    ENG_ETOKEN = -9,       /* token id outside the vocabulary */
    ENG_EUTF8 = -10,       /* text is not valid UTF-8 */
    ENG_ESAMPLING = -11,   /* a sampling parameter is out of range */
    ENG_EQUEUE = -12,      /* the waiting queue is full (try later) */
    ENG_EPOOL = -13,       /* the request can never fit in the KV pool */
    ENG_ENOTFOUND = -14,   /* unknown request id or agent */
    ENG_EBUSY = -15,       /* the agent is running a request */
    ENG_EEXIST = -16,      /* an agent of that name exists already */
    ENG_ECORRUPT = -17,    /* exported agent data is truncated or corrupt */
    ENG_EMODEL = -18,      /* exported agent data belongs to another model */
};

/* A short static description of a status code ("empty prompt", ...). */
const char *eng_strerror(int code);

/* ---- tokenizer --------------------------------------------------------- */
typedef struct eng_tok eng_tok;

/* Load a Hugging Face tokenizer.json, or the tokenizer of a GGUF model file
 * (docs/engine.md says how its metadata maps): BPE, byte-level or SentencePiece-style
 * (byte fallback), with the normalizers, pre-tokenizers and decoders listed
 * in docs/engine.md. Other model types (Unigram, WordPiece, ...) and other
 * steps are refused with ENG_EUNSUPPORTED and a message naming them. */
int eng_tok_open(eng_tok **out, const char *path, char *err, size_t errlen);
void eng_tok_close(eng_tok *tok);

int eng_tok_vocab_size(const eng_tok *tok);
/* BOS id added by the tokenizer's post-processor, or -1 if it adds none. */
int eng_tok_bos(const eng_tok *tok);

/* Encode UTF-8 text to token ids, exactly as Hugging Face tokenizers do
 * (added/special tokens in the text are recognised). If add_special, the
 * post-processor's BOS (if any) is prepended. *ids is malloc'd; free() it.
 * Returns ENG_OK, ENG_EUTF8 or ENG_ENOMEM. Cost: O(len log len). */
int eng_tok_encode(const eng_tok *tok, const char *text, size_t len, int add_special,
                   int32_t **ids, size_t *n_ids);

/* Decode ids to bytes (malloc'd, NUL-terminated, length in *len). Special
 * tokens are skipped when skip_special. Bytes are exactly the token bytes, so
 * a cut in the middle of a character is left as is. ENG_ETOKEN on a bad id. */
int eng_tok_decode(const eng_tok *tok, const int32_t *ids, size_t n, int skip_special,
                   char **text, size_t *len);

/* The raw bytes of one token (not NUL-terminated), or NULL for a bad id. */
const char *eng_tok_piece(const eng_tok *tok, int32_t id, size_t *len);

/* ---- model ------------------------------------------------------------- */
typedef struct eng_model eng_model;

#define ENG_MAX_EOS 8 /* end-of-sequence ids a model may have */

typedef struct eng_config {
    int vocab_size;
    int hidden_size;
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int intermediate_size;
    int max_position;       /* context length */
    float rope_theta;
    float rms_eps;
    int tie_embeddings;
    int bos_id;             /* -1 if none */
    int eos_id;             /* -1 if none; the first of eos_ids */
    int32_t eos_ids[ENG_MAX_EOS]; /* every id that ends a generation: config.json's eos_token_id (an id or a
                             * list) and generation_config.json's (chat models end turns with theirs) */
    int n_eos;
    char dtype[8];          /* dtype of the weight files: "F32", "F16", "BF16" */
    char model_type[24];    /* "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen3_moe", "mixtral" */
    int qkv_bias;           /* q, k and v projections have biases (qwen2; llama attention_bias) */
    int o_bias;             /* the output projection has a bias (llama attention_bias) */
    int mlp_bias;           /* gate, up and down projections have biases (llama mlp_bias) */
    int qk_norm;            /* RMSNorm over each head of q and k before RoPE (qwen3) */
    int rope_scaling;       /* ENG_ROPE_* */
    float rope_factor;      /* linear, llama3 and dynamic scaling */
    float rope_low_freq_factor, rope_high_freq_factor; /* llama3 */
    int rope_original_max;  /* llama3: original_max_position_embeddings; dynamic: the trained context
                             * (max_position_embeddings), which max_position then exceeds by the factor */
    /* sliding-window attention: a layer marked ENG_LAYER_SLIDING attends to its last
     * sliding_window positions (itself included); the others to the whole context */
    int sliding_window;     /* 0 = no layer slides */
    int n_sliding;          /* how many layers slide */
    float rope_local_theta; /* RoPE base of the sliding layers (gemma3: rope_local_base_freq; no scaling) */
    /* Gemma 3 */
    int gemma;              /* RMSNorm weight 1 + w, embeddings scaled by sqrt(hidden), norms after
                             * attention and after the MLP, GELU-tanh gate */
    float attn_scale;       /* query scale: 1/sqrt(head_dim), or 1/sqrt(query_pre_attn_scalar) */
    float final_softcap;    /* logits = cap * tanh(logits / cap); 0 = off */
    /* mixture of experts (qwen3_moe, mixtral): layers marked ENG_LAYER_MOE route each token to
     * n_experts_used of n_experts SwiGLU experts of moe_intermediate_size */
    int n_experts, n_experts_used, moe_intermediate_size;
    int moe_norm_topk;      /* renormalise the chosen experts' weights to sum to 1 */
    unsigned char layer_flags[1024]; /* ENG_LAYER_* per layer */
    float rope_ff[256];     /* ENG_ROPE_FACTORS: pair j's frequency is divided by rope_ff[j] */
} eng_config;

enum { ENG_ROPE_NONE = 0, ENG_ROPE_LINEAR, ENG_ROPE_LLAMA3, ENG_ROPE_DYNAMIC,
       ENG_ROPE_FACTORS /* each frequency divided by its own factor (rope_ff): a GGUF file's rope_freqs */ };
/* Weight matrices: F32; BF16; Q8_0 (8-bit blocks of 32, products of 8-bit activations); Q4_K
 * (ggml's K-quants: a GGUF file's Q4_K and Q6_K matrices kept as they are, others quantized to
 * Q4_K, or to Q8_0 where rows are not whole blocks of 256; products of 8-bit activations). */
enum { ENG_WEIGHTS_AUTO = 0, ENG_WEIGHTS_F32, ENG_WEIGHTS_BF16, ENG_WEIGHTS_Q8_0, ENG_WEIGHTS_Q4_K };
enum { ENG_LAYER_SLIDING = 1, ENG_LAYER_MOE = 2 };

typedef struct eng_options {
    int n_threads;          /* compute threads; 0 = number of online CPUs */
    int max_batch_tokens;   /* tokens per forward call (prefill chunk); 0 = 512 */
    int max_context;        /* cap on context; 0 = config max_position */
    int bf16_weights;       /* keep the weight matrices in BF16 (half the bytes per token); the same as
                             * weights = ENG_WEIGHTS_BF16 */
    int weights;            /* ENG_WEIGHTS_*: what the weight matrices are held in. AUTO: a GGUF file
                             * whose matrices are Q8_0 stays in Q8_0, Q4_K or Q6_K in Q4_K, anything
                             * else is F32 */
    int kv_f16;             /* keep keys and values in IEEE half (model and engine KV) */
} eng_options;

/* Call first in main(): on a CPU with AVX-512 where OpenBLAS runs other
 * kernels, set OPENBLAS_CORETYPE=SkylakeX and exec the program again
 * (KVSERVE_BLAS_CORE=auto|keep|NAME, see engine/blas.c). Returns only when
 * nothing needs changing (or exec fails). */
void eng_blas_select(char **argv);
/* The kernels OpenBLAS runs (its core name, e.g. "SkylakeX", "Haswell"). */
const char *eng_blas_core(void);
/* After a re-exec by eng_blas_select: the core OpenBLAS ran before; else NULL. */
const char *eng_blas_note(void);

/* Load a model directory, or a GGUF model file (llama, qwen2, qwen3; its
 * tensors F32, F16, BF16, Q8_0, Q4_0, Q4_K or Q6_K: kept in their blocks
 * where opt->weights says so, else dequantized to F32 on load). A directory's weights in F32, F16 or BF16 (single file or sharded
 * with model.safetensors.index.json) are converted to F32 on load (then the
 * matrices to BF16 with opt->bf16_weights). Every
 * problem (missing file, unknown dtype, wrong shape, truncated file, lying
 * offsets) is reported with the file and tensor name. */
int eng_model_open(eng_model **out, const char *dir, const eng_options *opt,
                   char *err, size_t errlen);
void eng_model_close(eng_model *m);

const eng_config *eng_model_config(const eng_model *m);
/* ENG_WEIGHTS_F32, _BF16, _Q8_0 or _Q4_K: what the loaded matrices are held in. */
int eng_model_weights(const eng_model *m);
/* Something about a loaded model its user should hear (weights that are
 * NaN or infinite, naming the first such tensor), or NULL. */
const char *eng_model_warning(const eng_model *m);
const eng_tok *eng_model_tok(const eng_model *m);
/* Bytes of weights held in memory (F32 after conversion, or BF16 matrices
 * with bf16_weights). */
size_t eng_model_weight_bytes(const eng_model *m);

/* Logits for every position of ids (n <= context): out is [n][vocab].
 * For checking against references; generation uses eng_generate. */
int eng_logits(eng_model *m, const int32_t *ids, size_t n, float *out,
               char *err, size_t errlen);

/* ---- sampling and generation ------------------------------------------ */
typedef struct eng_sampling {
    float temperature;      /* <= 0: greedy (argmax, lowest id on ties) */
    int top_k;              /* 0 = off */
    float top_p;            /* 1 = off; (0,1] */
    float min_p;            /* 0 = off; [0,1) relative to the top probability */
    float repeat_penalty;   /* 1 = off; > 0. Divides positive logits, multiplies negative */
    int repeat_last_n;      /* window for the penalty; 0 = whole history, -1 = prompt+output */
    uint64_t seed;          /* same seed + same request -> same tokens */
} eng_sampling;

/* Defaults: greedy, all filters off, seed 0. */
void eng_sampling_default(eng_sampling *s);
/* ENG_OK or ENG_ESAMPLING with a message naming the bad field. */
int eng_sampling_check(const eng_sampling *s, char *err, size_t errlen);

enum eng_finish { ENG_FINISH_NONE = 0, ENG_FINISH_STOP, ENG_FINISH_LENGTH,
                  ENG_FINISH_CANCELLED, ENG_FINISH_ERROR };
const char *eng_finish_name(int reason); /* "stop", "length", "cancelled", "error" */

typedef struct eng_gen_params {
    eng_sampling sampling;
    int max_tokens;          /* > 0 */
    const char *const *stop; /* stop strings (not included in the output) */
    int n_stop;
    int ignore_eos;          /* keep going past EOS (benchmarks, references) */
    int logprobs;            /* batch engine: each TOKEN event carries the token's log-probability under the
                              * model (log-softmax of the raw logits: before temperature, penalties and
                              * truncation; the arithmetic of eng_score) */
    int top_logprobs;        /* with logprobs: and the this-many most probable tokens (0..ENG_MAX_TOP_LOGPROBS) */
} eng_gen_params;
#define ENG_MAX_TOP_LOGPROBS 20

/* Called for every generated token: id and the text it completes. text is
 * only whole UTF-8 characters and never part of a stop string; it may be
 * empty (len 0) while bytes are held back. Return non-zero to stop
 * (finish reason "cancelled"). */
typedef int (*eng_token_cb)(void *ud, int32_t token, const char *text, size_t len);

typedef struct eng_gen_result {
    int finish;              /* enum eng_finish */
    int prompt_tokens;
    int generated_tokens;
    char *text;              /* malloc'd, NUL-terminated: the whole output */
    size_t text_len;
    int32_t *tokens;         /* malloc'd generated ids */
    double prefill_seconds;  /* wall time of the prompt's forward passes */
    double decode_seconds;   /* wall time of the rest */
} eng_gen_result;

/* Generate from prompt ids (n >= 1). Validates first: ENG_EEMPTY,
 * ENG_EMAXTOK, ENG_ECONTEXT (prompt + max_tokens > context), ENG_ETOKEN,
 * ENG_ESAMPLING. res is filled on ENG_OK; free it with eng_gen_result_free. */
int eng_generate(eng_model *m, const int32_t *prompt, size_t n, const eng_gen_params *p,
                 eng_token_cb cb, void *ud, eng_gen_result *res, char *err, size_t errlen);
void eng_gen_result_free(eng_gen_result *res);

/* Per-token log-probabilities of ids[1..n-1] given their prefixes:
 * logprobs[i-1] = log P(ids[i] | ids[0..i-1]). n >= 2. *ppl (if not NULL)
 * gets exp(-mean logprob). */
int eng_score(eng_model *m, const int32_t *ids, size_t n, double *logprobs, double *ppl,
              char *err, size_t errlen);

/* ---- block-pool batch engine -------------------------------------------
 * Many sequences at once over one model. KV lives in one pool of fixed-size
 * blocks allocated at open; a sequence owns a block table; full blocks are
 * shared between sequences of the same tenant with the same prefix
 * (reference counted, found by a hash chain of their tokens, kept for reuse
 * after their last owner leaves until the space is needed). KV restored by
 * eng_agent_import is never shared with other sequences. Requests are queued by eng_submit() and
 * advanced by eng_step(), one iteration of continuous batching.
 *
 * Thread-safety: eng_submit, eng_cancel, the agent calls and eng_stats may
 * be called from any thread while one thread (and only one) drives
 * eng_step. The engine's lock is not held while the forward pass runs, so
 * those calls wait at most for the bookkeeping of a step, not its compute.
 * Event callbacks run on the stepping thread with the lock released, so they
 * may call any engine function.
 */
typedef struct eng_engine eng_engine;

typedef struct eng_engine_options {
    int n_blocks;          /* KV pool size in blocks (0: from kv_memory_mib, else 512) */
    double kv_memory_mib;  /* with n_blocks 0: as many blocks as fit in this many MiB (values below 1:
                            * that fraction of the machine's physical memory) */
    int block_tokens;      /* tokens per block (0 = 16) */
    int max_step_tokens;   /* token budget of one step (0 = 512) */
    int max_running;       /* sequences running at once (0 = 64) */
    int max_queue;         /* waiting requests before ENG_EQUEUE (0 = 1024) */
    int share_prefix_across_tenants; /* 0: a tenant only reuses KV blocks its own requests computed
                                      * (no KV, usage or timing crosses tenants); 1: all tenants share
                                      * the prefix index (for tenants that trust each other) */
} eng_engine_options;

/* Open an engine over a loaded model (the model must outlive it). */
int eng_engine_open(eng_engine **out, eng_model *m, const eng_engine_options *o, char *err, size_t errlen);
/* Close: pending requests are dropped without events. */
void eng_engine_close(eng_engine *e);

typedef struct eng_request {
    const char *text;        /* prompt text (UTF-8), or NULL to use ids */
    size_t text_len;
    int add_special;         /* add the tokenizer's BOS to text (not on agent follow-ups) */
    const int32_t *ids;      /* prompt as token ids when text is NULL */
    size_t n_ids;
    const char *tenant;      /* scope of agent ids; NULL = "" */
    const char *agent_id;    /* NULL or "" = no agent */
    int reset;               /* agent: forget its history first */
    int full_context;        /* agent: the prompt is the whole conversation, history included (a
                              * rendered chat): the agent keeps its tokens and KV up to the longest
                              * common prefix with it, and only the rest is computed */
    eng_gen_params params;   /* stop strings are copied */
} eng_request;

/* Validate and queue a request; *id is its handle. Fails at once with
 * ENG_EEMPTY, ENG_EMAXTOK, ENG_ECONTEXT, ENG_ETOKEN, ENG_EUTF8,
 * ENG_ESAMPLING, ENG_EINVAL (bad agent option), ENG_EPOOL (can never fit)
 * or ENG_EQUEUE (queue full), each with a message. */
int eng_submit(eng_engine *e, const eng_request *r, uint64_t *id, char *err, size_t errlen);
/* The checks of eng_submit (every error but ENG_EQUEUE) without queueing:
 * for callers that may answer a request from elsewhere (a cache) and must
 * refuse what the engine would refuse. Text prompts are tokenized to check. */
int eng_request_check(eng_engine *e, const eng_request *r, char *err, size_t errlen);

/* Log-probabilities of a text or ids under the model, computed by the batch
 * engine among the other requests (the arithmetic of generation logprobs):
 * logprobs[i-1] = log P(ids[i] | ids[0..i-1]) for the n ids of r's prompt
 * (r->text tokenized with r->add_special, or r->ids), *n_out = n, *ids_out
 * and *logprobs malloc'd. n >= 2. r->params are ignored; agents are refused
 * (ENG_EINVAL). The prefix cache is not used (every position is computed).
 * Blocks until the stepping thread has computed it: queued(ud), if given, is
 * called once the request waits, to wake that thread. Call it from any other
 * thread; the engine must not be closed while a score waits. */
int eng_engine_score(eng_engine *e, const eng_request *r, void (*queued)(void *), void *ud, int32_t **ids_out,
                     double **logprobs, size_t *n_out, char *err, size_t errlen);

/* Cancel a queued or running request. Its blocks are freed at once (or, if
 * the forward pass running right now uses them, as soon as it returns) and
 * its completion (finish "cancelled") comes from the next eng_step. An
 * agent keeps what was generated before the cancel. ENG_ENOTFOUND if the id
 * is unknown or already finished. */
int eng_cancel(eng_engine *e, uint64_t id);

enum { ENG_EV_TOKEN = 1, ENG_EV_DONE = 2 };

typedef struct eng_usage {
    int prompt_tokens;     /* context processed as prompt: agent history + new prompt */
    int cached_tokens;     /* of those, reused from KV (agent blocks, shared prefixes) */
    int generated_tokens;
    int history_diverged;  /* full_context: the agent's history was not a prefix of the prompt; its KV
                            * from the first difference on was recomputed */
} eng_usage;

/* One event; pointers are valid only during the callback. */
typedef struct eng_event {
    int kind;              /* ENG_EV_TOKEN or ENG_EV_DONE */
    uint64_t id;
    int32_t token;         /* TOKEN: the token */
    int has_logprob;       /* TOKEN, when asked (eng_gen_params.logprobs): */
    double logprob;        /*   log P(token | context) */
    int n_top;             /*   the top_logprobs most probable tokens, most probable first (ties: lower id) */
    const int32_t *top_ids;
    const double *top_logprobs;
    const char *text;      /* TOKEN: new text (may be empty); DONE: whole output */
    size_t text_len;
    int finish;            /* DONE: enum eng_finish */
    eng_usage usage;       /* DONE */
    const int32_t *tokens; /* DONE: generated ids */
    size_t n_tokens;
    int error;             /* DONE with finish "error": the ENG_E* code */
    const char *message;   /* DONE with finish "error": why */
} eng_event;

typedef void (*eng_event_cb)(void *ud, const eng_event *ev);

/* One iteration of continuous batching: finish cancelled requests, admit
 * waiting ones, then run every decoding sequence's next token plus prefill
 * chunks of the others under the token budget, sample, and report events
 * through cb. Returns the number of tokens computed (0 when idle). */
int eng_step(eng_engine *e, eng_event_cb cb, void *ud);

/* Test hook: while n >= 0, no request generates more than n tokens. A held
 * sequence stays running with its blocks and simply sits out the steps;
 * admission, cancellation (blocks freed at once) and event delivery go on.
 * n < 0 lifts the hold. Tests use it to keep a request "running" for as long
 * as they need, whatever the machine's speed (docs/testing.md). Costs one
 * comparison per sequence per step when off. */
void eng_engine_hold(eng_engine *e, int n);

typedef struct eng_stats {
    int blocks_total, blocks_free, blocks_used, blocks_shared; /* shared: used by 2+ owners */
    int blocks_cached;     /* free but holding a reusable prefix */
    int block_tokens;
    int running, waiting, agents;
    uint64_t prefix_hit_tokens; /* tokens reused through prefix sharing, all time */
    uint64_t preemptions;
} eng_stats;
void eng_stats_get(eng_engine *e, eng_stats *s);

/* ---- agents ------------------------------------------------------------ */
typedef struct eng_agent_info {
    char agent_id[256];
    int n_tokens;          /* history length */
    int n_cached;          /* of which KV is held in blocks */
    int n_blocks;
    int busy;              /* a request is running on it */
    double idle_seconds;
    uint64_t version;      /* changes whenever its history does (each turn) */
    int saved;             /* the warm store holds this version (eng_agent_mark_saved) */
} eng_agent_info;

/* ENG_OK or ENG_ENOTFOUND. */
int eng_agent_get(eng_engine *e, const char *tenant, const char *agent_id, eng_agent_info *info);
/* Agents of a tenant: fills up to max, returns how many exist. */
int eng_agent_list(eng_engine *e, const char *tenant, eng_agent_info *out, int max);
/* Forget an agent and free its blocks: ENG_OK, ENG_ENOTFOUND, ENG_EBUSY. */
int eng_agent_drop(eng_engine *e, const char *tenant, const char *agent_id);
/* Branch an idle agent: dst starts with src's history and shares all of its
 * blocks; the first write into a shared block copies it (copy-on-write).
 * ENG_ENOTFOUND, ENG_EBUSY, ENG_EEXIST. */
int eng_agent_fork(eng_engine *e, const char *tenant, const char *src, const char *dst);
/* Serialise an idle agent (tokens and KV) into a malloc'd buffer with a
 * versioned header, the model fingerprint and a checksum. */
int eng_agent_export(eng_engine *e, const char *tenant, const char *agent_id, uint8_t **buf, size_t *len,
                     char *err, size_t errlen);
/* Restore an exported agent under tenant/agent_id. ENG_ECORRUPT, ENG_EMODEL,
 * ENG_EEXIST, ENG_EPOOL (no room) with a message. */
int eng_agent_import(eng_engine *e, const char *tenant, const char *agent_id, const uint8_t *buf, size_t len,
                     char *err, size_t errlen);

/* ---- the warm tier: agents kept outside the pool (the server's Redis) -----
 * The engine does no I/O: it hands exports out and takes them back in, and
 * remembers which version of each agent the store holds. */
/* Called, with the engine's lock held, when pool pressure is about to free
 * the KV of an idle agent whose current version is not saved: blob (the
 * export, malloc'd) is the callee's to free. It must not call the engine. */
typedef void (*eng_spill_cb)(void *ud, const char *tenant, const char *agent_id, uint64_t version, uint8_t *blob,
                             size_t len);
void eng_engine_set_spill(eng_engine *e, eng_spill_cb cb, void *ud);
/* Export the next idle agent that holds KV, has been idle at least
 * min_idle_s and whose version is not saved (nor handed out in the last
 * retry_s seconds). 1 with tenant, agent_id (256 bytes each), *buf, *len and
 * *version filled; 0 when there is none. */
int eng_agent_save_next(eng_engine *e, double min_idle_s, double retry_s, char *tenant, char *agent_id,
                        uint8_t **buf, size_t *len, uint64_t *version);
/* The store holds `version` of the agent (no effect if it has moved on). */
void eng_agent_mark_saved(eng_engine *e, const char *tenant, const char *agent_id, uint64_t version);
/* Bring an agent back from the store: like eng_agent_import, but when the
 * agent exists (tokens only, after an eviction) the stored copy replaces it
 * if it continues the same history with more KV. ENG_EEXIST (with a message)
 * when what is here is as good (nothing changed), ENG_EBUSY when it is
 * running. The restored agent counts as saved. */
int eng_agent_restore(eng_engine *e, const char *tenant, const char *agent_id, const uint8_t *buf, size_t len,
                      char *err, size_t errlen);

/* 64-bit fingerprint of the model (config and weights). */
uint64_t eng_model_fingerprint(const eng_model *m);

/* ---- machine limits (for benchmarks) ---------------------------------- */
/* Best-of-several sgemm throughput, GFLOP/s, on n x n x n with n_threads. */
double eng_measure_sgemm_gflops(int n, int n_threads);
/* Best-of-several read bandwidth, GB/s, summing a buffer of `mbytes` MiB with
 * n_threads threads (the pattern of streaming weights once per token). */
double eng_measure_read_gbps(size_t mbytes, int n_threads);
/* The same probe keeping its buffer and threads, to be read again between
 * runs: a shared machine's bandwidth moves with its neighbours' load, so a
 * run is best compared with the probe read just before and after it. */
typedef struct eng_probe eng_probe;
eng_probe *eng_probe_new(size_t mbytes, int n_threads);
double eng_probe_read_gbps(eng_probe *p, int passes); /* the best of `passes` */
void eng_probe_free(eng_probe *p);

/* ---- chat templates ----------------------------------------------------- */
/* A model's chat template (tokenizer_config.json's "chat_template", Jinja),
 * rendered exactly as @huggingface/jinja renders it (docs/engine.md, "Chat
 * templates", lists the subset). Read-only once open; render from any thread. */
typedef struct eng_chat eng_chat;

typedef struct eng_chat_msg {
    const char *role;       /* "system", "user", "assistant", "tool", ... */
    const char *content;    /* UTF-8; NULL renders as none */
} eng_chat_msg;

/* path: a model directory or its tokenizer_config.json, or a GGUF model file
 * (tokenizer.chat_template, the BOS and EOS tokens' texts). The template is
 * "chat_template" (a string, or a list of {name, template}: "default"), else
 * chat_template.jinja beside it; bos_token / eos_token are strings or
 * {"content": ...}. ENG_EUNSUPPORTED ("... has no chat_template") when there
 * is none; ENG_EFORMAT for bad JSON or a template that does not parse
 * ("template line L:C: expected ..."); ENG_EIO. */
int eng_chat_open(eng_chat **out, const char *path, char *err, size_t errlen);
void eng_chat_close(eng_chat *c);

/* Render n messages into *out (malloc'd, NUL-terminated, *len bytes). The
 * template sees messages, add_generation_prompt, bos_token and eos_token.
 * ENG_EINVAL with the template's raise_exception() message as it is, or
 * "template line L:C: why" for anything else it cannot do; ENG_EUTF8. */
int eng_chat_render(const eng_chat *c, const eng_chat_msg *msgs, size_t n, int add_generation_prompt,
                    char **out, size_t *len, char *err, size_t errlen);
/* The same from a whole JSON context object (json[0..json_len)): messages
 * with tool_calls, tools, enable_thinking, ...; bos_token, eos_token and
 * add_generation_prompt (false) are filled in when absent. ENG_EFORMAT if
 * the JSON is malformed or not an object. */
int eng_chat_render_json(const eng_chat *c, const char *json, size_t json_len, char **out, size_t *len,
                         char *err, size_t errlen);

/* ---- incremental detokenizer (streaming) ------------------------------ */
typedef struct eng_detok eng_detok;

eng_detok *eng_detok_new(const eng_tok *tok);
void eng_detok_free(eng_detok *d);
/* Append a token; *out points at the newly completed UTF-8 text (valid
 * until the next call), never half a character. Invalid byte sequences come
 * out as U+FFFD. Special tokens are skipped. */
int eng_detok_push(eng_detok *d, int32_t token, const char **out, size_t *len);
/* Flush held-back bytes (as U+FFFD if incomplete). */
int eng_detok_flush(eng_detok *d, const char **out, size_t *len);

#ifdef __cplusplus
}
#endif
#endif
