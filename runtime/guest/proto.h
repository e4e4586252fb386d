/*
 * The host <-> guest agent protocol, shared by the agent (runtime/guest/, a static program
 * in the guest) and the host side (runtime/vm/channel.c). Plain C, no runtime headers.
 *
 * A byte stream (virtio-serial port, vsock connection, or a socketpair in tests) carries frames:
 *
 *   u16 magic (0xC1A7) | u16 type | u32 id | u32 len | len bytes of payload    (little-endian)
 *
 * `id` names a request chosen by the host (1, 2, ...); every frame about that request carries
 * it; 0 is for frames about no request (READY). A payload is at most CLA_MAX_PAYLOAD bytes: a
 * peer that announces more is broken and the reader drops the connection rather than trust it.
 * Structured payloads are TLV lists: u16 tag | u32 len | len bytes. Integers are 8 bytes,
 * little-endian; strings are raw bytes without NUL. Unknown tags are skipped (forward
 * compatibility); a TLV that runs past its frame is malformed.
 *
 * Requests and their answers:
 *   PING                       -> PONG {VERSION, UPTIME_MS}
 *   EXEC {ARG+, ENV*, CWD, TIMEOUT_MS, MAX_OUT, MAX_ERR, STDIN}
 *                              -> STARTED {PID} | ERROR {ERRNO, MESSAGE}
 *                                 then STDOUT/STDERR data frames, STDIN_ACK {SIZE} for stdin
 *                                 the agent consumed, and last EXIT {CODE | SIGNAL, FLAGS,
 *                                 OUT_BYTES, ERR_BYTES}
 *   STDIN (data; empty = EOF), KILL {SIGNAL}   (no answer)
 *   WRITE {PATH, MODE, SIZE}   -> OK | ERROR; then WDATA* and WEND -> OK (renamed) | ERROR
 *   READ {PATH, MAX}           -> RINFO {SIZE, MODE}, RDATA*, REND | ERROR
 *   CANCEL                     (abandons a write: the temporary file is removed)
 *   SHUTDOWN {ACTION}          -> OK, then the guest syncs and powers off (or reboots)
 * The agent sends READY {VERSION, UNAME, UPTIME_MS} whenever the channel (re)opens.
 */
#ifndef CLAWLUA_GUEST_PROTO_H
#define CLAWLUA_GUEST_PROTO_H

#include <stdint.h>
#include <string.h>

#define CLA_MAGIC        0xC1A7u
#define CLA_HEADER       12u
#define CLA_MAX_PAYLOAD  (256u * 1024u)
#define CLA_CHUNK        (64u * 1024u)  /* data frames senders produce */
#define CLA_STDIN_WINDOW (256u * 1024u) /* stdin bytes the host may have unacknowledged */
#define CLA_VERSION      1
#define CLA_PORT_NAME    "org.clawlua.agent" /* virtio-serial port name */
#define CLA_VSOCK_PORT   1024u

enum cla_type {
  /* host -> guest */
  CLA_PING = 1,
  CLA_EXEC = 2,
  CLA_STDIN = 3,
  CLA_KILL = 4,
  CLA_WRITE = 5,
  CLA_WDATA = 6,
  CLA_WEND = 7,
  CLA_READ = 8,
  CLA_SHUTDOWN = 9,
  CLA_CANCEL = 10,
  /* guest -> host */
  CLA_READY = 64,
  CLA_PONG = 65,
  CLA_STARTED = 66,
  CLA_STDOUT = 67,
  CLA_STDERR = 68,
  CLA_EXIT = 69,
  CLA_OK = 70,
  CLA_ERROR = 71,
  CLA_RINFO = 72,
  CLA_RDATA = 73,
  CLA_REND = 74,
  CLA_STDIN_ACK = 75,
};

