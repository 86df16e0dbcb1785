/* openai.c — OpenAI's completions and chat completions in JSON (cJSON):
 * bodies checked field by field (a bad one is a 400 naming it), mapped onto a
 * GenerateRequest; responses, stream chunks and errors built in OpenAI's
 * shapes. kvserve's own settings ride in a "kvserve" object (docs/api.md). */
#include "openai.h"

#include "pbcheck.h"

#include <grpc/status.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define MAX_STOP 16
#define DEFAULT_MAX_TOKENS_COMPLETIONS 16   /* OpenAI's default for /v1/completions */
#define DEFAULT_MAX_TOKENS_CHAT 256         /* (OpenAI's is "until the context ends") */

static int fail(oai_error *e, int status, const char *type, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static int fail(oai_error *e, int status, const char *type, const char *param, const char *code, const char *fmt, ...) {
    e->status = status;
    e->type = type;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}
#define BAD(param, ...) fail(e, 400, "invalid_request_error", param, NULL, __VA_ARGS__)

/* ---- request ------------------------------------------------------------------- */
static const cJSON *field(const cJSON *o, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

static int get_number(const cJSON *o, const char *name, double lo, double hi, double *out, oai_error *e) {
    const cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return BAD(name, "%s: must be a number", name);
    if (v->valuedouble < lo || v->valuedouble > hi) return BAD(name, "%s: must be in [%g, %g] (got %g)", name, lo, hi, v->valuedouble);
    *out = v->valuedouble;
    return 1;
}

static int get_int(const cJSON *o, const char *name, double lo, double hi, long long *out, oai_error *e) {
    const cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble != floor(v->valuedouble))
        return BAD(name, "%s: must be an integer", name);
    double d = v->valuedouble;
    if (d < lo || d > hi) return BAD(name, "%s: must be in [%.0f, %.0f] (got %.0f)", name, lo, hi, d);
    *out = (long long)d;
    return 1;
}

static int get_bool(const cJSON *o, const char *name, int *out, oai_error *e) {
    const cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsBool(v)) return BAD(name, "%s: must be true or false", name);
    *out = cJSON_IsTrue(v);
    return 1;
}

static int get_string(const cJSON *o, const char *name, const char *label, char **out, oai_error *e) {
    const cJSON *v = field(o, name);
    if (!v) return 0;
    if (!cJSON_IsString(v)) return BAD(label, "%s: must be a string", label);
    *out = v->valuestring;
    return 1;
}

/* Fields that change what OpenAI returns and kvserve does not do: refused,
 * not ignored, unless they hold their neutral value. */
static int refuse_unsupported(const cJSON *o, oai_error *e) {
    static const char *const numbers[] = {"frequency_penalty", "presence_penalty"};
    for (size_t i = 0; i < sizeof numbers / sizeof *numbers; i++) {
        double d = 0;
        if (get_number(o, numbers[i], -2, 2, &d, e) < 0) return -1;
        if (d != 0) return BAD(numbers[i], "%s: not supported (only 0); kvserve.repeat_penalty is kvserve's penalty", numbers[i]);
    }
    long long n = 1;
    if (get_int(o, "n", 1, 128, &n, e) < 0) return -1;
    if (n != 1) return BAD("n", "n: only 1 choice per request");
    if (get_int(o, "best_of", 1, 128, &n, e) < 0) return -1;
    if (field(o, "best_of") && n != 1) return BAD("best_of", "best_of: only 1");
    int echo = 0;
    if (get_bool(o, "echo", &echo, e) < 0) return -1;
    if (echo) return BAD("echo", "echo: not supported");
    static const char *const others[] = {"suffix", "logit_bias", "tools", "functions", "tool_choice", "function_call",
                                         "response_format", "audio", "modalities", "prediction"};
    for (size_t i = 0; i < sizeof others / sizeof *others; i++) {
        const cJSON *v = field(o, others[i]);
        if (!v) continue;
        if ((cJSON_IsArray(v) || cJSON_IsObject(v)) && !cJSON_GetArraySize(v)) continue;
        if (cJSON_IsString(v) && (!strcmp(v->valuestring, "none") || !strcmp(v->valuestring, "auto") ||
                                  (!strcmp(others[i], "suffix") && !v->valuestring[0])))
            continue;
        if (!strcmp(others[i], "response_format") && cJSON_IsObject(v)) {
            const cJSON *t = field(v, "type");
            if (t && cJSON_IsString(t) && !strcmp(t->valuestring, "text")) continue;
        }
        return BAD(others[i], "%s: not supported", others[i]);
    }
    return 0;
}

