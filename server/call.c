/* call.c — calls over the C core: references, batches, replies, the send
 * queue of streams. Every call is a small state machine with a reference
 * count: one reference per operation in flight plus one for whoever may
 * still push to it; the last reference frees it. */
#include "internal.h"

void srv__cq_dispatch(call *c, void (*fn)(call *, int), tag *t) {
    t->fn = fn;
    t->c = c;
}

call *srv__call_new(srv *s, int mi) {
    call *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->s = s;
    c->mi = mi;
    c->refs = 1;
    pthread_mutex_init(&c->mu, NULL);
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    return c;
}

void srv__call_ref(call *c) {
    pthread_mutex_lock(&c->mu);
    c->refs++;
    pthread_mutex_unlock(&c->mu);
}

void srv__call_unref(call *c) {
    pthread_mutex_lock(&c->mu);
    int left = --c->refs;
    pthread_mutex_unlock(&c->mu);
    if (left) return;
    if (c->has_eng) { /* a Stream counts as in flight until its status is out */
        pthread_mutex_lock(&c->s->mu);
        c->s->active_calls--;
        pthread_mutex_unlock(&c->s->mu);
    }
    for (outmsg *m = c->qh, *n; m; m = n) {
        n = m->next;
        grpc_byte_buffer_destroy(m->bb);
        free(m);
    }
    if (c->payload) grpc_byte_buffer_destroy(c->payload);
    if (c->recv_bb) grpc_byte_buffer_destroy(c->recv_bb);
    if (c->fin_set) grpc_slice_unref(c->fin_details);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->gc) grpc_call_unref(c->gc);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Unary (or early) answer: initial metadata, optional message, status. */
static void on_final(call *c, int ok) {
    (void)ok;
    srv__call_unref(c);
}


void srv__count_call(call *c, grpc_status_code code) {
    pthread_mutex_lock(&c->mu);
    int first = !c->counted;
    c->counted = 1;
    pthread_mutex_unlock(&c->mu);
    if (first) srv_metrics_request(c->s->metrics, srv__method_name(c), (int)code, srv__now_s() - c->t_start);
}

void srv__finish_call(call *c, grpc_status_code code, const char *msg, const ProtobufCMessage *reply) {
    srv__count_call(c, code);
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    int n = 0;
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    grpc_byte_buffer *bb = NULL;
    if (code == GRPC_STATUS_OK && reply) {
        bb = srv_pack(reply);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = bb;
    }
    pthread_mutex_lock(&c->mu);
    c->status_started = 1;
    c->fin_code = code;
    c->fin_details = grpc_slice_from_copied_string(msg ? msg : "");
    c->fin_set = 1;
    pthread_mutex_unlock(&c->mu);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details = &c->fin_details;
    if (!c->close_started) {
        ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        ops[n++].data.recv_close_on_server.cancelled = &c->close_cancelled;
    }
    srv__cq_dispatch(c, on_final, &c->t_final);
    if (grpc_call_start_batch(c->gc, ops, (size_t)n, &c->t_final, NULL) != GRPC_CALL_OK) srv__call_unref(c);
    if (bb) grpc_byte_buffer_destroy(bb);
}

void srv__finish_errorf(call *c, grpc_status_code code, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    srv__finish_call(c, code, msg, NULL);
}

/* ---- streaming: one send in flight, status after the last message ---------- */
static void stream_kick(call *c); /* with c->mu held */

static void on_send(call *c, int ok) {
    pthread_mutex_lock(&c->mu);
    c->sending = 0;
    if (!ok) c->broken = 1;
    stream_kick(c);
    pthread_mutex_unlock(&c->mu);
    srv__call_unref(c);
}

static void on_status_sent(call *c, int ok) {
    (void)ok;
    srv__call_unref(c);
}

