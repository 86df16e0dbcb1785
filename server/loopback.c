/* loopback.c — the HTTP API's way into the service: gRPC calls to this
 * server over a Unix socket of its own (in a directory only this user can
 * enter), so that HTTP requests take exactly the path gRPC ones do: auth
 * and tenants, the batcher, the prompt cache, single-flight, the engine,
 * cancellation, draining, metrics. */
#include "internal.h"

#include <sys/stat.h>

int srv__loop_listen(srv *s) {
    const char *tmp = getenv("TMPDIR");
    snprintf(s->loop_dir, sizeof s->loop_dir, "%s/kvserve-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(s->loop_dir)) {
        s->loop_dir[0] = 0;
        return -1;
    }
    chmod(s->loop_dir, 0700);
    char addr[sizeof s->loop_dir + 32];
    snprintf(addr, sizeof addr, "unix:%s/grpc.sock", s->loop_dir);
    grpc_server_credentials *cr = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(s->server, addr, cr);
    grpc_server_credentials_release(cr);
    if (!port) return -1;
    grpc_channel_credentials *cc = grpc_insecure_credentials_create();
    grpc_arg a = {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = -1};
    grpc_channel_args args = {1, &a};
    s->loop_ch = grpc_channel_create(addr, cc, &args);
    grpc_channel_credentials_release(cc);
    return s->loop_ch ? 0 : -1;
}

void srv__loop_close(srv *s) {
    if (s->loop_ch) grpc_channel_destroy(s->loop_ch);
    s->loop_ch = NULL;
    if (s->loop_dir[0]) {
        char path[sizeof s->loop_dir + 16];
        snprintf(path, sizeof path, "%s/grpc.sock", s->loop_dir);
        unlink(path);
        rmdir(s->loop_dir);
        s->loop_dir[0] = 0;
    }
}

int srv__loop_start(srv *s, loop_call *c, const char *method, const ProtobufCMessage *req, const char *authorization) {
    memset(c, 0, sizeof *c);
    c->cq = grpc_completion_queue_create_for_pluck(NULL);
    c->call = grpc_channel_create_call(s->loop_ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq,
                                       grpc_slice_from_static_string(method), NULL,
                                       gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_metadata_array_init(&c->init_md);
    grpc_metadata_array_init(&c->trail_md);
    c->details = grpc_empty_slice();
    if (!c->call) return -1;
    grpc_op ops[5];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (authorization && authorization[0]) {
        c->md.key = grpc_slice_from_static_string("authorization");
        c->md.value = grpc_slice_from_copied_string(authorization);
        c->has_md = 1;
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &c->md;
    }
    grpc_byte_buffer *bb = srv_pack(req);
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_STATUS_ON_CLIENT; /* completes when the call ends: tag 2 */
    ops[3].data.recv_status_on_client.trailing_metadata = &c->trail_md;
    ops[3].data.recv_status_on_client.status = &c->status;
    ops[3].data.recv_status_on_client.status_details = &c->details;
    ops[4].op = GRPC_OP_RECV_INITIAL_METADATA; /* (messages come only after it): tag 4 */
    ops[4].data.recv_initial_metadata.recv_initial_metadata = &c->init_md;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, 3, (void *)1, NULL);
    if (e == GRPC_CALL_OK) e = grpc_call_start_batch(c->call, ops + 3, 1, (void *)2, NULL);
    if (e == GRPC_CALL_OK) c->status_pending = 1;
    if (e == GRPC_CALL_OK) e = grpc_call_start_batch(c->call, ops + 4, 1, (void *)4, NULL);
    if (e == GRPC_CALL_OK) c->md_pending = 1;
    grpc_completion_queue_pluck(c->cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_byte_buffer_destroy(bb);
    return e == GRPC_CALL_OK ? 0 : -1;
}

int srv__loop_next(loop_call *c, const ProtobufCMessageDescriptor *d, ProtobufCMessage **out, int timeout_ms) {
    *out = NULL;
    if (!c->recv_pending) {
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_RECV_MESSAGE;
        op.data.recv_message.recv_message = &c->recv;
        c->recv = NULL;
        if (grpc_call_start_batch(c->call, &op, 1, (void *)3, NULL) != GRPC_CALL_OK) return 0;
        c->recv_pending = 1;
    }
    gpr_timespec dl = timeout_ms < 0 ? gpr_inf_future(GPR_CLOCK_REALTIME)
                                     : gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_pluck(c->cq, (void *)3, dl, NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) return -1;
    c->recv_pending = 0;
    if (!c->recv) return 0; /* the end of the stream (or of the call) */
    *out = srv_unpack(d, c->recv);
    grpc_byte_buffer_destroy(c->recv);
    c->recv = NULL;
    return *out ? 1 : 0;
}

void srv__loop_cancel(loop_call *c) {
    if (c->call) grpc_call_cancel(c->call, NULL);
}

int srv__loop_finish(loop_call *c, char *msg, size_t msglen) {
    if (c->recv_pending) { /* (after a cancel it completes at once) */
        grpc_completion_queue_pluck(c->cq, (void *)3, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        grpc_byte_buffer_destroy(c->recv);
        c->recv = NULL;
        c->recv_pending = 0;
    }
    if (c->md_pending) grpc_completion_queue_pluck(c->cq, (void *)4, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (c->status_pending) {
        grpc_completion_queue_pluck(c->cq, (void *)2, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        c->status_pending = 0;
    } else {
        c->status = GRPC_STATUS_INTERNAL;
    }
    int st = c->status;
    if (msg) snprintf(msg, msglen, "%.*s", (int)GRPC_SLICE_LENGTH(c->details), (const char *)GRPC_SLICE_START_PTR(c->details));
    grpc_slice_unref(c->details);
    if (c->has_md) grpc_slice_unref(c->md.value);
    grpc_metadata_array_destroy(&c->init_md);
    grpc_metadata_array_destroy(&c->trail_md);
    if (c->call) grpc_call_unref(c->call);
    grpc_completion_queue_shutdown(c->cq);
    while (grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {}
    grpc_completion_queue_destroy(c->cq);
    memset(c, 0, sizeof *c);
    return st;
}
