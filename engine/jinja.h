/* jinja.h — the Jinja subset Hugging Face chat templates are written in
 * (internal to the engine; chat.c is its user, eng.h its public face).
 *
 * A template is parsed once into an AST and rendered any number of times
 * against a cJSON context. Semantics follow the npm package @huggingface/jinja
 * (what transformers.js renders chat templates with), quirks included: its
 * whitespace handling (trim_blocks and lstrip_blocks on, one trailing newline
 * of the template dropped), its filters and tests, undefined values that print
 * as nothing, JavaScript number formatting and == (docs/engine.md, "Chat
 * templates", lists the subset and what is refused).
 *
 * jinja.c holds the lexer and the parser, jinja_run.c the values and the
 * renderer; the AST below is shared between the two. */
#ifndef KVSERVE_JINJA_H
#define KVSERVE_JINJA_H

#include <stddef.h>
#include <stdint.h>

struct cJSON;
typedef struct eng__jinja eng__jinja;

/* Limits: a template or rendering that would pass them fails with a message. */
enum {
    ENG__JINJA_MAX_SOURCE = 4 << 20,   /* template bytes */
    ENG__JINJA_MAX_DEPTH = 200,        /* nesting of the parser, of expressions and of macro calls */
    ENG__JINJA_MAX_OUTPUT = 16 << 20,  /* bytes of the rendered text, and of any one string */
    ENG__JINJA_MAX_ITEMS = 1 << 20,    /* elements of a list (range(), +) */
};
#define ENG__JINJA_MAX_STEPS 100000000L /* nodes evaluated in one rendering */

/* Parse src[0..len) (UTF-8). ENG_OK, or ENG_EFORMAT with "line L:C: what was
 * expected", ENG_EUTF8, ENG_EUNSUPPORTED (too big), ENG_ENOMEM. */
int eng__jinja_parse(const char *src, size_t len, eng__jinja **out, char *err, size_t errlen);
/* Render against ctx (a JSON object: its keys become variables). *out is
 * malloc'd and NUL-terminated. ENG_OK, or ENG_EINVAL with the message of
 * raise_exception() or of the error ("line L:C: ..."), ENG_EUTF8 (a string of
 * ctx is not UTF-8), ENG_ENOMEM. Safe to call from several threads at once. */
int eng__jinja_render(const eng__jinja *t, const struct cJSON *ctx, char **out, size_t *len, char *err,
                      size_t errlen);
void eng__jinja_free(eng__jinja *t);

/* ---- the AST (jinja.c builds it, jinja_run.c walks it) ------------------ */
typedef enum {
    /* statements */
    JN_TEXT,        /* s: literal text */
    JN_IF,          /* a: test, l: body, l2: else (an elif is a nested JN_IF) */
    JN_FOR,         /* a: JN_NAME or JN_TUPLE target, b: iterable (JN_SELECT: a loop filter), l: body, l2: else */
    JN_SET,         /* a: target, b: value (NULL: l is a block whose text is the value) */
    JN_MACRO,       /* s: name, l: parameters (JN_NAME, JN_KWARG with a default), l2: body, op: JN_USES_* */
    JN_CALLBLOCK,   /* a: JN_CALL of the macro, l: caller()'s parameters, l2: body, op: JN_USES_* */
    JN_FILTERBLOCK, /* b: filter (JN_NAME or JN_CALL), l: body */
    JN_BREAK,
    JN_CONTINUE,
    /* expressions */
    JN_INT,         /* num */
    JN_FLOAT,       /* num */
    JN_STR,         /* s */
    JN_NAME,        /* s */
    JN_LIST,        /* l: items */
    JN_TUPLE,       /* l: items */
    JN_DICT,        /* l: keys, l2: values */
    JN_MEMBER,      /* a: object, b: property (JN_SLICE for [a:b:c]), op: 1 if computed (x[...]) */
    JN_SLICE,       /* a, b, c: start, stop, step, each may be NULL */
    JN_CALL,        /* a: callee, l: arguments (expressions, JN_KWARG, JN_SPREAD, JN_KWSPREAD) */
    JN_FILTER,      /* a: operand, b: filter (JN_NAME or JN_CALL whose callee is a JN_NAME) */
    JN_TEST,        /* a: operand, s: test name, op: 1 if negated (is not) */
    JN_UNARY,       /* op, a */
    JN_BINARY,      /* op, a, b */
    JN_TERNARY,     /* a: condition, b: if true, c: if false */
    JN_SELECT,      /* a: value, b: condition (`a if b` without else: undefined when false) */
    JN_KWARG,       /* s: name, a: value */
    JN_SPREAD,      /* a: *a */
    JN_KWSPREAD,    /* a: **a */
} jn_kind;

enum {
    JOP_ADD = 1, JOP_SUB, JOP_CAT, JOP_MUL, JOP_DIV, JOP_FLOORDIV, JOP_MOD, JOP_POW,
    JOP_EQ, JOP_NE, JOP_LT, JOP_GT, JOP_LE, JOP_GE, JOP_IN, JOP_NOTIN, JOP_AND, JOP_OR,
    JOP_NOT, JOP_NEG, JOP_POS,
};
enum { JN_USES_KWARGS = 1, JN_USES_VARARGS = 2 }; /* a macro's body reads kwargs / varargs */

typedef struct jn jn;
typedef struct {
    jn **v;
    int n;
} jn_list;

struct jn {
    jn_kind kind;
    int op;
    uint32_t pos;           /* byte offset in the template source (for line:column) */
    double num;
    const char *s;          /* bytes in the template's arena, not NUL-terminated */
    size_t n;
    jn *a, *b, *c;
    jn_list l, l2;
};

struct eng__jinja {
    jn_list body;
    char *src;              /* the source as given, for line:column */
    size_t len;
    struct jarena *arena;   /* every node and string */
};

/* 1-based line and column (in characters) of a source offset. */
void eng__jinja_where(const eng__jinja *t, uint32_t pos, int *line, int *col);

/* ---- JavaScript text rules both halves share (jinja.c) ------------------ */
/* The code point at s[0..n) (valid UTF-8) and its length in *len. */
uint32_t eng__js_cp(const char *s, size_t n, int *len);
/* JavaScript's whitespace (\s, trim()): Unicode White_Space, U+FEFF, less U+0085. */
int eng__js_space(uint32_t cp);

#endif
