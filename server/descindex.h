/* descindex.h — an index of the server's embedded FileDescriptorSet for
 * reflection (server-internal): each file's name, bytes, the symbols it
 * defines (packages' messages with their nested messages and enums, enums,
 * services and their methods, fully qualified) and the files it imports.
 * Plain protobuf wire reading: no gRPC, no generated code (test_descindex). */
#ifndef KVSERVE_SRV_DESCINDEX_H
#define KVSERVE_SRV_DESCINDEX_H

#include <stddef.h>
#include <stdint.h>

typedef struct srv__desc_index srv__desc_index;

/* Index a serialized FileDescriptorSet (set[0..len), kept alive by the
 * caller). 0, or -1 when out of memory or the bytes are malformed. */
int srv__desc_open(srv__desc_index **out, const uint8_t *set, size_t len);
void srv__desc_close(srv__desc_index *x);

int srv__desc_count(const srv__desc_index *x);
/* The file named `name` ("kvserve/v1/kvserve.proto"), or -1. */
int srv__desc_by_name(const srv__desc_index *x, const char *name);
/* The file that defines `symbol` ("kvserve.v1.Generation.Stream"), or -1. */
int srv__desc_by_symbol(const srv__desc_index *x, const char *symbol);
/* File i and every file it imports, transitively, each once, file i first:
 * their bytes into data/len (up to max). Returns how many there are. */
size_t srv__desc_closure(const srv__desc_index *x, int i, const uint8_t **data, size_t *len, size_t max);

#endif
