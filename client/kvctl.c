/* kvctl.c — the kvserve command-line client (gRPC C core, protobuf-c).
 *
 *   kvctl [connection options] generate [options] PROMPT   stream tokens to the terminal
 *   kvctl submit [options] PROMPT | step [--wait MS] ID... | cancel ID | stats
 *   kvctl agents list | get ID | drop ID | export ID FILE | import ID FILE
 *   kvctl health [SERVICE] | load --concurrency N --requests M [options] PROMPT
 *   kvctl chat [--system TEXT] [options]                    a multi-turn chat on an agent
 */
#include "grpc/health/v1/health.pb-c.h"
#include "kvserve/v1/kvserve.pb-c.h"
#include "pbio.h"

#include <editline/readline.h>
#include <errno.h>
#include <getopt.h>
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char USAGE[] =
    "usage: kvctl [connection options] COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  generate [gen options] PROMPT     stream a generation to the terminal (usage and t/s at the end)\n"
    "  submit [gen options] PROMPT       queue a request, print its id\n"
    "  step [--wait MS] ID...            new tokens and completions of requests\n"
    "  cancel ID                         cancel a request\n"
    "  stats                             engine figures (KV blocks, running, queued)\n"
    "  score [--bos] TEXT                per-token log-probabilities and perplexity of TEXT\n"
    "  agents list | get ID | drop ID | export ID FILE | import ID FILE\n"
    "  chat [--system TEXT] [gen options]  a chat with the model on an agent (its chat template); a line\n"
    "                                    per turn, answers streamed; /reset forgets, /exit or end of input ends\n"
    "  health [SERVICE]                  grpc.health.v1 Check (exit 0 when SERVING)\n"
    "  load --concurrency N --requests M [--prompt-tokens N] [gen options] PROMPT\n"
    "                                    drive load (random prompts of N token ids if given), report throughput\n"
    "                                    --same: every request identical (prompt-cache hits)\n"
    "\n"
    "connection options:\n"
    "  --addr HOST:PORT    server (default $KVSERVE_ADDR or 127.0.0.1:50051)\n"
    "  --tls               use TLS (system roots unless --ca)\n"
    "  --ca PEM            CA certificate to verify the server (implies --tls)\n"
    "  --cert PEM --key PEM  client certificate for mTLS (implies --tls)\n"
    "  --token TOKEN       bearer token (default $KVSERVE_TOKEN)\n"
    "  --timeout S         deadline of each call in seconds (default 300)\n"
    "\n"
    "gen options:\n"
    "  -n, --max-tokens N  (default 64)   --temperature T   --top-k K   --top-p P   --min-p P\n"
    "  --repeat-penalty R   --seed S   --stop STR (repeatable)   --ignore-eos\n"
    "  --agent ID   --reset   --bos (add the tokenizer's BOS)   --quiet (no token text)\n"
    "\n"
    "Every call that names an agent also sends it as x-kvserve-agent metadata, for load balancers\n"
    "that keep an agent's turns on one replica (docs/deploy.md).\n";

typedef struct {
    const char *addr, *ca, *cert, *key, *token;
    int tls;
    double timeout;
    grpc_channel *ch;
} conn;

typedef struct {
    Kvserve__V1__GenerateRequest req;
    Kvserve__V1__Sampling sp;
    char *stops[16];
    int quiet, concurrency, requests, wait_ms, prompt_tokens, same;
    const char *system;
} genopts;

