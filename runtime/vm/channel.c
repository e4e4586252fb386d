/*
 * The host side of the guest agent channel (protocol: runtime/guest/proto.h): vm:exec,
 * vm:write_file, vm:read_file, vm:ping, and the READY the start of a VM waits for.
 *
 * The guest is not trusted. Every frame is checked before it is used: the header (magic, a
 * payload no larger than CLA_MAX_PAYLOAD, read before the payload is), the type, the request
 * it names (one the host made, of the kind the frame belongs to), its TLVs, and the amounts
 * (output beyond the caller's cap is counted and dropped, a file larger than announced or than
 * asked for, stdin acknowledgements for bytes never sent). A violation closes the channel for
 * good with an error that says what the agent did; the requests in flight fail with it.
 *
 * Each request is a userdata on the stack of the call that made it: a cancelled or collected
 * caller cancels its request in the guest (the command is killed, a half-written file removed).
 * Memory is bounded: collected output by the caller's caps, streamed output by a high-water mark
 * past which the channel stops reading until the callback catches up, queued frames to the
 * guest by a high-water mark that makes writers wait.
 */
#include "vm.h"

#include "../guest/proto.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define REQ_MT "clawlua.vm.request"
#define IN_CAP (CLA_HEADER + CLA_MAX_PAYLOAD)
/* Writers wait while this much is queued for the guest; past STREAM_HIGH of streamed output
 * queued for callbacks, the channel stops reading. */
#define OUT_HIGH           ((size_t)512 << 10)
#define STREAM_HIGH        ((size_t)1 << 20)
#define DEFAULT_MAX_OUTPUT ((uint64_t)16 << 20)
#define DEFAULT_MAX_READ   ((uint64_t)64 << 20)
#define MAX_FILE           ((uint64_t)1 << 40)
#define EXEC_GRACE         10.0 /* seconds the host waits past a command's timeout for the agent */

enum { R_EXEC = 1, R_WRITE, R_READ, R_PING, R_SHUTDOWN };

typedef struct bbuf {
  char *p;
  size_t len, cap;
} bbuf;

typedef struct chunk {
  struct chunk *next;
  int err; /* stderr */
  size_t len;
  char data[];
} chunk;

struct vm_req {
  vm_req *next;
  vm *v; /* NULL once the request is unlinked */
  uint32_t id;
  int kind;
  int done, failed;
  int code; /* errno-style code of a failure */
  char error[512];
  cl_wait *w;
  uint64_t t0;
  /* exec */
  int started, exit_code, exit_signal;
  uint64_t flags, guest_pid;
  bbuf out, err;
  uint64_t out_total, err_total, max_out, max_err;
  int trunc_out, trunc_err;
  int streaming;
  chunk *qhead, *qtail;
  size_t queued;
  const char *in_data;
  size_t in_len, in_sent;
  uint64_t in_acked;
  int in_eof_sent;
  int want_write;
  /* write */
  int oks;
  const char *wdata;
  size_t wlen, wsent;
  int wend_sent;
  /* read */
  int rinfo;
  uint64_t rsize, rmax, rmode;
  bbuf data;
};

/* ------------------------------------------------------------------------------------------ */
/* Buffers                                                                                    */

static int bbuf_add(bbuf *b, const void *p, size_t n) {
  if (b->len + n > b->cap) {
    size_t c = b->cap ? b->cap : 4096;
    while (c < b->len + n) c *= 2;
    char *np = realloc(b->p, c);
    if (!np) return 0;
    b->p = np;
    b->cap = c;
  }
  memcpy(b->p + b->len, p, n);
  b->len += n;
  return 1;
}

