/* agentauth.h — agent exports authenticated by the server (HMAC-SHA256).
 *
 * An export leaves the server as the engine's blob followed by a 32-byte tag:
 * HMAC-SHA256 under the server's key of a domain string, the model
 * fingerprint, the tenant and the blob. An import is handed to the engine
 * only if its tag verifies for the caller's tenant, so a client can neither
 * forge KV nor move another tenant's export into its own account. */
#ifndef KVSERVE_AGENTAUTH_H
#define KVSERVE_AGENTAUTH_H

#include <stddef.h>
#include <stdint.h>

#define SRV_AGENT_TAG 32     /* bytes appended to an export */
#define SRV_AGENT_KEY_MIN 32 /* shortest key file accepted */

typedef struct srv_agent_key {
    unsigned char key[256];
    size_t len;
    int generated;           /* made at start: exports import only into this process */
} srv_agent_key;

/* Read the key from `path` (its bytes, SRV_AGENT_KEY_MIN..256 of them), or
 * make a random one when path is NULL. 0, or -1 with a one-line message. */
int srv__agent_key_init(srv_agent_key *k, const char *path, char *err, size_t errlen);

/* Append the tag to an export: *buf (malloc'd, *len bytes) grows by
 * SRV_AGENT_TAG. 0, or -1 when out of memory (the buffer is left as it was). */
int srv__agent_seal(const srv_agent_key *k, uint64_t fingerprint, const char *tenant, uint8_t **buf, size_t *len);

/* Check the tag of an import for this tenant; on success *blob_len is the
 * length of the engine's blob in front of it. 0, or -1 if it does not verify
 * (forged, altered, truncated, another tenant's, another key's). Constant time
 * in the tag. */
int srv__agent_verify(const srv_agent_key *k, uint64_t fingerprint, const char *tenant, const uint8_t *buf,
                      size_t len, size_t *blob_len);

#endif