/* Connection options are accepted before and after the command. */
enum { O_ADDR = 256, O_TLS, O_CA, O_CERT, O_KEY, O_TOKEN, O_TIMEOUT };
static int conn_option(conn *c, int o) {
    switch (o) {
    case O_ADDR: c->addr = optarg; return 1;
    case O_TLS: c->tls = 1; return 1;
    case O_CA: c->ca = optarg; c->tls = 1; return 1;
    case O_CERT: c->cert = optarg; c->tls = 1; return 1;
    case O_KEY: c->key = optarg; c->tls = 1; return 1;
    case O_TOKEN: c->token = optarg; return 1;
    case O_TIMEOUT: c->timeout = atof(optarg); return 1;
    default: return 0;
    }
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int connect_(conn *c) {
    grpc_channel_credentials *cr;
    if (c->tls) {
        char *ca = NULL, *cert = NULL, *key = NULL;
        if (c->ca && !(ca = read_file(c->ca))) { fprintf(stderr, "kvctl: --ca %s: %s\n", c->ca, strerror(errno)); return -1; }
        if (c->cert && !(cert = read_file(c->cert))) { fprintf(stderr, "kvctl: --cert %s: %s\n", c->cert, strerror(errno)); return -1; }
        if (c->key && !(key = read_file(c->key))) { fprintf(stderr, "kvctl: --key %s: %s\n", c->key, strerror(errno)); return -1; }
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        cr = grpc_ssl_credentials_create(ca, cert && key ? &pair : NULL, NULL, NULL);
        free(ca);
        free(cert);
        free(key);
    } else {
        cr = grpc_insecure_credentials_create();
    }
    grpc_arg a = {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = 256 << 20};
    grpc_channel_args args = {1, &a};
    c->ch = grpc_channel_create(c->addr, cr, &args);
    grpc_channel_credentials_release(cr);
    return c->ch ? 0 : -1;
}

static const char *CODE_NAMES[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                                   "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                   "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                                   "UNAUTHENTICATED"};

/* A call in progress on its own pluck queue. */
typedef struct {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata md[2];
    char auth[600];
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    grpc_byte_buffer *recv;
} rpc;

/* The agent a request names: sent as x-kvserve-agent metadata too, so that a
 * load balancer can keep an agent's turns on one replica (docs/deploy.md).
 * Only ids a header can carry as they are (printable ASCII). */
static const char *agent_header(const ProtobufCMessage *m) {
    const char *id = NULL;
    if (m->descriptor == &kvserve__v1__generate_request__descriptor)
        id = ((const Kvserve__V1__GenerateRequest *)m)->agent_id;
    else if (m->descriptor == &kvserve__v1__agent_request__descriptor)
        id = ((const Kvserve__V1__AgentRequest *)m)->agent_id;
    else if (m->descriptor == &kvserve__v1__import_agent_request__descriptor)
        id = ((const Kvserve__V1__ImportAgentRequest *)m)->agent_id;
    if (!id || !id[0]) return NULL;
    for (const char *p = id; *p; p++)
        if (*p < 0x20 || *p > 0x7e) return NULL;
    return id;
}

static int rpc_start(conn *c, rpc *r, const char *method, const ProtobufCMessage *req) {
    memset(r, 0, sizeof *r);
    r->cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis((int64_t)(c->timeout * 1000), GPR_TIMESPAN));
    r->call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, r->cq, grpc_slice_from_static_string(method),
                                      NULL, dl, NULL);
    grpc_metadata_array_init(&r->init_md);
    grpc_metadata_array_init(&r->trail_md);
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    size_t nmd = 0;
    if (c->token) {
        snprintf(r->auth, sizeof r->auth, "Bearer %s", c->token);
        r->md[nmd].key = grpc_slice_from_static_string("authorization");
        r->md[nmd++].value = grpc_slice_from_static_string(r->auth);
    }
    const char *agent = agent_header(req);
    if (agent) {
        r->md[nmd].key = grpc_slice_from_static_string("x-kvserve-agent");
        r->md[nmd++].value = grpc_slice_from_static_string(agent);
    }
    ops[0].data.send_initial_metadata.count = nmd;
    ops[0].data.send_initial_metadata.metadata = nmd ? r->md : NULL;
    grpc_byte_buffer *bb = srv_pack(req);
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &r->init_md;
    grpc_call_error e = grpc_call_start_batch(r->call, ops, 4, (void *)1, NULL);
    grpc_event ev = grpc_completion_queue_pluck(r->cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_byte_buffer_destroy(bb);
    return e == GRPC_CALL_OK && ev.success ? 0 : -1;
}

/* Next message of the response stream, or NULL at its end. */
static ProtobufCMessage *rpc_recv(rpc *r, const ProtobufCMessageDescriptor *d) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &r->recv;
    r->recv = NULL;
    if (grpc_call_start_batch(r->call, &op, 1, (void *)2, NULL) != GRPC_CALL_OK) return NULL;
    grpc_completion_queue_pluck(r->cq, (void *)2, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (!r->recv) return NULL;
    ProtobufCMessage *m = srv_unpack(d, r->recv);
    grpc_byte_buffer_destroy(r->recv);
    r->recv = NULL;
    return m;
}