static void bbuf_free(bbuf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The channel                                                                                */

void cl_chan_init(vm_chan *c) {
  memset(c, 0, sizeof *c);
  c->fd = -1;
  c->closed = 1;
}

int cl_chan_busy(vm *v) {
  for (vm_req *r = v->chan.reqs; r; r = r->next)
    if (!r->done && !r->failed) return 1;
  return 0;
}

static void req_wake(vm_req *r) {
  if (r->w) {
    cl_wait *w = r->w;
    r->w = NULL;
    cl_wait_wake(w, 0);
  }
}

static void req_fail(vm_req *r, int code, const char *msg) {
  if (r->done || r->failed) return;
  r->failed = 1;
  r->code = code;
  snprintf(r->error, sizeof r->error, "%s", msg);
  req_wake(r);
}

static void update_events(vm *v) {
  vm_chan *c = &v->chan;
  if (!c->watching) return;
  uint32_t ev = (c->throttled ? 0 : EPOLLIN) | (c->out_len ? EPOLLOUT : 0);
  if (ev != c->watch.events) cl_watch_modify(&c->watch, ev);
}

void cl_chan_close(vm *v, const char *why) {
  vm_chan *c = &v->chan;
  if (c->watching) {
    cl_watch_stop(&c->watch);
    c->watching = 0;
  }
  if (c->fd >= 0) {
    close(c->fd);
    c->fd = -1;
  }
  int was_open = !c->closed;
  c->closed = 1;
  c->ready = 0;
  if (!c->error[0] && why && was_open) snprintf(c->error, sizeof c->error, "%s", why);
  char msg[512];
  snprintf(msg, sizeof msg, "vm %s: the guest agent channel closed: %.320s", v->id,
           c->error[0] ? c->error
           : why       ? why
                       : "closed");
  for (vm_req *r = c->reqs; r; r = r->next) req_fail(r, EPIPE, msg);
  c->in_len = 0;
  c->out_len = c->out_off = 0;
  cl_vm_changed(v);
}

void cl_chan_release(vm *v) {
  vm_chan *c = &v->chan;
  cl_chan_close(v, "the vm was closed");
  for (vm_req *r = c->reqs, *n; r; r = n) {
    n = r->next;
    r->v = NULL;
    r->next = NULL;
  }
  c->reqs = NULL;
  free(c->in);
  free(c->out);
  c->in = c->out = NULL;
  c->out_cap = 0;
}

/* The agent broke the protocol: nothing it sends from now on is believed. */
static void violation(vm *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void violation(vm *v, const char *fmt, ...) {
  vm_chan *c = &v->chan;
  if (c->closed) return;
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  snprintf(c->error, sizeof c->error, "protocol violation by the guest agent: %s", msg);
  lua_State *L = v->L;
  int stopped = lua_gc(L, LUA_GCISRUNNING);
  if (stopped) lua_gc(L, LUA_GCSTOP);
  lua_createtable(L, 0, 1);
  lua_pushstring(L, c->error);
  lua_setfield(L, -2, "error");
  cl_audit_emit(L, "vm.agent_error", v->id, v->pid > 0 ? v->pid : 0, lua_gettop(L));
  lua_pop(L, 1);
  if (stopped) lua_gc(L, LUA_GCRESTART);
  cl_chan_close(v, c->error);
}

static void flush_out(vm *v) {
  vm_chan *c = &v->chan;
  while (c->out_len > 0 && c->fd >= 0) {
    ssize_t n = write(c->fd, c->out + c->out_off, c->out_len);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      char why[96];
      snprintf(why, sizeof why, "write: %s", strerror(errno));
      cl_chan_close(v, why);
      return;
    }
    c->out_off += (size_t)n;
    c->out_len -= (size_t)n;
    c->bytes_out += (uint64_t)n;
  }
  if (c->out_len == 0) c->out_off = 0;
  if (c->out_len < OUT_HIGH / 2)
    for (vm_req *r = c->reqs; r; r = r->next)
      if (r->want_write) req_wake(r);
  update_events(v);
}

int cl_chan_send(vm *v, uint16_t type, uint32_t id, const void *payload, size_t len) {
  vm_chan *c = &v->chan;
  if (c->closed || c->fd < 0) return EPIPE;
  if (len > CLA_MAX_PAYLOAD) return EMSGSIZE;
  if (c->out_off && c->out_off + c->out_len + CLA_HEADER + len > c->out_cap) {
    memmove(c->out, c->out + c->out_off, c->out_len);
    c->out_off = 0;
  }
  if (c->out_len + CLA_HEADER + len > c->out_cap) {
    size_t cap = c->out_cap ? c->out_cap : 65536;
    while (cap < c->out_len + CLA_HEADER + len) cap *= 2;
    unsigned char *p = realloc(c->out, cap);
    if (!p) return ENOMEM;
    c->out = p;
    c->out_cap = cap;
  }
  unsigned char *p = c->out + c->out_off + c->out_len;
  cla_header_put(p, type, id, (uint32_t)len);
  if (len) memcpy(p + CLA_HEADER, payload, len);
  c->out_len += CLA_HEADER + len;
  flush_out(v);
  return c->closed ? EPIPE : 0;
}

static vm_req *find_req(vm *v, uint32_t id) {
  for (vm_req *r = v->chan.reqs; r; r = r->next)
    if (r->id == id) return r;
  return NULL;
}

/* A printable copy of an agent-provided string, at most n-1 bytes. */
static void sanitize(char *dst, size_t n, const unsigned char *s, size_t len) {
  size_t j = 0;
  for (size_t i = 0; i < len && j + 1 < n; i++)
    dst[j++] = (s[i] >= 32 && s[i] < 127) ? (char)s[i] : '?';
  dst[j] = 0;
}

/* Output that could not be kept (out of memory): the command is cancelled, the exec fails with
 * the loss and it is audited, rather than returning output with a hole in it. */
static void output_lost(vm *v, vm_req *r, int err, size_t n) {
  char msg[160];
  snprintf(msg, sizeof msg, "exec: %zu bytes of %s lost: out of memory", n,
           err ? "stderr" : "stdout");
  lua_State *L = v->L;
  luaL_checkstack(L, 4, "vm");
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)r->id);
  lua_setfield(L, -2, "request");
  lua_pushstring(L, err ? "stderr" : "stdout");
  lua_setfield(L, -2, "stream");
  lua_pushinteger(L, (lua_Integer)n);
  lua_setfield(L, -2, "bytes");
  cl_vm_audit(v, L, "vm.output_lost", lua_gettop(L));
  lua_pop(L, 1);
  cl_chan_send(v, CLA_CANCEL, r->id, NULL, 0);
  req_fail(r, ENOMEM, msg);
}

static int queue_chunk(vm *v, vm_req *r, int err, const unsigned char *p, size_t n) {
  chunk *ch = malloc(sizeof *ch + n);
  if (!ch) return 0;
  ch->next = NULL;
  ch->err = err;
  ch->len = n;
  memcpy(ch->data, p, n);
  if (r->qtail)
    r->qtail->next = ch;
  else
    r->qhead = ch;
  r->qtail = ch;
  r->queued += n;
  if (r->queued >= STREAM_HIGH && !v->chan.throttled) { /* back-pressure on the guest */
    v->chan.throttled = 1;
    update_events(v);
  }
  return 1;
}

static void on_output(vm *v, vm_req *r, int err, const unsigned char *p, uint32_t len) {
  uint64_t *total = err ? &r->err_total : &r->out_total;
  uint64_t max = err ? r->max_err : r->max_out;
  int *trunc = err ? &r->trunc_err : &r->trunc_out;
  uint64_t room = *total < max ? max - *total : 0;
  size_t keep = len > room ? (size_t)room : len;
  *total += len;
  if (keep < len) *trunc = 1;
  if (!keep || r->failed) return;
  int kept =
      r->streaming ? queue_chunk(v, r, err, p, keep) : bbuf_add(err ? &r->err : &r->out, p, keep);
  if (!kept) output_lost(v, r, err, keep);
}

