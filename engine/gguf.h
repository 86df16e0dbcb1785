/* gguf.h — GGUF files (v2, v3; little-endian), internal to the engine.
 *
 * A GGUF file is a header (magic "GGUF", version, tensor and metadata
 * counts), typed key/value metadata, tensor descriptions (name, dimensions
 * innermost first, ggml type, offset) and the tensor data, aligned to
 * general.alignment (32 by default). gguf_parse checks everything a reader
 * relies on before anything is used: every length and count against the
 * bytes that are there, every type, every tensor's byte range inside the
 * data section and overlapping no other, names unique. Values are not
 * copied: keys, strings and tensor data point into the image, which must
 * outlive the gguf_file. */
#ifndef KVSERVE_GGUF_H
#define KVSERVE_GGUF_H

#include <stddef.h>
#include <stdint.h>

/* metadata value types */
enum {
    GGUF_U8 = 0, GGUF_I8, GGUF_U16, GGUF_I16, GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, GGUF_STRING,
    GGUF_ARRAY, GGUF_U64, GGUF_I64, GGUF_F64, GGUF_N_VTYPES
};

/* ggml tensor types that can be read (the others are refused by name) */
enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q8_0 = 8, GGML_Q4_K = 12, GGML_Q6_K = 14, GGML_BF16 = 30
};

typedef struct {
    const char *key;        /* not NUL-terminated: klen bytes */
    size_t klen;
    uint32_t type;          /* GGUF_* */
    uint32_t arr_type;      /* an array's element type */
    uint64_t n;             /* an array's length */
    const uint8_t *val;     /* the value (an array: its first element; a string: its length field) */
} gguf_kv;

typedef struct {
    const char *name;
    size_t name_len;
    uint32_t n_dims;
    uint64_t ne[4];         /* innermost first: a [rows][cols] matrix has ne[0] = cols */
    uint64_t n_elems;
    uint32_t type;          /* GGML_* */
    const uint8_t *data;
    size_t nbytes;
} gguf_tensor;

typedef struct {
    uint32_t version;
    gguf_kv *kv;
    size_t n_kv;
    gguf_tensor *t;
    size_t n_t;
    size_t alignment;
} gguf_file;

/* Parse a whole file image; name is for messages. ENG_EFORMAT with a message
 * naming what is wrong (and the tensor or key), ENG_EUNSUPPORTED for a
 * tensor type we do not read, ENG_ENOMEM. */
int gguf_parse(const uint8_t *data, size_t size, const char *name, gguf_file *out, char *err, size_t errlen);
void gguf_free(gguf_file *g);
/* Does the image start like a GGUF file? */
int gguf_is(const uint8_t *data, size_t size);

const gguf_kv *gguf_get(const gguf_file *g, const char *key);
const gguf_tensor *gguf_tensor_find(const gguf_file *g, const char *name);
/* The value as an integer (any integer type or bool) / a number / a string:
 * 0, or -1 when absent or of another type. */
int gguf_int(const gguf_file *g, const char *key, int64_t *out);
int gguf_num(const gguf_file *g, const char *key, double *out);
int gguf_str(const gguf_file *g, const char *key, const char **s, size_t *len);
/* Walk an array of strings: *p starts at kv->val; each call reads one string and advances. */
void gguf_next_str(const uint8_t **p, const char **s, size_t *len);
/* Element i of a numeric array, as a double. */
double gguf_arr_num(const gguf_kv *kv, uint64_t i);

/* "Q8_0", "F32", ... or NULL. */
const char *gguf_type_name(uint32_t type);
/* Elements and bytes per block of a type we read (1 and 4 for F32); -1 for the others. */
int gguf_block(uint32_t type, size_t *elems, size_t *bytes);
/* Convert n elements (a whole number of blocks) of a tensor's data to F32. */
void gguf_to_f32(uint32_t type, const uint8_t *src, float *dst, size_t n);

#endif