/* Finish: status code; prints "kvctl: CODE: details" when not OK. */
static int rpc_finish(rpc *r) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op.data.recv_status_on_client.trailing_metadata = &r->trail_md;
    op.data.recv_status_on_client.status = &r->status;
    op.data.recv_status_on_client.status_details = &r->details;
    if (grpc_call_start_batch(r->call, &op, 1, (void *)3, NULL) == GRPC_CALL_OK)
        grpc_completion_queue_pluck(r->cq, (void *)3, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    else r->status = GRPC_STATUS_INTERNAL;
    if (r->status != GRPC_STATUS_OK)
        fprintf(stderr, "kvctl: %s: %.*s\n", r->status <= 16 ? CODE_NAMES[r->status] : "ERROR",
                (int)GRPC_SLICE_LENGTH(r->details), (const char *)GRPC_SLICE_START_PTR(r->details));
    int st = r->status;
    grpc_slice_unref(r->details);
    grpc_metadata_array_destroy(&r->init_md);
    grpc_metadata_array_destroy(&r->trail_md);
    grpc_call_unref(r->call);
    grpc_completion_queue_shutdown(r->cq);
    while (grpc_completion_queue_pluck(r->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {}
    grpc_completion_queue_destroy(r->cq);
    return st;
}

/* One request, one reply. Returns the gRPC status; *out on OK. */
static int unary(conn *c, const char *method, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *d,
                 ProtobufCMessage **out) {
    rpc r;
    *out = NULL;
    rpc_start(c, &r, method, req);
    *out = rpc_recv(&r, d);
    int st = rpc_finish(&r);
    if (st != GRPC_STATUS_OK && *out) { protobuf_c_message_free_unpacked(*out, NULL); *out = NULL; }
    if (st == GRPC_STATUS_OK && !*out) st = GRPC_STATUS_INTERNAL;
    return st;
}

static const char *finish_name(int f) {
    static const char *n[] = {"unspecified", "stop", "length", "cancelled", "error"};
    return f >= 0 && f <= 4 ? n[f] : "?";
}

/* ---- commands ------------------------------------------------------------ */
static int cmd_generate(conn *c, genopts *g) {
    rpc r;
    double t0 = now_s(), t_first = 0;
    if (rpc_start(c, &r, "/kvserve.v1.Generation/Stream", &g->req.base)) { /* status tells why */ }
    int n = 0, ret = 1;
    Kvserve__V1__StreamEvent *ev;
    while ((ev = (Kvserve__V1__StreamEvent *)rpc_recv(&r, &kvserve__v1__stream_event__descriptor))) {
        if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN) {
            if (!n++) t_first = now_s();
            if (!g->quiet) { fputs(ev->token->text, stdout); fflush(stdout); }
        } else if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION) {
            Kvserve__V1__Completion *cp = ev->completion;
            double t = now_s();
            Kvserve__V1__Usage *u = cp->usage;
            fprintf(stderr, "\n[id %llu | finish %s | prompt %d (cached %d) | generated %d | ttft %.0f ms | %.1f t/s]%s%s\n",
                    (unsigned long long)cp->id, finish_name(cp->finish_reason), u ? u->prompt_tokens : 0,
                    u ? u->cached_tokens : 0, u ? u->generated_tokens : 0, (t_first - t0) * 1000,
                    n > 1 && t > t_first ? (n - 1) / (t - t_first) : 0.0, cp->error && cp->error[0] ? " error: " : "",
                    cp->error ? cp->error : "");
            ret = cp->finish_reason == KVSERVE__V1__FINISH_REASON__ERROR;
        }
        protobuf_c_message_free_unpacked(&ev->base, NULL);
    }
    int st = rpc_finish(&r);
    return st ? 1 : ret;
}

/* ---- chat ------------------------------------------------------------------ */
typedef struct {
    Kvserve__V1__ChatMessage **m;
    size_t n, cap;
} chat_log;

static int chat_add(chat_log *l, const char *role, const char *content) {
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 16;
        Kvserve__V1__ChatMessage **nm = realloc(l->m, nc * sizeof *nm);
        if (!nm) return -1;
        l->m = nm;
        l->cap = nc;
    }
    Kvserve__V1__ChatMessage *m = malloc(sizeof *m);
    if (!m) return -1;
    kvserve__v1__chat_message__init(m);
    m->role = strdup(role);
    m->content = strdup(content);
    if (!m->role || !m->content) { free(m->role); free(m->content); free(m); return -1; }
    l->m[l->n++] = m;
    return 0;
}

static void chat_clear(chat_log *l, size_t keep) {
    for (size_t i = keep; i < l->n; i++) { free(l->m[i]->role); free(l->m[i]->content); free(l->m[i]); }
    l->n = keep;
}