/* Handles one frame; returns 0 after a violation (the channel is closed). */
static int handle_frame(vm *v, const cla_header *h, const unsigned char *p) {
  vm_chan *c = &v->chan;
  cla_tlv t;
  uint64_t x;
  int r_;
  if (h->type == CLA_READY) {
    uint64_t version = 0;
    cla_tlv_init(&t, p, h->len);
    while ((r_ = cla_tlv_next(&t)) > 0) {
      if (t.tag == CLA_T_VERSION)
        cla_tlv_u64(&t, &version);
      else if (t.tag == CLA_T_UNAME)
        sanitize(c->uname, sizeof c->uname, t.val, t.len);
      else if (t.tag == CLA_T_UPTIME_MS && cla_tlv_u64(&t, &x))
        c->boot_ms = x;
      else if (t.tag == CLA_T_PID && cla_tlv_u64(&t, &x))
        c->agent_pid = x;
    }
    if (r_ < 0) return violation(v, "malformed READY frame"), 0;
    if (version != CLA_VERSION)
      return violation(v, "agent speaks protocol version %llu, the host %d",
                       (unsigned long long)version, CLA_VERSION),
             0;
    c->ready = 1;
    cl_vm_changed(v);
    return 1;
  }
  if (h->type == CLA_PONG && h->id && h->id == c->probe_id) {
    c->probe_id = 0;
    c->ready = 1;
    cl_vm_changed(v);
    return 1;
  }
  if (h->id == 0) {
    if (h->type == CLA_ERROR) return 1; /* the agent complains about something we sent */
    return violation(v, "frame of type %u without a request id", h->type), 0;
  }
  vm_req *r = find_req(v, h->id);
  if (!r) {
    if (h->id > c->next_id)
      return violation(v, "frame for request %u, which was never made", h->id), 0;
    return 1; /* a request the host gave up on: late frames are expected */
  }
  if (r->done || r->failed) return 1;
  static const int kind_of[] = {
      [CLA_PONG] = R_PING,   [CLA_STARTED] = R_EXEC, [CLA_STDOUT] = R_EXEC,
      [CLA_STDERR] = R_EXEC, [CLA_EXIT] = R_EXEC,    [CLA_STDIN_ACK] = R_EXEC,
      [CLA_RINFO] = R_READ,  [CLA_RDATA] = R_READ,   [CLA_REND] = R_READ};
  if (h->type != CLA_OK && h->type != CLA_ERROR) {
    if (h->type >= CL_ARRAY_LEN(kind_of) || !kind_of[h->type])
      return violation(v, "unknown frame type %u", h->type), 0;
    if (kind_of[h->type] != r->kind)
      return violation(v, "frame of type %u for request %u of another kind", h->type, h->id), 0;
  }
  switch (h->type) {
  case CLA_ERROR: {
    uint64_t err = 0;
    char msg[300] = "";
    cla_tlv_init(&t, p, h->len);
    while ((r_ = cla_tlv_next(&t)) > 0) {
      if (t.tag == CLA_T_ERRNO)
        cla_tlv_u64(&t, &err);
      else if (t.tag == CLA_T_MESSAGE)
        sanitize(msg, sizeof msg, t.val, t.len);
    }
    if (r_ < 0) return violation(v, "malformed ERROR frame"), 0;
    char full[400];
    snprintf(full, sizeof full, "vm %s: %s", v->id, msg[0] ? msg : "the agent reported an error");
    req_fail(r, err > 0 && err < 4096 ? (int)err : EIO, full);
    return 1;
  }
  case CLA_OK:
    if (r->kind == R_SHUTDOWN)
      r->done = 1;
    else if (r->kind == R_WRITE) {
      if (++r->oks == 2) {
        uint64_t size = UINT64_MAX;
        cla_tlv_init(&t, p, h->len);
        while (cla_tlv_next(&t) > 0)
          if (t.tag == CLA_T_SIZE) cla_tlv_u64(&t, &size);
        if (size != r->wlen)
          return violation(v, "write of %zu bytes acknowledged as %llu", r->wlen,
                           (unsigned long long)size),
                 0;
        r->done = 1;
      }
    } else {
      return violation(v, "OK frame for a request that expects none"), 0;
    }
    break;
  case CLA_PONG:
    r->done = 1;
    break;
  case CLA_STARTED:
    if (r->started) return violation(v, "request %u started twice", h->id), 0;
    cla_tlv_init(&t, p, h->len);
    while ((r_ = cla_tlv_next(&t)) > 0)
      if (t.tag == CLA_T_PID) cla_tlv_u64(&t, &r->guest_pid);
    if (r_ < 0) return violation(v, "malformed STARTED frame"), 0;
    r->started = 1;
    break;
  case CLA_STDOUT:
  case CLA_STDERR:
    if (!r->started) return violation(v, "output for request %u before it started", h->id), 0;
    on_output(v, r, h->type == CLA_STDERR, p, h->len);
    break;
  case CLA_STDIN_ACK: {
    uint64_t n = 0;
    cla_tlv_init(&t, p, h->len);
    while ((r_ = cla_tlv_next(&t)) > 0)
      if (t.tag == CLA_T_SIZE) cla_tlv_u64(&t, &n);
    if (r_ < 0 || r->in_acked + n > r->in_sent)
      return violation(v, "stdin acknowledged beyond what was sent"), 0;
    r->in_acked += n;
    break;
  }
  case CLA_EXIT: {
    int have = 0;
    cla_tlv_init(&t, p, h->len);
    while ((r_ = cla_tlv_next(&t)) > 0) {
      if (t.tag == CLA_T_CODE && cla_tlv_u64(&t, &x)) {
        if (x > 255) return violation(v, "exit code %llu", (unsigned long long)x), 0;
        r->exit_code = (int)x;
        have = 1;
      } else if (t.tag == CLA_T_SIGNAL && cla_tlv_u64(&t, &x)) {
        if (x == 0 || x >= 65) return violation(v, "exit signal %llu", (unsigned long long)x), 0;
        r->exit_signal = (int)x;
        have = 1;
      } else if (t.tag == CLA_T_FLAGS) {
        cla_tlv_u64(&t, &r->flags);
      } else if (t.tag == CLA_T_OUT_BYTES && cla_tlv_u64(&t, &x)) {
        if (x > r->out_total) r->out_total = x; /* what the command wrote, beyond what came */
      } else if (t.tag == CLA_T_ERR_BYTES && cla_tlv_u64(&t, &x)) {
        if (x > r->err_total) r->err_total = x;
      }
    }
    if (r_ < 0 || !have) return violation(v, "malformed EXIT frame"), 0;
    if (!r->started) return violation(v, "request %u exited before it started", h->id), 0;
    r->done = 1;
    break;
  }
  case CLA_RINFO:
    if (r->rinfo) return violation(v, "request %u described twice", h->id), 0;
    cla_tlv_init(&t, p, h->len);
    while ((r_ = cla_tlv_next(&t)) > 0) {
      if (t.tag == CLA_T_SIZE)
        cla_tlv_u64(&t, &r->rsize);
      else if (t.tag == CLA_T_MODE)
        cla_tlv_u64(&t, &r->rmode);
    }
    if (r_ < 0) return violation(v, "malformed RINFO frame"), 0;
    if (r->rsize > r->rmax)
      return violation(v, "announced a file of %llu bytes for a read capped at %llu",
                       (unsigned long long)r->rsize, (unsigned long long)r->rmax),
             0;
    r->rinfo = 1;
    break;
  case CLA_RDATA:
    if (!r->rinfo) return violation(v, "file data before its description"), 0;
    if (r->data.len + h->len > r->rmax)
      return violation(v, "sent more than the %llu bytes the read allows",
                       (unsigned long long)r->rmax),
             0;
    if (!bbuf_add(&r->data, p, h->len)) {
      req_fail(r, ENOMEM, "read_file: out of memory");
      return 1;
    }
    break;
  case CLA_REND:
    if (!r->rinfo) return violation(v, "end of a file never described"), 0;
    r->done = 1;
    break;
  default:
    break;
  }
  req_wake(r);
  return 1;
}

