/*
 * The host side of the guest agent channel (protocol: runtime/guest/proto.h): the connection,
 * frames and requests under vm:exec, vm:write_file, vm:read_file, vm:ping (their Lua side is
 * guest.c), and the READY the start of a VM waits for.
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
#include "chan.h"
#include "input.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <unistd.h>

static int bbuf_add(bbuf *b, const void *p, size_t n) {
  if (n == 0) return 1; /* an empty RDATA/STDOUT frame on an empty buffer: NULL + 0 is UB */
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

void cl_chan_req_fail(vm_req *r, int code, const char *msg) {
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
  for (vm_req *r = c->reqs; r; r = r->next) cl_chan_req_fail(r, EPIPE, msg);
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
  cl_chan_req_fail(r, ENOMEM, msg);
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

/* A test seam, reached only through require "clawlua.vm_faults" (tests; not in the public
 * module): the next n allocations for guest output fail as a failing malloc would, so the loss
 * path above runs for real in tests. Off (0) unless a test arms it. */
static lua_Integer output_alloc_failures;

static int output_alloc_fails(void) {
  if (output_alloc_failures <= 0) return 0;
  output_alloc_failures--;
  return 1;
}

/* Lua: faults.fail_output_allocs(n) -> the count it replaced */
static int l_fail_output_allocs(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 0, 1, "must not be negative");
  lua_pushinteger(L, output_alloc_failures);
  output_alloc_failures = n;
  return 1;
}

int cl_chan_open_faults(lua_State *L) {
  static const luaL_Reg funcs[] = {{"fail_output_allocs", l_fail_output_allocs}, {NULL, NULL}};
  luaL_newlib(L, funcs);
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
  int kept = !output_alloc_fails() && (r->streaming ? queue_chunk(v, r, err, p, keep)
                                                    : bbuf_add(err ? &r->err : &r->out, p, keep));
  if (!kept) output_lost(v, r, err, keep);
}

/* Frames about the connection itself: READY, the answer to a probe. 1 handled, 0 violation,
 * -1 not one of them. */
static int connection_frame(vm *v, const cla_header *h, const unsigned char *p) {
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
  return -1;
}

/* The request a frame names, checked to be one the host made and of the frame's kind. Sets *rp
 * (NULL: a late frame for a request given up on, or an ERROR about something we sent). Returns 0
 * after a violation. */
static int frame_request(vm *v, const cla_header *h, vm_req **rp) {
  vm_chan *c = &v->chan;
  *rp = NULL;
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
  *rp = r;
  return 1;
}

/* ERROR, OK and PONG: the end of any request. Returns 0 after a violation. */
static int reply_frame(vm *v, vm_req *r, const cla_header *h, const unsigned char *p) {
  cla_tlv t;
  int r_;
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
    cl_chan_req_fail(r, err > 0 && err < 4096 ? (int)err : EIO, full);
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
  default:
    break;
  }
  return 1;
}

/* The frames of an exec: STARTED, STDOUT, STDERR, STDIN_ACK, EXIT. */
static int exec_frame(vm *v, vm_req *r, const cla_header *h, const unsigned char *p) {
  cla_tlv t;
  uint64_t x;
  int r_;
  switch (h->type) {
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
  default:
    break;
  }
  return 1;
}

/* The frames of a read_file: RINFO, RDATA, REND. */
static int read_frame(vm *v, vm_req *r, const cla_header *h, const unsigned char *p) {
  cla_tlv t;
  int r_;
  switch (h->type) {
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
      cl_chan_req_fail(r, ENOMEM, "read_file: out of memory");
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
  return 1;
}

/* Handles one frame; returns 0 after a violation (the channel is closed). */
static int handle_frame(vm *v, const cla_header *h, const unsigned char *p) {
  int done = connection_frame(v, h, p);
  if (done >= 0) return done;
  vm_req *r;
  if (!frame_request(v, h, &r)) return 0;
  if (!r) return 1;
  int ok;
  if (h->type == CLA_ERROR || h->type == CLA_OK || h->type == CLA_PONG)
    ok = reply_frame(v, r, h, p);
  else if (r->kind == R_EXEC)
    ok = exec_frame(v, r, h, p);
  else
    ok = read_frame(v, r, h, p);
  if (!ok) return 0;
  if (h->type == CLA_ERROR || (h->type == CLA_RDATA && r->failed)) return 1;
  req_wake(r);
  return 1;
}

/* Why the channel ended. A VMM that dies (SIGKILL mid-exec) closes its end of the socket a
 * moment before its pidfd says it exited, so the end of stream alone would blame the guest:
 * wait for that moment (20 ms at most, only at an end of stream while the VMM seems alive). */
static void eof_reason(vm *v, char *why, size_t n) {
  if (!v->exited && v->pidfd >= 0) {
    struct pollfd p = {.fd = v->pidfd, .events = POLLIN};
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (poll(&p, 1, 20) == 1 &&
        waitid((idtype_t)P_PIDFD, (id_t)v->pidfd, &si, WEXITED | WNOHANG | WNOWAIT) == 0 &&
        si.si_pid != 0) {
      if (si.si_code == CLD_EXITED)
        snprintf(why, n, "the VMM exited (code %d)", si.si_status);
      else
        snprintf(why, n, "the VMM was killed (%s)", cl_signal_name(si.si_status));
      return;
    }
  }
  snprintf(why, n, "%s", v->exited ? "the VMM exited" : "end of stream from the guest");
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
      if (n == 0)
        eof_reason(v, why, sizeof why);
      else
        snprintf(why, sizeof why, "%s", strerror(errno));
      cl_chan_close(v, why);
      return;
    }
    cl_chan_input(v, (size_t)n);
  }
}

