/* util.c — time, logging, the engine-status to gRPC-status mapping */
#include "internal.h"

double srv__now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void srv__sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void srv__logf(const char *level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s\n", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
            tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, level, msg);
}

/* Engine status -> gRPC status: the one place where the mapping lives. */
grpc_status_code srv__status_of(int rc) {
    switch (rc) {
    case ENG_OK: return GRPC_STATUS_OK;
    case ENG_EEMPTY: case ENG_EMAXTOK: case ENG_ECONTEXT: case ENG_ETOKEN: case ENG_EUTF8: case ENG_ESAMPLING:
    case ENG_EINVAL: case ENG_ECORRUPT: case ENG_EMODEL: return GRPC_STATUS_INVALID_ARGUMENT;
    case ENG_EQUEUE: case ENG_EPOOL: case ENG_ENOMEM: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case ENG_ENOTFOUND: return GRPC_STATUS_NOT_FOUND;
    case ENG_EBUSY: return GRPC_STATUS_FAILED_PRECONDITION;
    case ENG_EEXIST: return GRPC_STATUS_ALREADY_EXISTS;
    default: return GRPC_STATUS_INTERNAL;
    }
}