enum cla_tag {
  CLA_T_ARG = 1,
  CLA_T_ENV = 2,
  CLA_T_CWD = 3,
  CLA_T_TIMEOUT_MS = 4,
  CLA_T_MAX_OUT = 5,
  CLA_T_MAX_ERR = 6,
  CLA_T_STDIN = 7,
  CLA_T_PATH = 8,
  CLA_T_MODE = 9,
  CLA_T_SIZE = 10,
  CLA_T_MAX = 11,
  CLA_T_CODE = 12,
  CLA_T_SIGNAL = 13,
  CLA_T_FLAGS = 14,
  CLA_T_ERRNO = 15,
  CLA_T_MESSAGE = 16,
  CLA_T_VERSION = 17,
  CLA_T_UNAME = 18,
  CLA_T_UPTIME_MS = 19,
  CLA_T_ACTION = 20,
  CLA_T_PID = 21,
  CLA_T_OUT_BYTES = 22, /* EXIT: what the command wrote, kept or not */
  CLA_T_ERR_BYTES = 23,
  CLA_T_ENV_CLEAR = 24, /* EXEC: start from an empty environment (sent before any ENV) */
};

/* EXIT flags */
#define CLA_F_TIMED_OUT     1u
#define CLA_F_OUT_TRUNCATED 2u
#define CLA_F_ERR_TRUNCATED 4u

/* SHUTDOWN actions */
#define CLA_ACTION_POWEROFF 0
#define CLA_ACTION_REBOOT   1

/* Bounds the agent enforces on requests (the host checks its callers against the same). */
#define CLA_MAX_ARGS 4096
#define CLA_MAX_JOBS 64 /* concurrent execs, reads and writes */

typedef struct cla_header {
  uint16_t magic, type;
  uint32_t id, len;
} cla_header;

static inline void cla_put16(unsigned char *p, uint16_t v) {
  p[0] = (unsigned char)v;
  p[1] = (unsigned char)(v >> 8);
}
static inline void cla_put32(unsigned char *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static inline void cla_put64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static inline uint16_t cla_get16(const unsigned char *p) {
  return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t cla_get32(const unsigned char *p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}
static inline uint64_t cla_get64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static inline void cla_header_put(unsigned char *p, uint16_t type, uint32_t id, uint32_t len) {
  cla_put16(p, CLA_MAGIC);
  cla_put16(p + 2, type);
  cla_put32(p + 4, id);
  cla_put32(p + 8, len);
}

/* Decodes a header; returns 0 when it is not a frame this protocol allows. */
static inline int cla_header_get(const unsigned char *p, cla_header *h) {
  h->magic = cla_get16(p);
  h->type = cla_get16(p + 2);
  h->id = cla_get32(p + 4);
  h->len = cla_get32(p + 8);
  return h->magic == CLA_MAGIC && h->len <= CLA_MAX_PAYLOAD;
}

/* TLV iteration over a payload. cla_tlv_next returns 1 with the next item, 0 at the end, -1
 * when an item runs past the payload (malformed). */
typedef struct cla_tlv {
  const unsigned char *p, *end;
  uint16_t tag;
  uint32_t len;
  const unsigned char *val;
} cla_tlv;

static inline void cla_tlv_init(cla_tlv *t, const unsigned char *p, uint32_t len) {
  t->p = p;
  t->end = p + len;
  t->tag = 0;
  t->len = 0;
  t->val = NULL;
}

static inline int cla_tlv_next(cla_tlv *t) {
  if (t->p == t->end) return 0;
  if ((size_t)(t->end - t->p) < 6) return -1;
  t->tag = cla_get16(t->p);
  t->len = cla_get32(t->p + 2);
  if ((size_t)(t->end - t->p) - 6 < t->len) return -1;
  t->val = t->p + 6;
  t->p += 6 + (size_t)t->len;
  return 1;
}

/* An integer TLV value; returns 0 when the value is not 8 bytes. */
static inline int cla_tlv_u64(const cla_tlv *t, uint64_t *v) {
  if (t->len != 8) return 0;
  *v = cla_get64(t->val);
  return 1;
}

#endif