static int parse_stop(oai_req *r, const cJSON *o, oai_error *e) {
    const cJSON *v = field(o, "stop");
    if (!v) return 0;
    if (cJSON_IsString(v)) {
        if (!(r->stops = malloc(sizeof *r->stops))) return fail(e, 500, "server_error", NULL, NULL, "out of memory");
        r->stops[0] = v->valuestring;
        r->g.n_stop = 1;
    } else if (cJSON_IsArray(v)) {
        int n = cJSON_GetArraySize(v);
        if (n > MAX_STOP) return BAD("stop", "stop: at most %d strings", MAX_STOP);
        if (!(r->stops = calloc((size_t)(n ? n : 1), sizeof *r->stops)))
            return fail(e, 500, "server_error", NULL, NULL, "out of memory");
        const cJSON *s;
        cJSON_ArrayForEach(s, v) {
            if (!cJSON_IsString(s)) return BAD("stop", "stop: must be a string or an array of strings");
            if (s->valuestring[0]) r->stops[r->g.n_stop++] = s->valuestring;
        }
    } else {
        return BAD("stop", "stop: must be a string or an array of strings");
    }
    r->g.stop = r->stops;
    return 0;
}

static int parse_prompt(oai_req *r, const cJSON *o, oai_error *e) {
    const cJSON *v = field(o, "prompt");
    if (!v) return BAD("prompt", "prompt: required");
    if (cJSON_IsArray(v) && cJSON_GetArraySize(v) == 1 && cJSON_IsString(cJSON_GetArrayItem(v, 0)))
        v = cJSON_GetArrayItem(v, 0); /* ["text"]: one prompt */
    if (cJSON_IsString(v)) {
        if (!v->valuestring[0]) return BAD("prompt", "prompt: is empty");
        r->g.prompt = v->valuestring;
        r->g.add_special_tokens = 1; /* as Hugging Face-served completions do */
        return 0;
    }
    if (!cJSON_IsArray(v)) return BAD("prompt", "prompt: must be a string or an array of token ids");
    int n = cJSON_GetArraySize(v);
    if (n == 0) return BAD("prompt", "prompt: is empty");
    const cJSON *x;
    cJSON_ArrayForEach(x, v) if (!cJSON_IsNumber(x)) return BAD("prompt", "prompt: one prompt per request (a string or an array of token ids)");
    if (!(r->g.prompt_ids = malloc((size_t)n * sizeof *r->g.prompt_ids)))
        return fail(e, 500, "server_error", NULL, NULL, "out of memory");
    cJSON_ArrayForEach(x, v) {
        double d = x->valuedouble;
        if (d != floor(d) || d < 0 || d > 2147483647.0) return BAD("prompt", "prompt: token ids are integers >= 0");
        r->g.prompt_ids[r->g.n_prompt_ids++] = (int32_t)d;
    }
    return 0;
}