static void on_chan(cl_watch *w, uint32_t events) {
  vm *v = w->data;
  vm_chan *c = &v->chan;
  if (events & EPOLLOUT) flush_out(v);
  if (c->closed || c->fd < 0) return;
  if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)) || c->throttled) return;
  for (int rounds = 0; rounds < 16 && !c->closed && !c->throttled; rounds++) {
    ssize_t n = read(c->fd, c->in + c->in_len, IN_CAP - c->in_len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      char why[96];
      snprintf(why, sizeof why, "%s",
               n == 0 ? (v->exited ? "the VMM exited" : "end of stream from the guest")
                      : strerror(errno));
      cl_chan_close(v, why);
      return;
    }
    c->in_len += (size_t)n;
    c->bytes_in += (uint64_t)n;
    size_t off = 0;
    while (!c->closed && c->in_len - off >= CLA_HEADER) {
      cla_header h;
      if (!cla_header_get(c->in + off, &h)) {
        if (h.magic != CLA_MAGIC)
          violation(v, "bad frame header (magic 0x%04x)", h.magic);
        else
          violation(v, "frame of %u bytes, over the limit of %u", h.len, CLA_MAX_PAYLOAD);
        return;
      }
      if (c->in_len - off < CLA_HEADER + h.len) break;
      if (!handle_frame(v, &h, c->in + off + CLA_HEADER)) return;
      off += CLA_HEADER + h.len;
    }
    if (c->closed) return;
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
  }
}