/* One turn: stream the answer to stdout; *answer (malloc'd) is its text. */
static int chat_turn(conn *c, genopts *g, chat_log *l, char **answer) {
    rpc r;
    *answer = NULL;
    g->req.messages = l->m;
    g->req.n_messages = l->n;
    if (rpc_start(c, &r, "/kvserve.v1.Generation/Stream", &g->req.base)) { /* status tells why */ }
    Kvserve__V1__StreamEvent *ev;
    int ret = 1;
    while ((ev = (Kvserve__V1__StreamEvent *)rpc_recv(&r, &kvserve__v1__stream_event__descriptor))) {
        if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN) {
            fputs(ev->token->text, stdout);
            fflush(stdout);
        } else if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_COMPLETION) {
            Kvserve__V1__Completion *cp = ev->completion;
            Kvserve__V1__Usage *u = cp->usage;
            if (!g->quiet)
                fprintf(stderr, "\n[prompt %d (cached %d%s) | generated %d | finish %s]", u ? u->prompt_tokens : 0,
                        u ? u->cached_tokens : 0, u && u->history_diverged ? ", history recomputed" : "",
                        u ? u->generated_tokens : 0, finish_name(cp->finish_reason));
            fputc('\n', stdout);
            *answer = strdup(cp->text ? cp->text : "");
            ret = cp->finish_reason == KVSERVE__V1__FINISH_REASON__ERROR;
        }
        protobuf_c_message_free_unpacked(&ev->base, NULL);
    }
    int st = rpc_finish(&r);
    return st ? 1 : ret;
}

/* A line of input: with line editing and history on a terminal. */
static char *chat_read(int tty) {
    if (tty) {
        char *line = readline("you> ");
        if (line && line[0]) add_history(line);
        return line;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, stdin);
    if (n < 0) { free(line); return NULL; }
    if (n && line[n - 1] == '\n') line[n - 1] = 0;
    return line;
}

static int cmd_chat(conn *c, genopts *g) {
    char agent[64];
    int own = !g->req.agent_id; /* an agent of our own: dropped at the end */
    if (own) {
        snprintf(agent, sizeof agent, "kvctl-chat-%ld-%ld", (long)getpid(), (long)time(NULL));
        g->req.agent_id = agent;
    }
    chat_log l = {0};
    size_t base = 0;
    if (g->system && (chat_add(&l, "system", g->system) || (base = 1, 0))) return 1;
    int tty = isatty(0), ret = 0;
    char *line;
    while ((line = chat_read(tty))) {
        if (!strcmp(line, "/exit")) { free(line); break; }
        if (!strcmp(line, "/reset")) { chat_clear(&l, base); free(line); continue; }
        if (!line[0]) { free(line); continue; }
        char *answer = NULL;
        int bad = chat_add(&l, "user", line);
        free(line);
        if (bad || chat_turn(c, g, &l, &answer) || !answer || chat_add(&l, "assistant", answer)) {
            free(answer);
            ret = 1;
            break;
        }
        free(answer);
    }
    chat_clear(&l, 0);
    free(l.m);
    if (own) { /* forget the agent */
        Kvserve__V1__AgentRequest q = KVSERVE__V1__AGENT_REQUEST__INIT;
        q.agent_id = agent;
        ProtobufCMessage *out;
        if (!unary(c, "/kvserve.v1.Agents/DropAgent", &q.base, &kvserve__v1__drop_agent_reply__descriptor, &out) && out)
            protobuf_c_message_free_unpacked(out, NULL);
    }
    return ret;
}

static int cmd_submit(conn *c, genopts *g) {
    ProtobufCMessage *out;
    int st = unary(c, "/kvserve.v1.Generation/Submit", &g->req.base, &kvserve__v1__submit_reply__descriptor, &out);
    if (st) return 1;
    printf("%llu\n", (unsigned long long)((Kvserve__V1__SubmitReply *)out)->id);
    protobuf_c_message_free_unpacked(out, NULL);
    return 0;
}

static int cmd_step(conn *c, int argc, char **argv, int wait_ms) {
    Kvserve__V1__StepRequest q = KVSERVE__V1__STEP_REQUEST__INIT;
    uint64_t ids[256];
    for (int i = 0; i < argc && i < 256; i++) ids[q.n_ids++] = strtoull(argv[i], NULL, 10);
    if (!q.n_ids) { fprintf(stderr, "kvctl: step needs request ids\n"); return 2; }
    q.ids = ids;
    q.wait_ms = (uint32_t)wait_ms;
    ProtobufCMessage *out;
    if (unary(c, "/kvserve.v1.Generation/Step", &q.base, &kvserve__v1__step_reply__descriptor, &out)) return 1;
    Kvserve__V1__StepReply *rep = (Kvserve__V1__StepReply *)out;
    for (size_t i = 0; i < rep->n_tokens; i++)
        printf("token id=%llu index=%u token=%d text=%s\n", (unsigned long long)rep->tokens[i]->id, rep->tokens[i]->index,
               rep->tokens[i]->token, rep->tokens[i]->text);
    for (size_t i = 0; i < rep->n_completions; i++) {
        Kvserve__V1__Completion *cp = rep->completions[i];
        printf("done id=%llu finish=%s prompt=%d cached=%d generated=%d text=%s\n", (unsigned long long)cp->id,
               finish_name(cp->finish_reason), cp->usage ? cp->usage->prompt_tokens : 0,
               cp->usage ? cp->usage->cached_tokens : 0, cp->usage ? cp->usage->generated_tokens : 0, cp->text);
    }
    protobuf_c_message_free_unpacked(out, NULL);
    return 0;
}