/* A message's content: a string, null, or text parts (joined). */
static int content_of(oai_req *r, const cJSON *m, int i, char **out, oai_error *e) {
    char label[64];
    snprintf(label, sizeof label, "messages[%d].content", i);
    const cJSON *c = field(m, "content");
    if (!c) { *out = ""; return 0; }
    if (cJSON_IsString(c)) { *out = c->valuestring; return 0; }
    if (!cJSON_IsArray(c)) return BAD(label, "%s: must be a string or an array of text parts", label);
    size_t len = 0;
    const cJSON *p;
    int j = 0;
    cJSON_ArrayForEach(p, c) {
        const cJSON *t = field(p, "type"), *tx = field(p, "text");
        if (!cJSON_IsObject(p) || !t || !cJSON_IsString(t) || strcmp(t->valuestring, "text") || !tx || !cJSON_IsString(tx))
            return BAD(label, "%s[%d]: only {\"type\": \"text\", \"text\": ...} parts are supported", label, j);
        len += strlen(tx->valuestring);
        j++;
    }
    char *s = malloc(len + 1), **np = realloc(r->parts, (r->n_parts + 1) * sizeof *np);
    if (np) r->parts = np;
    if (!s || !np) { free(s); return fail(e, 500, "server_error", NULL, NULL, "out of memory"); }
    r->parts[r->n_parts++] = s;
    s[0] = 0;
    cJSON_ArrayForEach(p, c) strcat(s, field(p, "text")->valuestring);
    *out = s;
    return 0;
}

static int parse_messages(oai_req *r, const cJSON *o, oai_error *e) {
    const cJSON *v = field(o, "messages");
    if (!v) return BAD("messages", "messages: required");
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0) return BAD("messages", "messages: must be a non-empty array");
    int n = cJSON_GetArraySize(v);
    r->msgs = calloc((size_t)n, sizeof *r->msgs);
    r->msgp = calloc((size_t)n, sizeof *r->msgp);
    if (!r->msgs || !r->msgp) return fail(e, 500, "server_error", NULL, NULL, "out of memory");
    const cJSON *m;
    int i = 0;
    cJSON_ArrayForEach(m, v) {
        char label[64];
        snprintf(label, sizeof label, "messages[%d]", i);
        if (!cJSON_IsObject(m)) return BAD(label, "%s: must be an object with role and content", label);
        kvserve__v1__chat_message__init(&r->msgs[i]);
        snprintf(label, sizeof label, "messages[%d].role", i);
        char *role = NULL;
        if (get_string(m, "role", label, &role, e) < 0) return -1;
        if (!role || !role[0]) return BAD(label, "%s: required", label);
        r->msgs[i].role = role;
        if (content_of(r, m, i, &r->msgs[i].content, e)) return -1;
        r->msgp[i] = &r->msgs[i];
        i++;
    }
    r->g.messages = r->msgp;
    r->g.n_messages = (size_t)n;
    return 0;
}

/* "kvserve": {agent_id, reset, namespace, cache, cache_ttl_seconds, top_k, min_p, repeat_penalty,
 * repeat_last_n, ignore_eos, add_special_tokens} */
static int parse_extensions(oai_req *r, const cJSON *o, oai_error *e) {
    const cJSON *k = field(o, "kvserve");
    if (!k) return 0;
    if (!cJSON_IsObject(k)) return BAD("kvserve", "kvserve: must be an object");
    int b;
    long long n;
    double d;
    if (get_string(k, "agent_id", "kvserve.agent_id", &r->g.agent_id, e) < 0) return -1;
    if (get_string(k, "namespace", "kvserve.namespace", &r->g.namespace_, e) < 0) return -1;
    if (get_bool(k, "reset", &b, e) < 0) return -1;
    if (field(k, "reset")) r->g.reset = b;
    if (get_bool(k, "ignore_eos", &b, e) < 0) return -1;
    if (field(k, "ignore_eos")) r->g.ignore_eos = b;
    if (get_bool(k, "add_special_tokens", &b, e) < 0) return -1;
    if (field(k, "add_special_tokens")) r->g.add_special_tokens = b;
    char *mode = NULL;
    if (get_string(k, "cache", "kvserve.cache", &mode, e) < 0) return -1;
    if (mode) {
        if (!strcmp(mode, "default")) r->cache.mode = KVSERVE__V1__CACHE_POLICY__MODE__DEFAULT;
        else if (!strcmp(mode, "bypass")) r->cache.mode = KVSERVE__V1__CACHE_POLICY__MODE__BYPASS;
        else if (!strcmp(mode, "refresh")) r->cache.mode = KVSERVE__V1__CACHE_POLICY__MODE__REFRESH;
        else return BAD("kvserve.cache", "kvserve.cache: default, bypass or refresh (got \"%s\")", mode);
        r->g.cache = &r->cache;
    }
    if (get_int(k, "cache_ttl_seconds", 0, 4294967295.0, &n, e) < 0) return -1;
    if (field(k, "cache_ttl_seconds")) { r->cache.ttl_seconds = (uint32_t)n; r->g.cache = &r->cache; }
    if (get_int(k, "top_k", 0, 1e9, &n, e) < 0) return -1;
    if (field(k, "top_k")) r->sp.top_k = (int32_t)n;
    if (get_number(k, "min_p", 0, 1, &d, e) < 0) return -1;
    if (field(k, "min_p")) r->sp.min_p = (float)d;
    if (get_number(k, "repeat_penalty", 0, 100, &d, e) < 0) return -1;
    if (field(k, "repeat_penalty")) r->sp.repeat_penalty = (float)d;
    if (get_int(k, "repeat_last_n", 0, 1e9, &n, e) < 0) return -1;
    if (field(k, "repeat_last_n")) r->sp.repeat_last_n = (int32_t)n;
    return 0;
}

