/* openai.h — the OpenAI-compatible HTTP API's JSON (internal to server/):
 * request bodies of /v1/completions and /v1/chat/completions to a
 * GenerateRequest, and kvserve's events back to OpenAI's response objects,
 * stream chunks and errors. No I/O here (http.c serves them). */
#ifndef KVSERVE_OPENAI_H
#define KVSERVE_OPENAI_H

#include "kvserve/v1/kvserve.pb-c.h"

#include <cjson/cJSON.h>
#include <stddef.h>

typedef enum { OAI_COMPLETIONS, OAI_CHAT } oai_kind;

/* A parsed request. g's strings point into `json` (alive until
 * srv__oai_req_free). */
typedef struct oai_req {
    oai_kind kind;
    cJSON *json;
    Kvserve__V1__GenerateRequest g;
    Kvserve__V1__Sampling sp;
    Kvserve__V1__CachePolicy cache;
    Kvserve__V1__ChatMessage *msgs, **msgp;
    char **stops;
    char **parts;                /* chat contents joined from text parts (malloc'd) */
    size_t n_parts;
    int stream, include_usage;
    int top_logprobs;            /* completions' integer logprobs; chat's top_logprobs */
    char model[256];
} oai_req;

/* An error in OpenAI's shape. */
typedef struct oai_error {
    int status;                  /* HTTP status */
    const char *type;            /* invalid_request_error, authentication_error, ... */
    char param[64];              /* the field, or "" */
    char code[64];               /* e.g. model_not_found, or "" */
    char message[512];
} oai_error;

/* Parse a body. model_name: what GET /v1/models lists (a request naming
 * another model is 404 model_not_found). 0, or -1 with *e filled. */
int srv__oai_parse(oai_kind kind, const char *body, size_t len, const char *model_name, oai_req *r, oai_error *e);
void srv__oai_req_free(oai_req *r);

/* An error of the gRPC layer (status code and its message) in OpenAI's terms. */
void srv__oai_error_of_status(int grpc_code, const char *msg, oai_error *e);
/* {"error": {...}} (malloc'd). */
char *srv__oai_error_json(const oai_error *e);

/* The response being built: text, tokens and their logprobs as they come. */
typedef struct oai_resp {
    const oai_req *req;
    char id[64];
    long created;
    char *text;
    size_t text_len, text_cap;
    cJSON *lp;                   /* chat: logprobs.content; completions: the logprobs object */
    size_t n_tokens;
} oai_resp;

void srv__oai_resp_init(oai_resp *o, const oai_req *r, unsigned long long id, long created);
void srv__oai_resp_free(oai_resp *o);
/* A token: appended to the text (and logprobs). With `stream`, returns the
 * SSE chunk for it ("data: {...}\n\n", malloc'd; NULL when its text is
 * empty and no logprobs are asked), else NULL. */
char *srv__oai_token(oai_resp *o, const Kvserve__V1__TokenEvent *t);
/* The first chunk of a chat stream (the assistant role). */
char *srv__oai_chat_start(const oai_resp *o);
/* The end: the whole response object (not streaming) or the last chunk(s)
 * and "data: [DONE]" (streaming), malloc'd. */
char *srv__oai_finish(oai_resp *o, const Kvserve__V1__Completion *c);
/* "data: {error}\n\n" for a stream that fails after it started. */
char *srv__oai_stream_error(const oai_error *e);

#endif