static int cmd_cancel(conn *c, const char *id) {
    Kvserve__V1__CancelRequest q = KVSERVE__V1__CANCEL_REQUEST__INIT;
    q.id = strtoull(id, NULL, 10);
    ProtobufCMessage *out;
    if (unary(c, "/kvserve.v1.Generation/Cancel", &q.base, &kvserve__v1__cancel_reply__descriptor, &out)) return 1;
    protobuf_c_message_free_unpacked(out, NULL);
    return 0;
}

static int cmd_stats(conn *c) {
    Kvserve__V1__StatsRequest q = KVSERVE__V1__STATS_REQUEST__INIT;
    ProtobufCMessage *out;
    if (unary(c, "/kvserve.v1.Generation/Stats", &q.base, &kvserve__v1__stats_reply__descriptor, &out)) return 1;
    Kvserve__V1__StatsReply *s = (Kvserve__V1__StatsReply *)out;
    printf("blocks_total %d\nblocks_free %d\nblocks_used %d\nblocks_shared %d\nblocks_cached %d\nblock_tokens %d\n"
           "running %d\nwaiting %d\nagents %d\nprefix_hit_tokens %llu\npreemptions %llu\n",
           s->blocks_total, s->blocks_free, s->blocks_used, s->blocks_shared, s->blocks_cached, s->block_tokens,
           s->running, s->waiting, s->agents, (unsigned long long)s->prefix_hit_tokens,
           (unsigned long long)s->preemptions);
    protobuf_c_message_free_unpacked(out, NULL);
    return 0;
}

/* Score: the table `kvserve score` prints (without the token pieces: the
 * client holds no tokenizer). */
static int cmd_score(conn *c, const char *text, int bos) {
    Kvserve__V1__ScoreRequest q = KVSERVE__V1__SCORE_REQUEST__INIT;
    q.text = (char *)text;
    q.add_special_tokens = bos;
    ProtobufCMessage *out;
    if (unary(c, "/kvserve.v1.Generation/Score", &q.base, &kvserve__v1__score_reply__descriptor, &out)) return 1;
    Kvserve__V1__ScoreReply *r = (Kvserve__V1__ScoreReply *)out;
    double sum = 0;
    printf("%5s %8s %12s\n", "pos", "id", "logprob");
    for (size_t i = 1; i < r->n_token_ids && i - 1 < r->n_logprobs; i++) {
        printf("%5zu %8d %12.6f\n", i, r->token_ids[i], r->logprobs[i - 1]);
        sum += r->logprobs[i - 1];
    }
    if (r->n_logprobs)
        printf("tokens %zu  mean logprob %.6f  perplexity %.4f\n", r->n_logprobs, sum / (double)r->n_logprobs,
               r->perplexity);
    protobuf_c_message_free_unpacked(out, NULL);
    return 0;
}

static void print_agent(const Kvserve__V1__AgentInfo *a) {
    printf("%s tokens=%d cached=%d blocks=%d busy=%d idle=%.1fs saved=%d\n", a->agent_id, a->tokens, a->cached_tokens,
           a->blocks, a->busy, a->idle_seconds, a->saved);
}

