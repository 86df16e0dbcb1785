/* pbio.h — protobuf-c messages in and out of gRPC byte buffers, shared by
 * the server and kvctl (internal to server/). */
#ifndef KVSERVE_PBIO_H
#define KVSERVE_PBIO_H

#include <grpc/byte_buffer.h>
#include <protobuf-c/protobuf-c.h>

/* A new byte buffer holding m, packed (destroy it with grpc_byte_buffer_destroy). */
grpc_byte_buffer *srv_pack(const ProtobufCMessage *m);
/* The message in bb, or NULL if bb is NULL or not a valid message of d
 * (free it with protobuf_c_message_free_unpacked). */
ProtobufCMessage *srv_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb);

#endif