static void stream_kick(call *c) {
    if (c->sending || c->status_started) return;
    if (c->qh && !c->broken) {
        outmsg *m = c->qh;
        c->qh = m->next;
        if (!c->qh) c->qt = NULL;
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_SEND_MESSAGE;
        op.data.send_message.send_message = m->bb;
        c->sending = 1;
        c->refs++;
        srv__cq_dispatch(c, on_send, &c->t_send);
        if (grpc_call_start_batch(c->gc, &op, 1, &c->t_send, NULL) != GRPC_CALL_OK) {
            c->sending = 0;
            c->broken = 1;
            c->refs--;
        }
        grpc_byte_buffer_destroy(m->bb);
        free(m);
        return;
    }
    if (c->finishing && (!c->qh || c->broken)) {
        grpc_op op;
        memset(&op, 0, sizeof op);
        c->status_started = 1;
        op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        op.data.send_status_from_server.status = c->fin_code;
        op.data.send_status_from_server.status_details = &c->fin_details;
        c->refs++;
        srv__cq_dispatch(c, on_status_sent, &c->t_final);
        if (grpc_call_start_batch(c->gc, &op, 1, &c->t_final, NULL) != GRPC_CALL_OK) c->refs--;
    }
}


/* Send initial metadata and watch for the end of the call. */
void srv__stream_begin(call *c) {
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[1].data.recv_close_on_server.cancelled = &c->close_cancelled;
    c->close_started = 1;
    srv__call_ref(c);
    srv__cq_dispatch(c, srv__on_close, &c->t_close);
    if (grpc_call_start_batch(c->gc, ops, 2, &c->t_close, NULL) != GRPC_CALL_OK) srv__call_unref(c);
}

void srv__stream_push(call *c, const ProtobufCMessage *m) {
    outmsg *o = malloc(sizeof *o);
    if (!o) return;
    o->bb = srv_pack(m);
    o->next = NULL;
    pthread_mutex_lock(&c->mu);
    if (c->broken || c->finishing) {
        grpc_byte_buffer_destroy(o->bb);
        free(o);
    } else {
        if (c->qt) c->qt->next = o; else c->qh = o;
        c->qt = o;
        stream_kick(c);
    }
    pthread_mutex_unlock(&c->mu);
}

void srv__stream_end(call *c, grpc_status_code code, const char *msg) {
    srv__count_call(c, code);
    pthread_mutex_lock(&c->mu);
    if (!c->finishing) {
        c->finishing = 1;
        c->fin_code = code;
        c->fin_details = grpc_slice_from_copied_string(msg ? msg : "");
        c->fin_set = 1;
        stream_kick(c);
    }
    pthread_mutex_unlock(&c->mu);
}

/* An error for a call whose stream may have begun already. */
void srv__fail_call(call *c, grpc_status_code code, const char *msg) {
    if (c->close_started) { /* only srv__stream_begin starts the close watch before the status */
        srv__stream_end(c, code, msg);
        srv__call_unref(c);
    } else {
        srv__finish_call(c, code, msg, NULL);
    }
}

/* ---- handlers ------------------------------------------------------------------------ */
/* A request's message: NULL (and why in err) if the bytes do not decode as
 * d, or a string field is not UTF-8 or holds a NUL, or an enum field holds a
 * value the enum does not define. */
ProtobufCMessage *srv__unpack_request(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb, char *err,
                                        size_t errlen) {
    grpc_byte_buffer_reader rd;
    snprintf(err, errlen, "request is not a valid %s", d->name);
    if (!bb || !grpc_byte_buffer_reader_init(&rd, bb)) return NULL;
    grpc_slice sl = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    ProtobufCMessage *m = NULL;
    if (srv__pb_check(d, GRPC_SLICE_START_PTR(sl), GRPC_SLICE_LENGTH(sl), err, errlen) == 0 &&
        !(m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl))))
        snprintf(err, errlen, "request is not a valid %s", d->name);
    grpc_slice_unref(sl);
    return m;
}