static int cmd_agents(conn *c, int argc, char **argv) {
    if (argc < 1) { fprintf(stderr, "kvctl: agents list|get|drop|export|import\n"); return 2; }
    const char *sub = argv[0];
    ProtobufCMessage *out;
    if (!strcmp(sub, "list")) {
        Kvserve__V1__ListAgentsRequest q = KVSERVE__V1__LIST_AGENTS_REQUEST__INIT;
        if (unary(c, "/kvserve.v1.Agents/ListAgents", &q.base, &kvserve__v1__list_agents_reply__descriptor, &out)) return 1;
        Kvserve__V1__ListAgentsReply *r = (Kvserve__V1__ListAgentsReply *)out;
        for (size_t i = 0; i < r->n_agents; i++) print_agent(r->agents[i]);
        protobuf_c_message_free_unpacked(out, NULL);
        return 0;
    }
    if (argc < 2) { fprintf(stderr, "kvctl: agents %s needs an agent id\n", sub); return 2; }
    Kvserve__V1__AgentRequest q = KVSERVE__V1__AGENT_REQUEST__INIT;
    q.agent_id = argv[1];
    if (!strcmp(sub, "get")) {
        if (unary(c, "/kvserve.v1.Agents/GetAgent", &q.base, &kvserve__v1__agent_info__descriptor, &out)) return 1;
        print_agent((Kvserve__V1__AgentInfo *)out);
    } else if (!strcmp(sub, "drop")) {
        if (unary(c, "/kvserve.v1.Agents/DropAgent", &q.base, &kvserve__v1__drop_agent_reply__descriptor, &out)) return 1;
    } else if (!strcmp(sub, "export")) {
        if (argc < 3) { fprintf(stderr, "kvctl: agents export ID FILE\n"); return 2; }
        if (unary(c, "/kvserve.v1.Agents/ExportAgent", &q.base, &kvserve__v1__export_agent_reply__descriptor, &out)) return 1;
        Kvserve__V1__ExportAgentReply *r = (Kvserve__V1__ExportAgentReply *)out;
        FILE *f = fopen(argv[2], "wb");
        int bad = !f || fwrite(r->data.data, 1, r->data.len, f) != r->data.len;
        if (f && fclose(f)) bad = 1;
        if (bad) fprintf(stderr, "kvctl: %s: %s\n", argv[2], strerror(errno));
        else fprintf(stderr, "exported %s: %zu bytes\n", argv[1], r->data.len);
        protobuf_c_message_free_unpacked(out, NULL);
        return bad;
    } else if (!strcmp(sub, "import")) {
        if (argc < 3) { fprintf(stderr, "kvctl: agents import ID FILE\n"); return 2; }
        FILE *f = fopen(argv[2], "rb");
        if (!f) { fprintf(stderr, "kvctl: %s: %s\n", argv[2], strerror(errno)); return 1; }
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *b = malloc((size_t)n + 1);
        size_t got = b ? fread(b, 1, (size_t)n, f) : 0;
        fclose(f);
        Kvserve__V1__ImportAgentRequest iq = KVSERVE__V1__IMPORT_AGENT_REQUEST__INIT;
        iq.agent_id = argv[1];
        iq.data.data = b;
        iq.data.len = got;
        int st = unary(c, "/kvserve.v1.Agents/ImportAgent", &iq.base, &kvserve__v1__agent_info__descriptor, &out);
        free(b);
        if (st) return 1;
        print_agent((Kvserve__V1__AgentInfo *)out);
    } else {
        fprintf(stderr, "kvctl: unknown agents command '%s'\n", sub);
        return 2;
    }
    protobuf_c_message_free_unpacked(out, NULL);
    return 0;
}

static int cmd_health(conn *c, const char *svc) {
    Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    q.service = (char *)(svc ? svc : "");
    ProtobufCMessage *out;
    if (unary(c, "/grpc.health.v1.Health/Check", &q.base, &grpc__health__v1__health_check_response__descriptor, &out))
        return 1;
    int st = ((Grpc__Health__V1__HealthCheckResponse *)out)->status;
    static const char *names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    printf("%s\n", st >= 0 && st <= 3 ? names[st] : "?");
    protobuf_c_message_free_unpacked(out, NULL);
    return st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? 0 : 1;
}

/* ---- load: N concurrent streams, M requests in all --------------------------- */
typedef struct {
    conn *c;
    genopts *g;
    pthread_mutex_t mu;
    int next, total, failed;
    long tokens;
    double *ttft, *lat;
    int n_ttft, n_lat;
} load_state;