int srv__oai_parse(oai_kind kind, const char *body, size_t len, const char *model_name, oai_req *r, oai_error *e) {
    memset(r, 0, sizeof *r);
    memset(e, 0, sizeof *e);
    r->kind = kind;
    kvserve__v1__generate_request__init(&r->g);
    kvserve__v1__sampling__init(&r->sp);
    kvserve__v1__cache_policy__init(&r->cache);
    const char *why = srv__utf8_problem((const uint8_t *)body, len);
    if (why[0]) return BAD(NULL, "the body %s", why);
    const cJSON *o = r->json = cJSON_ParseWithLength(body, len);
    if (!o) return BAD(NULL, "the body is not valid JSON (near byte %ld)", (long)(cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() - body : 0));
    if (!cJSON_IsObject(o)) return BAD(NULL, "the body must be a JSON object");
    char *model = NULL;
    if (get_string(o, "model", "model", &model, e) < 0) return -1;
    if (!model || !model[0]) return BAD("model", "model: required (GET /v1/models lists \"%s\")", model_name);
    if (strcmp(model, model_name))
        return fail(e, 404, "invalid_request_error", "model", "model_not_found",
                    "The model `%.200s` does not exist; this server serves `%.200s`", model, model_name);
    snprintf(r->model, sizeof r->model, "%s", model);
    if (refuse_unsupported(o, e)) return -1;
    if (kind == OAI_COMPLETIONS ? parse_prompt(r, o, e) : parse_messages(r, o, e)) return -1;
    long long n = 0;
    int have = get_int(o, "max_completion_tokens", 1, 1 << 30, &n, e);
    if (have < 0) return -1;
    if (!have && (have = get_int(o, "max_tokens", 1, 1 << 30, &n, e)) < 0) return -1;
    r->g.max_tokens = have ? (int32_t)n : kind == OAI_CHAT ? DEFAULT_MAX_TOKENS_CHAT : DEFAULT_MAX_TOKENS_COMPLETIONS;
    double t = 1.0, p = 1.0;
    if (get_number(o, "temperature", 0, 2, &t, e) < 0 || get_number(o, "top_p", 0, 1, &p, e) < 0) return -1;
    if (p <= 0) return BAD("top_p", "top_p: must be in (0, 1]");
    r->sp.temperature = (float)t;
    r->sp.top_p = (float)p;
    long long seed = 0;
    int has_seed = get_int(o, "seed", -9.2e18, 9.2e18, &seed, e);
    if (has_seed < 0) return -1;
    if (has_seed) r->sp.seed = (uint64_t)seed;
    else if (t > 0 && getrandom(&r->sp.seed, sizeof r->sp.seed, 0) != (ssize_t)sizeof r->sp.seed)
        r->sp.seed = (uint64_t)(uintptr_t)r ^ (uint64_t)len; /* (no entropy: any seed will do) */
    r->g.sampling = &r->sp;
    if (parse_stop(r, o, e)) return -1;
    if (kind == OAI_COMPLETIONS) {
        long long lp = 0;
        int has = get_int(o, "logprobs", 0, 5, &lp, e);
        if (has < 0) return -1;
        r->g.logprobs = has;
        r->g.top_logprobs = r->top_logprobs = (int32_t)lp;
    } else {
        int lp = 0;
        long long top = 0;
        if (get_bool(o, "logprobs", &lp, e) < 0 || get_int(o, "top_logprobs", 0, 20, &top, e) < 0) return -1;
        if (top && !lp) return BAD("top_logprobs", "top_logprobs: needs logprobs: true");
        r->g.logprobs = lp;
        r->g.top_logprobs = r->top_logprobs = (int32_t)top;
    }
    if (get_bool(o, "stream", &r->stream, e) < 0) return -1;
    const cJSON *so = field(o, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so)) return BAD("stream_options", "stream_options: must be an object");
        if (!r->stream) return BAD("stream_options", "stream_options: only with stream: true");
        if (get_bool(so, "include_usage", &r->include_usage, e) < 0) return -1;
    }
    char *user = NULL;
    if (get_string(o, "user", "user", &user, e) < 0) return -1; /* (accepted; kvserve's tenant is the token's) */
    return parse_extensions(r, o, e);
}

