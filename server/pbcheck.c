/* pbcheck.c — string and enum checks on a request's wire bytes (see
 * pbcheck.h). Runs on a completion-queue thread before unpacking; no state,
 * no locks. UTF-8 is decoded by utf8proc. */
#include "pbcheck.h"

#include <stdio.h>
#include <string.h>
#include <utf8proc.h>

enum { MAX_DEPTH = 32 };

static int varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) return 0;
    }
    return -1;
}

const char *srv__utf8_problem(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0 || cp < 0) return "is not valid UTF-8";
        if (cp == 0) return "contains a NUL character";
        i += (size_t)k;
    }
    return "";
}

static int fail(char *err, size_t errlen, const char *path, const char *name, const char *why) {
    snprintf(err, errlen, "%s%s%s: %s", path, *path ? "." : "", name, why);
    return -1;
}

static int bad_enum(char *err, size_t errlen, const char *path, const ProtobufCFieldDescriptor *f, uint64_t v) {
    char why[64];
    snprintf(why, sizeof why, "%d is not one of its values", (int)(int32_t)v);
    return fail(err, errlen, path, f->name, why);
}

static int enum_ok(const ProtobufCFieldDescriptor *f, uint64_t v) {
    return protobuf_c_enum_descriptor_get_value(f->descriptor, (int)(int32_t)v) != NULL;
}

static int check(const ProtobufCMessageDescriptor *d, const uint8_t *p, const uint8_t *end, const char *path, int depth,
                 char *err, size_t errlen) {
    if (depth > MAX_DEPTH) return 0; /* deeper than any of our messages: the unpacker judges */
    while (p < end) {
        uint64_t key, v;
        if (varint(&p, end, &key)) return 0;
        const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3));
        switch (key & 7) {
        case 0: /* varint */
            if (varint(&p, end, &v)) return 0;
            if (f && f->type == PROTOBUF_C_TYPE_ENUM && !enum_ok(f, v)) return bad_enum(err, errlen, path, f, v);
            break;
        case 1: if ((size_t)(end - p) < 8) return 0; p += 8; break;
        case 5: if ((size_t)(end - p) < 4) return 0; p += 4; break;
        case 2: { /* length-delimited */
            if (varint(&p, end, &v) || v > (uint64_t)(end - p)) return 0;
            const uint8_t *q = p;
            p += v;
            if (!f) break;
            if (f->type == PROTOBUF_C_TYPE_STRING) {
                const char *why = srv__utf8_problem(q, (size_t)v);
                if (*why) return fail(err, errlen, path, f->name, why);
            } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                char sub[256];
                snprintf(sub, sizeof sub, "%s%s%s", path, *path ? "." : "", f->name);
                if (check(f->descriptor, q, p, sub, depth + 1, err, errlen)) return -1;
            } else if (f->type == PROTOBUF_C_TYPE_ENUM) { /* packed repeated */
                for (const uint8_t *r = q; r < p;) {
                    if (varint(&r, p, &v)) return 0;
                    if (!enum_ok(f, v)) return bad_enum(err, errlen, path, f, v);
                }
            }
            break;
        }
        default: return 0; /* groups and invalid wire types: the unpacker refuses them */
        }
    }
    return 0;
}

int srv__pb_check(const ProtobufCMessageDescriptor *d, const uint8_t *data, size_t len, char *err, size_t errlen) {
    return check(d, data, data + len, "", 0, err, errlen);
}