static void *load_worker(void *p) {
    load_state *L = p;
    for (;;) {
        pthread_mutex_lock(&L->mu);
        int i = L->next < L->total ? L->next++ : -1;
        pthread_mutex_unlock(&L->mu);
        if (i < 0) break;
        Kvserve__V1__GenerateRequest req = L->g->req;
        Kvserve__V1__Sampling sp = L->g->sp;
        if (!L->g->same) sp.seed += (uint64_t)i; /* --same: identical requests (cache hits) */
        req.sampling = &sp;
        int32_t ids[8192];
        if (L->g->prompt_tokens > 0) { /* random ids in [3, 1000): valid for any vocab we ship */
            uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)((L->g->same ? 0 : i) + 1);
            int n = L->g->prompt_tokens < 8192 ? L->g->prompt_tokens : 8192;
            for (int k = 0; k < n; k++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                ids[k] = 3 + (int32_t)(x % 997);
            }
            req.prompt = (char *)"";
            req.prompt_ids = ids;
            req.n_prompt_ids = (size_t)n;
        }
        rpc r;
        double t0 = now_s(), tf = 0;
        rpc_start(L->c, &r, "/kvserve.v1.Generation/Stream", &req.base);
        long n = 0;
        Kvserve__V1__StreamEvent *ev;
        while ((ev = (Kvserve__V1__StreamEvent *)rpc_recv(&r, &kvserve__v1__stream_event__descriptor))) {
            if (ev->event_case == KVSERVE__V1__STREAM_EVENT__EVENT_TOKEN && !n++) tf = now_s();
            protobuf_c_message_free_unpacked(&ev->base, NULL);
        }
        int st = rpc_finish(&r);
        pthread_mutex_lock(&L->mu);
        if (st) L->failed++;
        L->tokens += n;
        if (n) L->ttft[L->n_ttft++] = (tf - t0) * 1000;
        L->lat[L->n_lat++] = (now_s() - t0) * 1000;
        pthread_mutex_unlock(&L->mu);
    }
    return NULL;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int cmd_load(conn *c, genopts *g) {
    int N = g->concurrency > 0 ? g->concurrency : 1, M = g->requests > 0 ? g->requests : N;
    load_state L = {.c = c, .g = g, .total = M};
    pthread_mutex_init(&L.mu, NULL);
    L.ttft = calloc((size_t)M, sizeof *L.ttft);
    L.lat = calloc((size_t)M, sizeof *L.lat);
    pthread_t *th = calloc((size_t)N, sizeof *th);
    double t0 = now_s();
    for (int i = 0; i < N; i++) pthread_create(&th[i], NULL, load_worker, &L);
    for (int i = 0; i < N; i++) pthread_join(th[i], NULL);
    double dt = now_s() - t0;
    qsort(L.ttft, (size_t)L.n_ttft, sizeof *L.ttft, cmp_d);
    qsort(L.lat, (size_t)L.n_lat, sizeof *L.lat, cmp_d);
    double p50 = L.n_ttft ? L.ttft[L.n_ttft / 2] : 0, p99 = L.n_ttft ? L.ttft[(L.n_ttft * 99) / 100] : 0;
    double l50 = L.n_lat ? L.lat[L.n_lat / 2] : 0, l99 = L.n_lat ? L.lat[(L.n_lat * 99) / 100] : 0;
    printf("requests %d (failed %d), concurrency %d, tokens %ld in %.2f s: %.1f tokens/s, %.2f requests/s, "
           "ttft p50 %.1f ms p99 %.1f ms, latency p50 %.2f ms p99 %.2f ms\n",
           M, L.failed, N, L.tokens, dt, L.tokens / dt, M / dt, p50, p99, l50, l99);
    free(L.ttft);
    free(L.lat);
    free(th);
    return L.failed ? 1 : 0;
}