void srv__oai_req_free(oai_req *r) {
    if (!r) return;
    cJSON_Delete(r->json);
    free(r->g.prompt_ids);
    free(r->msgs);
    free(r->msgp);
    free(r->stops);
    for (size_t i = 0; i < r->n_parts; i++) free(r->parts[i]);
    free(r->parts);
    memset(r, 0, sizeof *r);
}

/* ---- errors ---------------------------------------------------------------------- */
void srv__oai_error_of_status(int code, const char *msg, oai_error *e) {
    memset(e, 0, sizeof *e);
    snprintf(e->message, sizeof e->message, "%s", msg && msg[0] ? msg : "error");
    switch (code) {
    case GRPC_STATUS_INVALID_ARGUMENT: case GRPC_STATUS_FAILED_PRECONDITION: case GRPC_STATUS_ALREADY_EXISTS:
    case GRPC_STATUS_OUT_OF_RANGE:
        e->status = 400, e->type = "invalid_request_error";
        break;
    case GRPC_STATUS_UNAUTHENTICATED: e->status = 401, e->type = "authentication_error"; break;
    case GRPC_STATUS_PERMISSION_DENIED: e->status = 403, e->type = "permission_error"; break;
    case GRPC_STATUS_NOT_FOUND: e->status = 404, e->type = "not_found_error"; break;
    case GRPC_STATUS_RESOURCE_EXHAUSTED: e->status = 429, e->type = "rate_limit_error"; break;
    case GRPC_STATUS_UNAVAILABLE: e->status = 503, e->type = "service_unavailable"; break;
    case GRPC_STATUS_DEADLINE_EXCEEDED: e->status = 504, e->type = "timeout"; break;
    default: e->status = 500, e->type = "server_error"; break;
    }
    if (e->status == 400) { /* the gRPC layer's messages start with the field */
        static const char *const fields[] = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
                                             "messages", "prompt", "logprobs", "top_logprobs", "agent_id",
                                             "repeat_penalty", "namespace"};
        for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
            size_t n = strlen(fields[i]);
            if (!strncmp(e->message, fields[i], n) && (e->message[n] == ':' || e->message[n] == ' ' || !e->message[n])) {
                snprintf(e->param, sizeof e->param, "%s", fields[i]);
                break;
            }
        }
    }
}