int cl_chan_attach(vm *v, int fd) {
  vm_chan *c = &v->chan;
  if (!c->in) {
    c->in = malloc(IN_CAP);
    if (!c->in) {
      close(fd);
      return ENOMEM;
    }
  }
  cl_set_nonblock(fd, 1);
  c->fd = fd;
  c->closed = 0;
  c->ready = 0;
  c->error[0] = 0;
  c->in_len = 0;
  c->out_len = c->out_off = 0;
  c->throttled = 0;
  int e = cl_watch_start(v->loop, &c->watch, fd, EPOLLIN, on_chan);
  if (e) {
    close(fd);
    c->fd = -1;
    c->closed = 1;
    return e;
  }
  c->watch.data = v;
  c->watching = 1;
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Requests                                                                                   */

static void req_unlink(vm_req *r) {
  vm *v = r->v;
  if (!v) return;
  for (vm_req **p = &v->chan.reqs; *p; p = &(*p)->next)
    if (*p == r) {
      *p = r->next;
      break;
    }
  r->v = NULL;
}

static void req_free_data(vm_req *r) {
  bbuf_free(&r->out);
  bbuf_free(&r->err);
  bbuf_free(&r->data);
  while (r->qhead) {
    chunk *ch = r->qhead;
    r->qhead = ch->next;
    free(ch);
  }
  r->qtail = NULL;
  r->queued = 0;
}

static void unthrottle(vm *v) {
  if (!v || !v->chan.throttled) return;
  size_t q = 0;
  for (vm_req *r = v->chan.reqs; r; r = r->next) q += r->queued;
  if (q < STREAM_HIGH / 2) {
    v->chan.throttled = 0;
    update_events(v);
  }
}

static void req_release(vm_req *r) {
  vm *v = r->v;
  r->w = NULL;
  if (v && !v->released && !r->done && !r->failed && !v->chan.closed &&
      (r->kind == R_EXEC || r->kind == R_WRITE || r->kind == R_READ))
    cl_chan_send(v, CLA_CANCEL, r->id, NULL,
                 0); /* kills the command, drops the file, stops a read */
  req_unlink(r);
  req_free_data(r);
  unthrottle(v);
}

static int req_gc(lua_State *L) {
  req_release(lua_touserdata(L, 1));
  return 0;
}

static void req_abort(cl_wait *w) {
  vm_req *r = w->data;
  if (r) req_release(r);
}

static vm_req *new_req(lua_State *L, vm *v, int kind) {
  vm_req *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  luaL_setmetatable(L, REQ_MT);
  r->kind = kind;
  r->v = v;
  r->id = ++v->chan.next_id;
  r->t0 = cl_now_ns();
  r->next = v->chan.reqs;
  v->chan.reqs = r;
  return r;
}

static int agent_unavailable(lua_State *L, vm *v, const char *what) {
  if (v->channel == CH_NONE)
    return cl_failf(L, ENOTSUP, "vm %s: %s: the vm has no guest agent channel", v->id, what);
  if (v->chan.error[0])
    return cl_failf(L, EPIPE, "vm %s: %s: the guest agent channel is closed: %s", v->id, what,
                    v->chan.error);
  return cl_failf(L, ENOTCONN, "vm %s: %s: the guest agent is not ready (the vm is %s)", v->id,
                  what, cl_vm_state_name(v->state));
}

static int req_failed(lua_State *L, vm_req *r) {
  int code = r->code;
  lua_pushnil(L);
  lua_pushstring(L, r->error);
  lua_pushinteger(L, code);
  req_release(r);
  return 3;
}

/* Suspends until the request changes; k resumes. */
static int req_wait(lua_State *L, vm_req *r, cl_wait *w, lua_KFunction k, lua_KContext ctx) {
  r->w = w;
  w->data = r;
  w->on_abort = req_abort;
  w->external = 1;
  return cl_wait_suspend(L, w, k, ctx);
}

/* TLV helpers for requests */
/* Writes TLVs into p, or only counts them when p is NULL. */
typedef struct tlvw {
  unsigned char *p;
  size_t n;
} tlvw;

static void tlvw_add(tlvw *t, uint16_t tag, const void *v, size_t len) {
  if (t->p) {
    cla_put16(t->p + t->n, tag);
    cla_put32(t->p + t->n + 2, (uint32_t)len);
    if (len) memcpy(t->p + t->n + 6, v, len);
  }
  t->n += 6 + len;
}

static void tlvw_u64(tlvw *t, uint16_t tag, uint64_t x) {
  unsigned char v[8];
  cla_put64(v, x);
  tlvw_add(t, tag, v, 8);
}

static void tlv_add(luaL_Buffer *b, uint16_t tag, const void *v, size_t len) {
  unsigned char h[6];
  cla_put16(h, tag);
  cla_put32(h + 2, (uint32_t)len);
  luaL_addlstring(b, (const char *)h, 6);
  luaL_addlstring(b, v, len);
}

static void tlv_add_u64(luaL_Buffer *b, uint16_t tag, uint64_t x) {
  unsigned char v[8];
  cla_put64(v, x);
  tlv_add(b, tag, v, 8);
}

/* ------------------------------------------------------------------------------------------ */
/* vm:exec                                                                                    */

static void push_exec_result(lua_State *L, vm_req *r) {
  lua_createtable(L, 0, 10);
  if (r->exit_signal) {
    lua_pushinteger(L, r->exit_signal);
    lua_setfield(L, -2, "signal");
    lua_pushstring(L, cl_signal_name(r->exit_signal));
    lua_setfield(L, -2, "signal_name");
  } else {
    lua_pushinteger(L, r->exit_code);
    lua_setfield(L, -2, "code");
  }
  if (!r->streaming) {
    lua_pushlstring(L, r->out.p ? r->out.p : "", r->out.len);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, r->err.p ? r->err.p : "", r->err.len);
    lua_setfield(L, -2, "stderr");
  }
  int trunc =
      r->trunc_out || r->trunc_err || (r->flags & (CLA_F_OUT_TRUNCATED | CLA_F_ERR_TRUNCATED));
  lua_pushboolean(L, trunc);
  lua_setfield(L, -2, "truncated");
  lua_pushboolean(L, (r->flags & CLA_F_TIMED_OUT) != 0);
  lua_setfield(L, -2, "timed_out");
  lua_pushinteger(L, (lua_Integer)r->guest_pid);
  lua_setfield(L, -2, "pid");
  lua_pushnumber(L, (double)(cl_now_ns() - r->t0) / 1e9);
  lua_setfield(L, -2, "duration");
  lua_pushinteger(L, (lua_Integer)r->out_total);
  lua_setfield(L, -2, "stdout_bytes");
  lua_pushinteger(L, (lua_Integer)r->err_total);
  lua_setfield(L, -2, "stderr_bytes");
}

/* Sends as much stdin as the window and the queue allow. */
static void pump_stdin(vm *v, vm_req *r) {
  r->want_write = 0;
  while (r->in_data && r->in_sent < r->in_len && !v->chan.closed) {
    if (r->in_sent - r->in_acked >= CLA_STDIN_WINDOW) return; /* the agent acks as it writes */
    if (v->chan.out_len >= OUT_HIGH) {
      r->want_write = 1;
      return;
    }
    size_t n = r->in_len - r->in_sent;
    if (n > CLA_CHUNK) n = CLA_CHUNK;
    if (r->in_sent - r->in_acked + n > CLA_STDIN_WINDOW)
      n = CLA_STDIN_WINDOW - (size_t)(r->in_sent - r->in_acked);
    if (cl_chan_send(v, CLA_STDIN, r->id, r->in_data + r->in_sent, n)) return;
    r->in_sent += n;
  }
  if (r->in_data && !r->in_eof_sent && r->in_sent == r->in_len && !v->chan.closed) {
    if (cl_chan_send(v, CLA_STDIN, r->id, NULL, 0) == 0) r->in_eof_sent = 1;
  }
}

