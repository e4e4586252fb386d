/*
 * clawlua-agent: the layer every other file writes through (see agent_int.h): logs, clocks,
 * the bounded output queue to the host, frames and the TLV payloads they carry.
 */
#include "agent_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

struct cl_agent_state cl_agent;

void cl_log(const char *fmt, ...) {
  char buf[512] = "clawlua-agent: ";
  size_t pre = strlen(buf);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf + pre, sizeof buf - pre - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  size_t len = pre + (size_t)n;
  if (len > sizeof buf - 2) len = sizeof buf - 2;
  buf[len++] = '\n';
  if (write(2, buf, len) < 0) return; /* the console is gone: nothing to tell */
}

uint64_t cl_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t uptime_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void cl_set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ------------------------------------------------------------------------------------------ */
/* Output queue and frames                                                                    */

static int out_reserve(size_t n) {
  if (cl_agent.out_off > 0 && cl_agent.out_off + cl_agent.out_len + n > cl_agent.out_cap) {
    memmove(cl_agent.out, cl_agent.out + cl_agent.out_off, cl_agent.out_len);
    cl_agent.out_off = 0;
  }
  if (cl_agent.out_len + n <= cl_agent.out_cap) return 1;
  size_t cap = cl_agent.out_cap ? cl_agent.out_cap : 65536;
  while (cap < cl_agent.out_len + n) cap *= 2;
  unsigned char *p = realloc(cl_agent.out, cap);
  if (!p) return 0;
  cl_agent.out = p;
  cl_agent.out_cap = cap;
  return 1;
}

void cl_send_frame(uint16_t type, uint32_t id, const void *payload, size_t len) {
  if (cl_agent.fd < 0) return; /* nobody to tell: the host reconnects and asks again */
  if (len > CLA_MAX_PAYLOAD || !out_reserve(CLA_HEADER + len)) {
    cl_log("cannot queue a frame of %zu bytes", len);
    return;
  }
  unsigned char *p = cl_agent.out + cl_agent.out_off + cl_agent.out_len;
  cla_header_put(p, type, id, (uint32_t)len);
  if (len) memcpy(p + CLA_HEADER, payload, len);
  cl_agent.out_len += CLA_HEADER + len;
}

void cl_tlv_bytes(tlvbuf *t, uint16_t tag, const void *v, size_t len) {
  if (len > sizeof t->b - 6 - t->n)
    len = sizeof t->b - 6 - t->n; /* messages are cut, never overflow */
  cla_put16(t->b + t->n, tag);
  cla_put32(t->b + t->n + 2, (uint32_t)len);
  memcpy(t->b + t->n + 6, v, len);
  t->n += 6 + len;
}

void cl_tlv_str(tlvbuf *t, uint16_t tag, const char *s) {
  cl_tlv_bytes(t, tag, s, strlen(s));
}

void cl_tlv_u64(tlvbuf *t, uint16_t tag, uint64_t v) {
  unsigned char b[8];
  cla_put64(b, v);
  cl_tlv_bytes(t, tag, b, 8);
}

void cl_send_error(uint32_t id, int err, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  tlvbuf t = {.n = 0};
  cl_tlv_u64(&t, CLA_T_ERRNO, (uint64_t)(unsigned)err);
  cl_tlv_str(&t, CLA_T_MESSAGE, msg);
  cl_send_frame(CLA_ERROR, id, t.b, t.n);
}

void cl_send_ready(uint16_t type, uint32_t id) {
  tlvbuf t = {.n = 0};
  cl_tlv_u64(&t, CLA_T_VERSION, CLA_VERSION);
  struct utsname u;
  if (uname(&u) == 0) {
    char s[400];
    snprintf(s, sizeof s, "%s %s %s %s", u.sysname, u.release, u.version, u.machine);
    cl_tlv_str(&t, CLA_T_UNAME, s);
  }
  cl_tlv_u64(&t, CLA_T_UPTIME_MS, uptime_ms());
  cl_tlv_u64(&t, CLA_T_PID, (uint64_t)getpid());
  cl_send_frame(type, id, t.b, t.n);
}

/* Writes queued output; returns -1 when the channel broke. */
int cl_flush_out(void) {
  while (cl_agent.out_len > 0 && cl_agent.fd >= 0) {
    ssize_t n = write(cl_agent.fd, cl_agent.out + cl_agent.out_off, cl_agent.out_len);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return 0;
      return -1;
    }
    cl_agent.out_off += (size_t)n;
    cl_agent.out_len -= (size_t)n;
  }
  if (cl_agent.out_len == 0) cl_agent.out_off = 0;
  return 0;
}

void cl_close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}