static cJSON *error_obj(const oai_error *e) {
    cJSON *o = cJSON_CreateObject(), *x = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(x, "message", e->message);
    cJSON_AddStringToObject(x, "type", e->type ? e->type : "server_error");
    if (e->param[0]) cJSON_AddStringToObject(x, "param", e->param);
    else cJSON_AddNullToObject(x, "param");
    if (e->code[0]) cJSON_AddStringToObject(x, "code", e->code);
    else cJSON_AddNullToObject(x, "code");
    return o;
}

static char *print_free(cJSON *o) {
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return s;
}

char *srv__oai_error_json(const oai_error *e) { return print_free(error_obj(e)); }

/* "data: JSON\n\n" + more (malloc'd), consuming json. */
static char *sse(char *json, const char *more) {
    if (!json) return NULL;
    size_t n = strlen(json) + strlen(more) + 16;
    char *s = malloc(n);
    if (s) snprintf(s, n, "data: %s\n\n%s", json, more);
    free(json);
    return s;
}

char *srv__oai_stream_error(const oai_error *e) { return sse(srv__oai_error_json(e), "data: [DONE]\n\n"); }

/* ---- responses ------------------------------------------------------------------- */
/* Completions' logprobs: four parallel arrays, filled by add_logprobs(). */
static cJSON *completions_lp(void) {
    cJSON *lp = cJSON_CreateObject();
    cJSON_AddArrayToObject(lp, "tokens");
    cJSON_AddArrayToObject(lp, "token_logprobs");
    cJSON_AddArrayToObject(lp, "top_logprobs");
    cJSON_AddArrayToObject(lp, "text_offset");
    return lp;
}

void srv__oai_resp_init(oai_resp *o, const oai_req *r, unsigned long long id, long created) {
    memset(o, 0, sizeof *o);
    o->req = r;
    snprintf(o->id, sizeof o->id, "%s-%llx", r->kind == OAI_CHAT ? "chatcmpl" : "cmpl", id);
    o->created = created;
    if (r->g.logprobs && !r->stream) {
        if (r->kind == OAI_CHAT) o->lp = cJSON_CreateArray();
        else o->lp = completions_lp();
    }
}

void srv__oai_resp_free(oai_resp *o) {
    free(o->text);
    cJSON_Delete(o->lp);
    memset(o, 0, sizeof *o);
}

/* A token's bytes as a JSON string: valid UTF-8 kept, anything else U+FFFD. */
static char *clean(const uint8_t *p, size_t n) {
    char *s = malloc(3 * n + 1), *q = s;
    if (!s) return NULL;
    for (size_t i = 0; i < n;) {
        size_t k = 1;
        uint8_t c = p[i];
        size_t need = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        if (need && i + need <= n && !srv__utf8_problem(p + i, need)[0]) k = need;
        else need = 0;
        if (need) memcpy(q, p + i, k), q += k;
        else memcpy(q, "\xef\xbf\xbd", 3), q += 3;
        i += k;
    }
    *q = 0;
    return s;
}

/* A logprob as JSON, to the last bit (cJSON's own printing rounds to 15
 * digits when they come close enough); never inf or NaN, which JSON lacks. */
static cJSON *lp_number(double v) {
    char b[40];
    snprintf(b, sizeof b, "%.17g", isfinite(v) ? v : -9999.0);
    return cJSON_CreateRaw(b);
}

static cJSON *bytes_array(const uint8_t *p, size_t n) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(p[i]));
    return a;
}

static cJSON *lp_entry(const uint8_t *piece, size_t n, double lp) {
    cJSON *x = cJSON_CreateObject();
    char *s = clean(piece, n);
    cJSON_AddStringToObject(x, "token", s ? s : "");
    free(s);
    cJSON_AddItemToObject(x, "logprob", lp_number(lp));
    cJSON_AddItemToObject(x, "bytes", bytes_array(piece, n));
    return x;
}

/* The logprobs of one token in the shape of the request's API, added to dst
 * (chat: an array of entries; completions: the four parallel arrays). */
