/* reflection.c — grpc.reflection v1 and v1alpha over the descriptor index */
#include "internal.h"

static void reflection_answer(call *c, Grpc__Reflection__V1__ServerReflectionRequest *q) {
    srv *s = c->s;
    Grpc__Reflection__V1__ServerReflectionResponse rep = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT;
    Grpc__Reflection__V1__ListServiceResponse ls = GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT;
    enum { MAX_SERVICES = 16 };
    Grpc__Reflection__V1__ServiceResponse svc[MAX_SERVICES], *svcp[MAX_SERVICES];
    size_t n_services = srv__n_known_services - 1 < MAX_SERVICES ? srv__n_known_services - 1 : MAX_SERVICES; /* (not "") */
    Grpc__Reflection__V1__FileDescriptorResponse fd = GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT;
    Grpc__Reflection__V1__ErrorResponse er = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT;
    enum { MAX_FILES = 16 };
    ProtobufCBinaryData files[MAX_FILES];
    const uint8_t *fdata[MAX_FILES];
    size_t flen[MAX_FILES], nf = 0;
    rep.valid_host = q->host;
    rep.original_request = q;
    int found = -1;
    switch (q->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        for (size_t i = 0; i < n_services; i++) {
            grpc__reflection__v1__service_response__init(&svc[i]);
            svc[i].name = (char *)srv__known_services[i + 1];
            svcp[i] = &svc[i];
        }
        ls.n_service = n_services;
        ls.service = svcp;
        rep.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        rep.list_services_response = &ls;
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        found = srv__desc_by_name(s->desc, q->file_by_filename);
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
        found = srv__desc_by_symbol(s->desc, q->file_containing_symbol);
        break;
    default:
        break;
    }
    if (rep.message_response_case == GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE__NOT_SET) {
        if (found >= 0 && (nf = srv__desc_closure(s->desc, found, fdata, flen, MAX_FILES)) <= MAX_FILES) {
            for (size_t i = 0; i < nf; i++) files[i] = (ProtobufCBinaryData){flen[i], (uint8_t *)fdata[i]};
            fd.n_file_descriptor_proto = nf;
            fd.file_descriptor_proto = files;
            rep.message_response_case =
                GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
            rep.file_descriptor_response = &fd;
        } else {
            int unimpl = q->message_request_case ==
                             GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION ||
                         q->message_request_case ==
                             GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE;
            er.error_code = unimpl ? GRPC_STATUS_UNIMPLEMENTED : GRPC_STATUS_NOT_FOUND;
            er.error_message = unimpl ? "extensions are not used by kvserve" : "not found";
            rep.message_response_case = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
            rep.error_response = &er;
        }
    }
    srv__stream_push(c, &rep.base);
}

static void on_reflection_recv(call *c, int ok);

static void reflection_recv(call *c) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    srv__call_ref(c);
    srv__cq_dispatch(c, on_reflection_recv, &c->t_recv);
    if (grpc_call_start_batch(c->gc, &op, 1, &c->t_recv, NULL) != GRPC_CALL_OK) {
        srv__call_unref(c);
        srv__stream_end(c, GRPC_STATUS_INTERNAL, "recv failed");
    }
}

static void on_reflection_recv(call *c, int ok) {
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    if (!ok || !bb) { /* the client closed its side */
        srv__stream_end(c, GRPC_STATUS_OK, "");
    } else {
        char why[320];
        Grpc__Reflection__V1__ServerReflectionRequest *q = (Grpc__Reflection__V1__ServerReflectionRequest *)srv__unpack_request(
            &grpc__reflection__v1__server_reflection_request__descriptor, bb, why, sizeof why);
        grpc_byte_buffer_destroy(bb);
        if (!q) srv__stream_end(c, GRPC_STATUS_INVALID_ARGUMENT, why);
        else {
            reflection_answer(c, q);
            grpc__reflection__v1__server_reflection_request__free_unpacked(q, NULL);
            reflection_recv(c);
        }
    }
    srv__call_unref(c);
}

void srv__h_reflection(call *c) {
    srv__stream_begin(c);
    reflection_recv(c);
    srv__call_unref(c);
}
