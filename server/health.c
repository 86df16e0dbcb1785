/* health.c — grpc.health.v1: Check, Watch */
#include "internal.h"

const char *const srv__known_services[] = {"", "kvserve.v1.Generation", "kvserve.v1.Agents", "kvserve.v1.Cache",
                                       "grpc.health.v1.Health",
                                       "grpc.reflection.v1.ServerReflection",
                                       "grpc.reflection.v1alpha.ServerReflection"};
const size_t srv__n_known_services = sizeof srv__known_services / sizeof *srv__known_services;

static int health_status(srv *s, const char *svc) {
    int known = 0;
    for (size_t i = 0; i < srv__n_known_services; i++) known |= !strcmp(svc, srv__known_services[i]);
    if (!known) return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
    return s->serving ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                      : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

void srv__h_health_check(call *c) {
    UNPACK(Grpc__Health__V1__HealthCheckRequest, grpc__health__v1__health_check_request__descriptor, c, q);
    pthread_mutex_lock(&c->s->mu);
    int st = health_status(c->s, q->service);
    pthread_mutex_unlock(&c->s->mu);
    if (st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN)
        srv__finish_errorf(c, GRPC_STATUS_NOT_FOUND, "service: unknown service \"%s\"", q->service);
    else {
        Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        rep.status = st;
        srv__finish_call(c, GRPC_STATUS_OK, NULL, &rep.base);
    }
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
}

static void push_health(call *c, int st) {
    Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rep.status = st;
    srv__stream_push(c, &rep.base);
}

void srv__h_health_watch(call *c) {
    srv *s = c->s;
    UNPACK(Grpc__Health__V1__HealthCheckRequest, grpc__health__v1__health_check_request__descriptor, c, q);
    /* remember the service name in the tenant slot's neighbour: reuse details */
    pthread_mutex_lock(&s->mu);
    c->watcher = 1;
    snprintf(c->tenant, sizeof c->tenant, "%s", q->service);
    srv__stream_begin(c);
    push_health(c, health_status(s, q->service));
    srv__call_ref(c); /* the watcher list's reference */
    c->next_watch = s->watchers;
    s->watchers = c;
    pthread_mutex_unlock(&s->mu);
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
    srv__call_unref(c);
}

/* srv.mu held */
void srv__notify_watchers(srv *s) {
    for (call *w = s->watchers; w; w = w->next_watch) push_health(w, health_status(s, w->tenant));
}