static void add_logprobs(const oai_resp *o, cJSON *dst, const Kvserve__V1__TokenEvent *t, size_t text_offset) {
    if (o->req->kind == OAI_CHAT) {
        cJSON *x = lp_entry(t->piece.data, t->piece.len, t->logprob), *top = cJSON_AddArrayToObject(x, "top_logprobs");
        for (size_t k = 0; k < t->n_top_logprobs; k++)
            cJSON_AddItemToArray(top, lp_entry(t->top_logprobs[k]->piece.data, t->top_logprobs[k]->piece.len,
                                               t->top_logprobs[k]->logprob));
        cJSON_AddItemToArray(dst, x);
        return;
    }
    char *s = clean(t->piece.data, t->piece.len);
    cJSON_AddItemToArray(cJSON_GetObjectItem(dst, "tokens"), cJSON_CreateString(s ? s : ""));
    free(s);
    cJSON_AddItemToArray(cJSON_GetObjectItem(dst, "token_logprobs"), lp_number(t->logprob));
    cJSON *top = cJSON_CreateObject();
    for (size_t k = 0; k < t->n_top_logprobs; k++) {
        char *ts = clean(t->top_logprobs[k]->piece.data, t->top_logprobs[k]->piece.len);
        if (ts && !cJSON_GetObjectItemCaseSensitive(top, ts)) cJSON_AddItemToObject(top, ts, lp_number(t->top_logprobs[k]->logprob));
        free(ts);
    }
    cJSON_AddItemToArray(cJSON_GetObjectItem(dst, "top_logprobs"), top);
    cJSON_AddItemToArray(cJSON_GetObjectItem(dst, "text_offset"), cJSON_CreateNumber((double)text_offset));
}

static cJSON *chunk_head(const oai_resp *o) {
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "id", o->id);
    cJSON_AddStringToObject(c, "object", o->req->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion");
    cJSON_AddNumberToObject(c, "created", (double)o->created);
    cJSON_AddStringToObject(c, "model", o->req->model);
    return c;
}

char *srv__oai_chat_start(const oai_resp *o) {
    cJSON *c = chunk_head(o), *ch = cJSON_AddArrayToObject(c, "choices"), *x = cJSON_CreateObject();
    cJSON_AddNumberToObject(x, "index", 0);
    cJSON *d = cJSON_AddObjectToObject(x, "delta");
    cJSON_AddStringToObject(d, "role", "assistant");
    cJSON_AddStringToObject(d, "content", "");
    cJSON_AddNullToObject(x, "logprobs");
    cJSON_AddNullToObject(x, "finish_reason");
    cJSON_AddItemToArray(ch, x);
    return sse(print_free(c), "");
}

char *srv__oai_token(oai_resp *o, const Kvserve__V1__TokenEvent *t) {
    size_t tl = t->text ? strlen(t->text) : 0, offset = o->text_len;
    if (o->text_len + tl + 1 > o->text_cap) {
        size_t nc = (o->text_len + tl + 1) * 2;
        char *nt = realloc(o->text, nc);
        if (!nt) return NULL;
        o->text = nt;
        o->text_cap = nc;
    }
    memcpy(o->text + o->text_len, t->text ? t->text : "", tl);
    o->text_len += tl;
    o->text[o->text_len] = 0;
    o->n_tokens++;
    const oai_req *r = o->req;
    if (!r->stream) {
        if (o->lp) add_logprobs(o, o->lp, t, offset);
        return NULL;
    }
    if (!tl && !r->g.logprobs) return NULL;
    cJSON *c = chunk_head(o), *ch = cJSON_AddArrayToObject(c, "choices"), *x = cJSON_CreateObject();
    cJSON_AddNumberToObject(x, "index", 0);
    if (r->kind == OAI_CHAT) cJSON_AddStringToObject(cJSON_AddObjectToObject(x, "delta"), "content", t->text ? t->text : "");
    else cJSON_AddStringToObject(x, "text", t->text ? t->text : "");
    if (r->g.logprobs) {
        cJSON *lp;
        if (r->kind == OAI_CHAT) {
            lp = cJSON_CreateObject();
            add_logprobs(o, cJSON_AddArrayToObject(lp, "content"), t, offset);
        } else {
            lp = completions_lp();
            add_logprobs(o, lp, t, offset);
        }
        cJSON_AddItemToObject(x, "logprobs", lp);
    } else {
        cJSON_AddNullToObject(x, "logprobs");
    }
    cJSON_AddNullToObject(x, "finish_reason");
    cJSON_AddItemToArray(ch, x);
    return sse(print_free(c), "");
}