void cl_chan_input(vm *v, size_t n) {
  vm_chan *c = &v->chan;
  c->in_len += n;
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

void cl_chan_unthrottle(vm *v) {
  if (!v || !v->chan.throttled) return;
  size_t q = 0;
  for (vm_req *r = v->chan.reqs; r; r = r->next) q += r->queued;
  if (q < STREAM_HIGH / 2) {
    v->chan.throttled = 0;
    update_events(v);
  }
}

void cl_chan_req_release(vm_req *r) {
  vm *v = r->v;
  r->w = NULL;
  if (v && !v->released && !r->done && !r->failed && !v->chan.closed &&
      (r->kind == R_EXEC || r->kind == R_WRITE || r->kind == R_READ))
    cl_chan_send(v, CLA_CANCEL, r->id, NULL,
                 0); /* kills the command, drops the file, stops a read */
  req_unlink(r);
  req_free_data(r);
  cl_chan_unthrottle(v);
}

int cl_chan_req_gc(lua_State *L) {
  cl_chan_req_release(lua_touserdata(L, 1));
  return 0;
}

static void req_abort(cl_wait *w) {
  vm_req *r = w->data;
  if (r) cl_chan_req_release(r);
}

vm_req *cl_chan_new_req(lua_State *L, vm *v, int kind) {
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

int cl_chan_unavailable(lua_State *L, vm *v, const char *what) {
  if (v->channel == CH_NONE)
    return cl_failf(L, ENOTSUP, "vm %s: %s: the vm has no guest agent channel", v->id, what);
  if (v->chan.error[0])
    return cl_failf(L, EPIPE, "vm %s: %s: the guest agent channel is closed: %s", v->id, what,
                    v->chan.error);
  return cl_failf(L, ENOTCONN, "vm %s: %s: the guest agent is not ready (the vm is %s)", v->id,
                  what, cl_vm_state_name(v->state));
}

int cl_chan_req_failed(lua_State *L, vm_req *r) {
  int code = r->code;
  lua_pushnil(L);
  lua_pushstring(L, r->error);
  cl_push_errcode(L, code);
  cl_chan_req_release(r);
  return 3;
}

/* Suspends until the request changes; k resumes. */
int cl_chan_req_wait(lua_State *L, vm_req *r, cl_wait *w, lua_KFunction k, lua_KContext ctx) {
  r->w = w;
  w->data = r;
  w->on_abort = req_abort;
  w->external = 1;
  return cl_wait_suspend(L, w, k, ctx);
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

/* The shutdown operation, shared by both drivers. */
int cl_shutdown_step(lua_State *L, vm *v, cl_wait *w, int (*ask_vmm)(vm *v)) {
  if (w->aux[0] == 0) {
    v->state = VS_STOPPING;
    const char *how = "agent";
    int e = cl_chan_request_poweroff(v, v->backend == VM_FIRECRACKER);
    if (e) {
      how = v->backend == VM_QEMU ? "acpi power button" : "ctrl-alt-del";
      e = ask_vmm(v);
    }
    lua_createtable(L, 0, 2);
    lua_pushstring(L, e ? "none (killed)" : how);
    lua_setfield(L, -2, "how");
    lua_pushnumber(L, v->shutdown_timeout);
    lua_setfield(L, -2, "timeout");
    cl_vm_audit(v, L, "vm.shutdown", lua_gettop(L));
    lua_pop(L, 1);
    w->deadline = cl_deadline(v->shutdown_timeout);
    w->aux[0] = 1;
    if (e) w->state = CL_WAIT_TIMEOUT; /* nobody to ask: straight to the kill */
  }
  if (w->aux[0] == 1) {
    if (v->exited) goto done;
    if (w->state != CL_WAIT_TIMEOUT) return VM_WAIT;
    cl_vm_kill(v);
    w->deadline = cl_deadline(10);
    w->state = CL_WAIT_DONE;
    w->aux[0] = 2;
  }
  if (v->exited) goto done;
  if (w->state == CL_WAIT_TIMEOUT)
    return cl_vm_fail(L, v, 0, 0, ETIMEDOUT, "shutdown: the VMM did not exit after SIGKILL");
  return VM_WAIT;
done:
  lua_createtable(L, 0, 2);
  lua_pushboolean(L, w->aux[0] == 1 && !v->exit_signal);
  lua_setfield(L, -2, "graceful");
  if (v->exit_signal) {
    lua_pushstring(L, cl_signal_name(v->exit_signal));
    lua_setfield(L, -2, "signal");
  } else {
    lua_pushinteger(L, v->exit_code);
    lua_setfield(L, -2, "code");
  }
  return 1;
}
