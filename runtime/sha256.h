/*
 * SHA-256 (FIPS 180-4), our own: the audit chain and the firewall's per-VM names are its only
 * users. Linking libcrypto for them cost every clawlua process ~1 ms at exec (its ~1,200
 * symbol and ~17,000 relative relocations, ~100 copied pages) before main ran, more than the
 * rest of a `clawlua mcp` start; the records hashed are a few hundred bytes.
 */
#ifndef CLAWLUA_SHA256_H
#define CLAWLUA_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define CL_SHA256_LEN 32

typedef struct cl_sha256_ctx {
  uint32_t h[8];
  uint64_t total; /* bytes hashed so far */
  unsigned char buf[64];
  size_t nbuf;
} cl_sha256_ctx;

void cl_sha256_init(cl_sha256_ctx *c);
void cl_sha256_update(cl_sha256_ctx *c, const void *data, size_t len);
void cl_sha256_final(cl_sha256_ctx *c, unsigned char out[CL_SHA256_LEN]);
/* Which block code this process uses: "sha-ni" or "portable". */
const char *cl_sha256_impl(void);
/* One call: out = SHA-256(data). */
void cl_sha256(const void *data, size_t len, unsigned char out[CL_SHA256_LEN]);

#endif
