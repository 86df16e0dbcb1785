/* pbcheck.h — checks on a request's wire bytes that protobuf-c does not make
 * (internal to server/). protobuf-c keeps a string field as a C string, so a
 * NUL inside it would silently cut it, and it accepts any bytes and any enum
 * number; kvserve refuses both before a handler sees the message. */
#ifndef KVSERVE_PBCHECK_H
#define KVSERVE_PBCHECK_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

/* Walk the encoded message of type d (and its sub-messages): every string
 * field must be valid UTF-8 without a NUL byte, every enum field a value the
 * enum defines. 0, or -1 with "FIELD: why" in err (FIELD dotted for nested
 * fields, e.g. "cache.mode"). Malformed encodings are left to the unpacker
 * (0). Cost: one pass over the bytes. */
/* "" when the n bytes at s are UTF-8 without a NUL character, else why not
 * ("is not valid UTF-8", "contains a NUL character"). */
const char *srv__utf8_problem(const uint8_t *s, size_t n);

int srv__pb_check(const ProtobufCMessageDescriptor *d, const uint8_t *data, size_t len, char *err, size_t errlen);

#endif
