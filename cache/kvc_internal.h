/* kvc_internal.h — shared between the cache sources (not installed). */
#ifndef KVSERVE_KVC_INTERNAL_H
#define KVSERVE_KVC_INTERNAL_H

#include "kvc.h"

#include <hiredis/hiredis.h>

/* Run one command (binary-safe arguments) on a pooled connection. NULL when
 * Redis failed, timed out, answered an error or the circuit is open (the
 * failure is counted). Free the reply with freeReplyObject. */
redisReply *kvc__command_argv(kvc_redis *r, int argc, const char **argv, const size_t *lens);

#endif