/* Stack: 1 vm, 2 options, 3 request, 4 wait */
static int exec_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  lua_settop(L, (int)ctx);
  while (r->qhead) { /* streamed output: one chunk per callback call */
    chunk *ch = r->qhead;
    r->qhead = ch->next;
    if (!r->qhead) r->qtail = NULL;
    r->queued -= ch->len;
    lua_getfield(L, 2, ch->err ? "on_stderr" : "on_stdout");
    lua_pushlstring(L, ch->data, ch->len);
    free(ch);
    unthrottle(r->v);
    /* A callback that waits resumes here, in exec_k, and the loop goes on with the next chunk. */
    if (lua_isfunction(L, -2)) lua_callk(L, 1, 0, ctx, exec_k);
    lua_settop(L, (int)ctx);
  }
  if (r->failed) return req_failed(L, r);
  vm *v = r->v;
  if (!v || v->released) return cl_failf(L, ECANCELED, "exec: the vm was closed");
  if (r->done) {
    push_exec_result(L, r);
    lua_createtable(L, 0, 3);
    lua_getfield(L, -2, "code");
    lua_setfield(L, -2, "code");
    lua_getfield(L, -2, "signal_name");
    lua_setfield(L, -2, "signal");
    lua_getfield(L, -2, "duration");
    lua_setfield(L, -2, "duration");
    cl_vm_audit(v, L, "vm.exec_done", lua_gettop(L));
    lua_pop(L, 1);
    req_release(r);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    char msg[200];
    snprintf(msg, sizeof msg,
             "vm %s: exec: no answer from the guest agent %.0f s after the command's timeout",
             v->id, EXEC_GRACE);
    cl_chan_send(v, CLA_CANCEL, r->id, NULL, 0); /* the agent kills what is left of it */
    req_fail(r, ETIMEDOUT, msg);
    return req_failed(L, r);
  }
  pump_stdin(v, r);
  if (r->failed) return req_failed(L, r);
  return req_wait(L, r, w, exec_k, ctx);
}

/* Lua: vm:exec{argv... | argv=, env=, env_clear=, cwd=, stdin=, timeout=, max_output=, on_stdout=,
 * on_stderr=} -> {code=|signal=, stdout=, stderr=, truncated=, timed_out=, duration=, pid=} */
static int l_exec(lua_State *L) {
  static const char *const fields[] = {"argv",    "env",        "env_clear", "cwd",       "stdin",
                                       "timeout", "max_output", "on_stdout", "on_stderr", NULL};
  vm *v = cl_vm_check(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  cl_check_fields(L, 2, fields);
  char **argv;
  if (lua_getfield(L, 2, "argv") != LUA_TNIL) {
    if (lua_rawlen(L, 2) > 0) cl_field_error(L, "argv", "given twice (positional and argv=)");
    argv = cl_check_argv(L, -1, "argv", 0);
  } else {
    argv = cl_check_argv(L, 2, "argv", 0);
  }
  int argv_idx = lua_gettop(L);
  size_t nargs = 0;
  while (argv[nargs]) nargs++;
  if (nargs > CLA_MAX_ARGS) cl_field_error(L, "argv", "more arguments than the agent accepts");
  int has_timeout = lua_getfield(L, 2, "timeout") != LUA_TNIL;
  lua_pop(L, 1);
  double timeout = cl_opt_number(L, 2, "timeout", -1); /* nil: no limit */
  if (has_timeout && timeout < 0) cl_field_error(L, "timeout", "non-negative seconds expected");
  lua_Integer max_out = cl_opt_integer(L, 2, "max_output", (lua_Integer)DEFAULT_MAX_OUTPUT);
  if (max_out < 0) cl_field_error(L, "max_output", "must not be negative");
  const char *cwd = cl_opt_string(L, 2, "cwd", NULL);
  size_t in_len = 0;
  const char *in = NULL;
  if (lua_getfield(L, 2, "stdin") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING) cl_field_error(L, "stdin", "string expected");
    in = lua_tolstring(L, -1, &in_len);
  }
  lua_pop(L, 1);
  int streaming = 0;
  for (int i = 0; i < 2; i++) {
    const char *k = i ? "on_stderr" : "on_stdout";
    int t = lua_getfield(L, 2, k);
    if (t != LUA_TNIL && t != LUA_TFUNCTION) cl_field_error(L, k, "function expected");
    if (t == LUA_TFUNCTION) streaming = 1;
    lua_pop(L, 1);
  }
  /* The environment as "K=V" strings, every entry checked before anything is built. */
  lua_newtable(L);
  int envt = lua_gettop(L);
  lua_Integer nenv = 0;
  if (lua_getfield(L, 2, "env") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "env", "table expected");
    int ei = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, ei)) {
      if (lua_type(L, -2) != LUA_TSTRING ||
          (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER))
        cl_field_error(L, "env", "string keys with string values expected");
      size_t kl, vl;
      const char *k = lua_tolstring(L, -2, &kl);
      const char *val = lua_tolstring(L, -1, &vl);
      if (kl == 0 || strchr(k, '=') || strlen(k) != kl || strlen(val) != vl)
        cl_field_error(L, "env", lua_pushfstring(L, "invalid variable '%s'", k));
      lua_pushfstring(L, "%s=%s", k, val);
      lua_rawseti(L, envt, ++nenv);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  if (nenv > CLA_MAX_ARGS) cl_field_error(L, "env", "more entries than the agent accepts");
  int env_clear = cl_opt_boolean(L, 2, "env_clear", 0);
  /* The payload, sized first and then written into a userdata: nothing to leak on an error. */
  unsigned char *payload = NULL;
  size_t plen = 0;
  for (int pass = 0; pass < 2; pass++) {
    tlvw tw = {payload, 0};
    for (size_t i = 0; i < nargs; i++) tlvw_add(&tw, CLA_T_ARG, argv[i], strlen(argv[i]));
    if (env_clear) tlvw_u64(&tw, CLA_T_ENV_CLEAR, 1);
    for (lua_Integer i = 1; i <= nenv; i++) {
      size_t l;
      lua_rawgeti(L, envt, i);
      const char *kv = lua_tolstring(L, -1, &l);
      tlvw_add(&tw, CLA_T_ENV, kv, l);
      lua_pop(L, 1);
    }
    if (cwd) tlvw_add(&tw, CLA_T_CWD, cwd, strlen(cwd));
    if (timeout >= 0) /* 0: the agent kills it at once unless it is done (1 ms) */
      tlvw_u64(&tw, CLA_T_TIMEOUT_MS, timeout < 0.001 ? 1 : (uint64_t)(timeout * 1000.0 + 0.5));
    tlvw_u64(&tw, CLA_T_MAX_OUT, (uint64_t)max_out);
    tlvw_u64(&tw, CLA_T_MAX_ERR, (uint64_t)max_out);
    tlvw_u64(&tw, CLA_T_STDIN, in != NULL);
    plen = tw.n;
    if (pass == 0) {
      if (plen > CLA_MAX_PAYLOAD)
        return cl_failf(L, E2BIG, "vm %s: exec: arguments and environment exceed %d bytes", v->id,
                        CLA_MAX_PAYLOAD);
      payload = lua_newuserdatauv(L, plen ? plen : 1, 0);
    }
  }
  if (!v->chan.ready || v->chan.closed) return agent_unavailable(L, v, "exec");
  CL_UNUSED(argv_idx);
  vm_req *r = new_req(L, v, R_EXEC);
  r->max_out = r->max_err = (uint64_t)max_out;
  r->streaming = streaming;
  r->in_data = in;
  r->in_len = in_len;
  int e = cl_chan_send(v, CLA_EXEC, r->id, payload, plen);
  if (e) {
    req_release(r);
    return cl_failf(L, e, "vm %s: exec: %s", v->id, strerror(e));
  }
  lua_createtable(L, 0, 2);
  lua_createtable(L, (int)nargs, 0);
  for (size_t i = 0; i < nargs; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "argv");
  cl_vm_audit(v, L, "vm.exec", lua_gettop(L));
  lua_pop(L, 1);
  /* Stack: 1 vm, 2 options, 3 request, 4 wait */
  lua_replace(L, 3);
  lua_settop(L, 3);
  cl_wait *w = cl_wait_push(L);
  if (timeout >= 0) w->deadline = cl_deadline(timeout + EXEC_GRACE);
  pump_stdin(v, r);
  if (r->failed) return req_failed(L, r);
  return req_wait(L, r, w, exec_k, lua_gettop(L));
}