int main(int argc, char **argv) {
    conn c = {.addr = getenv("KVSERVE_ADDR") ? getenv("KVSERVE_ADDR") : "127.0.0.1:50051",
              .token = getenv("KVSERVE_TOKEN"), .timeout = 300};
    genopts g;
    memset(&g, 0, sizeof g);
    kvserve__v1__generate_request__init(&g.req);
    kvserve__v1__sampling__init(&g.sp);
    g.req.max_tokens = 64;
    g.req.sampling = &g.sp;
    g.req.stop = g.stops;
    enum { O_TEMP = O_TIMEOUT + 1, O_TOPK, O_TOPP, O_MINP, O_RPEN, O_SEED,
           O_STOP, O_IGNORE_EOS, O_AGENT, O_RESET, O_BOS, O_QUIET, O_CONC, O_REQS, O_WAIT, O_PTOK, O_SAME, O_SYSTEM,
           O_HELP };
    static const struct option opts[] = {
        {"addr", required_argument, 0, O_ADDR}, {"tls", no_argument, 0, O_TLS}, {"ca", required_argument, 0, O_CA},
        {"cert", required_argument, 0, O_CERT}, {"key", required_argument, 0, O_KEY},
        {"token", required_argument, 0, O_TOKEN}, {"timeout", required_argument, 0, O_TIMEOUT},
        {"max-tokens", required_argument, 0, 'n'}, {"temperature", required_argument, 0, O_TEMP},
        {"top-k", required_argument, 0, O_TOPK}, {"top-p", required_argument, 0, O_TOPP},
        {"min-p", required_argument, 0, O_MINP}, {"repeat-penalty", required_argument, 0, O_RPEN},
        {"seed", required_argument, 0, O_SEED}, {"stop", required_argument, 0, O_STOP},
        {"ignore-eos", no_argument, 0, O_IGNORE_EOS}, {"agent", required_argument, 0, O_AGENT},
        {"reset", no_argument, 0, O_RESET}, {"bos", no_argument, 0, O_BOS}, {"quiet", no_argument, 0, O_QUIET},
        {"concurrency", required_argument, 0, O_CONC}, {"requests", required_argument, 0, O_REQS},
        {"wait", required_argument, 0, O_WAIT}, {"prompt-tokens", required_argument, 0, O_PTOK},
        {"same", no_argument, 0, O_SAME}, {"system", required_argument, 0, O_SYSTEM},
        {"help", no_argument, 0, O_HELP}, {0, 0, 0, 0}};
    int o;
    /* options may come before or after the command */
    while ((o = getopt_long(argc, argv, "+n:h", opts, NULL)) != -1) {
        if (conn_option(&c, o)) continue;
        switch (o) {
        case 'h': case O_HELP: fputs(USAGE, stdout); return 0;
        default: fputs("kvctl: see kvctl --help\n", stderr); return 2;
        }
    }
    if (optind >= argc) { fputs(USAGE, stderr); return 2; }
    const char *cmd = argv[optind++];
    /* command options */
    int sub_argc = argc - optind + 1;
    char **sub_argv = argv + optind - 1;
    optind = 1;
    while ((o = getopt_long(sub_argc, sub_argv, "n:h", opts, NULL)) != -1) {
        if (conn_option(&c, o)) continue;
        switch (o) {
        case 'n': g.req.max_tokens = atoi(optarg); break;
        case O_TEMP: g.sp.temperature = (float)atof(optarg); break;
        case O_TOPK: g.sp.top_k = atoi(optarg); break;
        case O_TOPP: g.sp.top_p = (float)atof(optarg); break;
        case O_MINP: g.sp.min_p = (float)atof(optarg); break;
        case O_RPEN: g.sp.repeat_penalty = (float)atof(optarg); break;
        case O_SEED: g.sp.seed = strtoull(optarg, NULL, 10); break;
        case O_STOP: if (g.req.n_stop < 16) g.stops[g.req.n_stop++] = optarg; break;
        case O_IGNORE_EOS: g.req.ignore_eos = 1; break;
        case O_AGENT: g.req.agent_id = optarg; break;
        case O_RESET: g.req.reset = 1; break;
        case O_BOS: g.req.add_special_tokens = 1; break;
        case O_QUIET: g.quiet = 1; break;
        case O_CONC: g.concurrency = atoi(optarg); break;
        case O_REQS: g.requests = atoi(optarg); break;
        case O_WAIT: g.wait_ms = atoi(optarg); break;
        case O_PTOK: g.prompt_tokens = atoi(optarg); break;
        case O_SAME: g.same = 1; break;
        case O_SYSTEM: g.system = optarg; break;
        case 'h': case O_HELP: fputs(USAGE, stdout); return 0;
        default: fputs("kvctl: see kvctl --help\n", stderr); return 2;
        }
    }
    int rest = sub_argc - optind;
    char **args = sub_argv + optind;
    grpc_init();
    int ret = 2;
    if (connect_(&c)) { fprintf(stderr, "kvctl: cannot create a channel to %s\n", c.addr); goto out; }
    if (!strcmp(cmd, "generate") || !strcmp(cmd, "submit") || !strcmp(cmd, "load")) {
        if (rest < 1) { fprintf(stderr, "kvctl: %s needs a prompt\n", cmd); goto out; }
        g.req.prompt = args[0];
        ret = !strcmp(cmd, "generate") ? cmd_generate(&c, &g) : !strcmp(cmd, "submit") ? cmd_submit(&c, &g) : cmd_load(&c, &g);
    } else if (!strcmp(cmd, "chat")) ret = cmd_chat(&c, &g);
    else if (!strcmp(cmd, "step")) ret = cmd_step(&c, rest, args, g.wait_ms);
    else if (!strcmp(cmd, "cancel")) {
        if (rest < 1) { fprintf(stderr, "kvctl: cancel ID\n"); goto out; }
        ret = cmd_cancel(&c, args[0]);
    } else if (!strcmp(cmd, "stats")) ret = cmd_stats(&c);
    else if (!strcmp(cmd, "score")) {
        if (rest < 1) { fprintf(stderr, "kvctl: score [--bos] TEXT\n"); goto out; }
        ret = cmd_score(&c, args[0], g.req.add_special_tokens);
    }
    else if (!strcmp(cmd, "agents")) ret = cmd_agents(&c, rest, args);
    else if (!strcmp(cmd, "health")) ret = cmd_health(&c, rest ? args[0] : NULL);
    else fprintf(stderr, "kvctl: unknown command '%s' (see kvctl --help)\n", cmd);
out:
    if (c.ch) grpc_channel_destroy(c.ch);
    grpc_shutdown();
    return ret;
}