static const char *finish_name(Kvserve__V1__FinishReason f) {
    return f == KVSERVE__V1__FINISH_REASON__STOP ? "stop" : f == KVSERVE__V1__FINISH_REASON__LENGTH ? "length" : "stop";
}

static cJSON *usage_obj(const Kvserve__V1__Completion *c) {
    cJSON *u = cJSON_CreateObject();
    int p = c->usage ? c->usage->prompt_tokens : 0, g = c->usage ? c->usage->generated_tokens : 0;
    cJSON_AddNumberToObject(u, "prompt_tokens", p);
    cJSON_AddNumberToObject(u, "completion_tokens", g);
    cJSON_AddNumberToObject(u, "total_tokens", p + g);
    cJSON_AddNumberToObject(cJSON_AddObjectToObject(u, "prompt_tokens_details"), "cached_tokens",
                            c->usage ? c->usage->cached_tokens : 0);
    return u;
}

char *srv__oai_finish(oai_resp *o, const Kvserve__V1__Completion *c) {
    const oai_req *r = o->req;
    const char *fin = finish_name(c->finish_reason);
    if (r->stream) {
        cJSON *k = chunk_head(o), *ch = cJSON_AddArrayToObject(k, "choices"), *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "index", 0);
        if (r->kind == OAI_CHAT) cJSON_AddObjectToObject(x, "delta");
        else cJSON_AddStringToObject(x, "text", "");
        cJSON_AddNullToObject(x, "logprobs");
        cJSON_AddStringToObject(x, "finish_reason", fin);
        cJSON_AddItemToArray(ch, x);
        char *last = print_free(k), *usage = NULL;
        if (r->include_usage) {
            cJSON *u = chunk_head(o);
            cJSON_AddArrayToObject(u, "choices");
            cJSON_AddItemToObject(u, "usage", usage_obj(c));
            usage = sse(print_free(u), "data: [DONE]\n\n");
        }
        char *s = sse(last, usage ? usage : "data: [DONE]\n\n");
        free(usage);
        return s;
    }
    cJSON *k = cJSON_CreateObject();
    cJSON_AddStringToObject(k, "id", o->id);
    cJSON_AddStringToObject(k, "object", r->kind == OAI_CHAT ? "chat.completion" : "text_completion");
    cJSON_AddNumberToObject(k, "created", (double)o->created);
    cJSON_AddStringToObject(k, "model", r->model);
    cJSON *ch = cJSON_AddArrayToObject(k, "choices"), *x = cJSON_CreateObject();
    cJSON_AddNumberToObject(x, "index", 0);
    const char *text = c->text ? c->text : "";
    if (r->kind == OAI_CHAT) {
        cJSON *m = cJSON_AddObjectToObject(x, "message");
        cJSON_AddStringToObject(m, "role", "assistant");
        cJSON_AddStringToObject(m, "content", text);
    } else {
        cJSON_AddStringToObject(x, "text", text);
    }
    if (o->lp) {
        if (r->kind == OAI_CHAT) {
            cJSON *lp = cJSON_AddObjectToObject(x, "logprobs");
            cJSON_AddItemToObject(lp, "content", o->lp);
        } else {
            cJSON_AddItemToObject(x, "logprobs", o->lp);
        }
        o->lp = NULL;
    } else {
        cJSON_AddNullToObject(x, "logprobs");
    }
    cJSON_AddStringToObject(x, "finish_reason", fin);
    cJSON_AddItemToArray(ch, x);
    cJSON_AddItemToObject(k, "usage", usage_obj(c));
    return print_free(k);
}