/* ------------------------------------------------------------------------------------------ */
/* vm:write_file, vm:read_file, vm:ping                                                       */

/* Stack: 1 vm, 2 path, 3 data, 4 options, 5 request, 6 wait */
static int write_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  if (r->failed) return req_failed(L, r);
  vm *v = r->v;
  if (!v || v->released) return cl_failf(L, ECANCELED, "write_file: the vm was closed");
  if (r->done) {
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "path");
    lua_pushinteger(L, (lua_Integer)r->wlen);
    lua_setfield(L, -2, "size");
    cl_vm_audit(v, L, "vm.write_file", lua_gettop(L));
    lua_pop(L, 1);
    req_release(r);
    lua_pushboolean(L, 1);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    req_release(r); /* cancels the write: no file is left */
    return cl_timed_out(L);
  }
  r->want_write = 0;
  while (r->wsent < r->wlen && !v->chan.closed) {
    if (v->chan.out_len >= OUT_HIGH) {
      r->want_write = 1;
      break;
    }
    size_t n = r->wlen - r->wsent;
    if (n > CLA_CHUNK) n = CLA_CHUNK;
    if (cl_chan_send(v, CLA_WDATA, r->id, r->wdata + r->wsent, n)) break;
    r->wsent += n;
  }
  if (r->wsent == r->wlen && !r->wend_sent && !v->chan.closed &&
      cl_chan_send(v, CLA_WEND, r->id, NULL, 0) == 0)
    r->wend_sent = 1;
  if (r->failed) return req_failed(L, r);
  return req_wait(L, r, w, write_k, ctx);
}

static lua_Integer opt_mode(lua_State *L, int idx) {
  int t = lua_getfield(L, idx, "mode");
  lua_Integer mode = 0644;
  if (t == LUA_TNUMBER && lua_isinteger(L, -1))
    mode = lua_tointeger(L, -1);
  else if (t == LUA_TSTRING) {
    char *end;
    mode = strtol(lua_tostring(L, -1), &end, 8);
    if (*end || end == lua_tostring(L, -1))
      cl_field_error(L, "mode", "octal string or integer expected");
  } else if (t != LUA_TNIL) {
    cl_field_error(L, "mode", "octal string or integer expected");
  }
  lua_pop(L, 1);
  if (mode < 0 || mode > 07777) cl_field_error(L, "mode", "between 0 and 07777 expected");
  return mode;
}

static void check_path(lua_State *L, int idx, const char *what) {
  size_t n;
  const char *p = luaL_checklstring(L, idx, &n);
  if (n == 0 || n >= 4096 || strlen(p) != n)
    luaL_argerror(L, idx, "a path of 1 to 4095 bytes without NUL");
  if (p[0] != '/') luaL_argerror(L, idx, lua_pushfstring(L, "%s needs an absolute path", what));
}

/* Lua: vm:write_file(path, data, [{mode=0644}]) -> true | nil, err (atomic: renamed into place) */
static int l_write_file(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  check_path(L, 2, "write_file");
  size_t len;
  const char *data = luaL_checklstring(L, 3, &len);
  lua_Integer mode = 0644;
  double timeout = -1;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    static const char *const fields[] = {"mode", "timeout", NULL};
    cl_check_fields(L, 4, fields);
    mode = opt_mode(L, 4);
    timeout = cl_opt_number(L, 4, "timeout", -1);
  }
  lua_settop(L, 4);
  if (!v->chan.ready || v->chan.closed) return agent_unavailable(L, v, "write_file");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t pl;
  const char *path = lua_tolstring(L, 2, &pl);
  tlv_add(&b, CLA_T_PATH, path, pl);
  tlv_add_u64(&b, CLA_T_MODE, (uint64_t)mode);
  tlv_add_u64(&b, CLA_T_SIZE, len);
  luaL_pushresult(&b);
  size_t plen;
  const char *payload = lua_tolstring(L, -1, &plen);
  vm_req *r = new_req(L, v, R_WRITE);
  r->wdata = data;
  r->wlen = len;
  int e = cl_chan_send(v, CLA_WRITE, r->id, payload, plen);
  if (e) {
    req_release(r);
    return cl_failf(L, e, "vm %s: write_file: %s", v->id, strerror(e));
  }
  lua_replace(L, 5);
  lua_settop(L, 5);
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return write_k(L, LUA_OK, lua_gettop(L));
}

/* Stack: 1 vm, 2 path, 3 options, 4 request, 5 wait */
static int read_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  if (r->failed) return req_failed(L, r);
  vm *v = r->v;
  if (!v || v->released) return cl_failf(L, ECANCELED, "read_file: the vm was closed");
  if (r->done) {
    lua_pushlstring(L, r->data.p ? r->data.p : "", r->data.len);
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "path");
    lua_pushinteger(L, (lua_Integer)r->data.len);
    lua_setfield(L, -2, "size");
    cl_vm_audit(v, L, "vm.read_file", lua_gettop(L));
    lua_pop(L, 1);
    req_release(r);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    req_release(r);
    return cl_timed_out(L);
  }
  return req_wait(L, r, w, read_k, ctx);
}

/* Lua: vm:read_file(path, [{max=64 MiB}]) -> data | nil, err */
static int l_read_file(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  check_path(L, 2, "read_file");
  lua_Integer max = (lua_Integer)DEFAULT_MAX_READ;
  double timeout = -1;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    static const char *const fields[] = {"max", "timeout", NULL};
    cl_check_fields(L, 3, fields);
    timeout = cl_opt_number(L, 3, "timeout", -1);
    max = cl_opt_integer(L, 3, "max", max);
    if (max < 0 || (uint64_t)max > MAX_FILE)
      cl_field_error(L, "max", "between 0 and 2^40 expected");
  }
  lua_settop(L, 3);
  if (!v->chan.ready || v->chan.closed) return agent_unavailable(L, v, "read_file");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t pl;
  const char *path = lua_tolstring(L, 2, &pl);
  tlv_add(&b, CLA_T_PATH, path, pl);
  tlv_add_u64(&b, CLA_T_MAX, (uint64_t)max);
  luaL_pushresult(&b);
  size_t plen;
  const char *payload = lua_tolstring(L, -1, &plen);
  vm_req *r = new_req(L, v, R_READ);
  r->rmax = (uint64_t)max;
  int e = cl_chan_send(v, CLA_READ, r->id, payload, plen);
  if (e) {
    req_release(r);
    return cl_failf(L, e, "vm %s: read_file: %s", v->id, strerror(e));
  }
  lua_replace(L, 4);
  lua_settop(L, 4);
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return req_wait(L, r, w, read_k, lua_gettop(L));
}

/* Stack: 1 vm, 2 timeout, 3 request, 4 wait */
static int ping_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  if (r->failed) return req_failed(L, r);
  if (r->done) {
    lua_pushnumber(L, (double)(cl_now_ns() - r->t0) / 1e9);
    req_release(r);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    req_release(r);
    return cl_timed_out(L);
  }
  return req_wait(L, r, w, ping_k, ctx);
}

/* Lua: vm:ping([timeout]) -> round-trip seconds | nil, "timeout", "ETIMEDOUT" | nil, err */
static int l_ping(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  if (!lua_isnoneornil(L, 2) && timeout < 0)
    return luaL_argerror(L, 2, "non-negative seconds expected");
  lua_settop(L, 2);
  if (!v->chan.ready || v->chan.closed) return agent_unavailable(L, v, "ping");
  vm_req *r = new_req(L, v, R_PING);
  int e = cl_chan_send(v, CLA_PING, r->id, NULL, 0);
  if (e) {
    req_release(r);
    return cl_failf(L, e, "vm %s: ping: %s", v->id, strerror(e));
  }
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return req_wait(L, r, w, ping_k, lua_gettop(L));
}

/* Asks the agent to power the guest off (shutdown's first attempt); no answer is awaited. */
int cl_chan_request_poweroff(vm *v, int reboot) {
  if (!v->chan.ready || v->chan.closed) return ENOTCONN;
  unsigned char tlv[14];
  cla_put16(tlv, CLA_T_ACTION);
  cla_put32(tlv + 2, 8);
  cla_put64(tlv + 6, reboot ? CLA_ACTION_REBOOT : CLA_ACTION_POWEROFF);
  return cl_chan_send(v, CLA_SHUTDOWN, ++v->chan.next_id, tlv, sizeof tlv);
}

void cl_chan_probe(vm *v) {
  v->chan.probe_id = ++v->chan.next_id;
  cl_chan_send(v, CLA_PING, v->chan.probe_id, NULL, 0);
}

static const luaL_Reg chan_methods[] = {
    {"exec", l_exec}, {"write_file", l_write_file}, {"read_file", l_read_file}, {"ping", l_ping},
    {NULL, NULL},
};

int cl_chan_open_methods(lua_State *L) {
  luaL_setfuncs(L, chan_methods, 0);
  luaL_newmetatable(L, REQ_MT);
  lua_pushcfunction(L, req_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  return 0;
}
