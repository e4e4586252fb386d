/*
 * The kernel as an audit source: seccomp records (type 1326, AUDIT_SECCOMP) read from the kernel
 * audit multicast group (NETLINK_AUDIT, AUDIT_NLGRP_READLOG) on a non-blocking netlink socket
 * watched by the loop, turned into seccomp.* events and attributed to the sandbox that owns the
 * pid (the pid table, processes that exited moments ago, then the nearest tracked ancestor).
 *
 * The record's code is the action only (the kernel masks out the errno or trap data).
 * The kernel logs a seccomp action when the action is in /proc/sys/kernel/seccomp/actions_logged
 * and, for errno/trap/trace/user_notif, only when the filter was loaded with
 * SECCOMP_FILTER_FLAG_LOG; kills are always logged. Reading the group needs CAP_AUDIT_READ, and
 * the kernel multicasts only in the initial network namespace: elsewhere the source reports
 * itself unavailable once, as an "audit.source.unavailable" event, and the runtime carries on.
 *
 * It starts by itself when the first process is attributed to a sandbox (cl_audit_track_pid),
 * and records only denials of processes it can attribute, unless scope = "all".
 */
#include "audit_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <linux/audit.h>
#include <linux/netlink.h>
#include <seccomp.h>

#ifndef AUDIT_NLGRP_READLOG
#define AUDIT_NLGRP_READLOG 1
#endif
#define RECV_BUF       65536
#define MAX_PER_WAKE   256
#define DEFAULT_RCVBUF (1 << 20)
#define FIELD_MAX      512

enum { K_STOPPED, K_RUNNING, K_UNAVAILABLE };
static const char *const state_names[] = {"stopped", "running", "unavailable"};

struct ksource {
  int fd;
  int state;
  int scope_all;
  int rcvbuf;    /* socket receive buffer asked for (bytes) */
  int announced; /* the unavailable event was emitted */
  cl_watch watch;
  audit *a;
  char error[160];
  uint64_t records, events, unmatched, malformed, overruns;
  uint64_t overruns_reported, last_overrun_report;
  char *buf;
};

/* ------------------------------------------------------------------------------------------ */
/* Parsing: audit(1795928580.265:2): auid=4294967295 uid=0 ... syscall=110 compat=0 ip=0x7f...  */

typedef struct kfield {
  const char *k;
  size_t kl;
  const char *v;
  size_t vl;
  int quoted;
} kfield;

/* Next key=value token from *p; 0 at the end. Values are quoted ("..."), or bare up to a space. */
static int next_field(const char **p, const char *e, kfield *f) {
  const char *s = *p;
  while (s < e && (*s == ' ' || *s == '\n' || *s == 0)) s++;
  if (s >= e) return 0;
  const char *k = s;
  while (s < e && *s != '=' && *s != ' ') s++;
  if (s >= e || *s != '=') { /* a word without value: skip it */
    *p = s;
    f->k = k;
    f->kl = (size_t)(s - k);
    f->v = NULL;
    f->vl = 0;
    return 1;
  }
  f->k = k;
  f->kl = (size_t)(s - k);
  s++;
  f->quoted = s < e && *s == '"';
  if (f->quoted) {
    const char *q = memchr(s + 1, '"', (size_t)(e - s - 1));
    if (!q) q = e;
    f->v = s + 1;
    f->vl = (size_t)(q - s - 1);
    s = q < e ? q + 1 : e;
  } else {
    f->v = s;
    while (s < e && *s != ' ' && *s != '\n' && *s != 0) s++;
    f->vl = (size_t)(s - f->v);
  }
  *p = s;
  return 1;
}

static int fkey(const kfield *f, const char *name) {
  return f->kl == strlen(name) && memcmp(f->k, name, f->kl) == 0;
}

static int fnum(const kfield *f, long long *out, int base) {
  char buf[40];
  if (!f->v || f->vl == 0 || f->vl >= sizeof buf) return 0;
  memcpy(buf, f->v, f->vl);
  buf[f->vl] = 0;
  char *end;
  errno = 0;
  long long v = strtoll(buf, &end, base);
  if (*end || errno) {
    unsigned long long u = strtoull(buf, &end, base); /* 4294967295, 0x80000000 */
    if (*end || errno) return 0;
    v = (long long)u;
  }
  *out = v;
  return 1;
}

static int hexdig(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* Pushes an untrusted string field: quoted as is, or hex-encoded by the kernel (names with
 * spaces, quotes, control or non-ASCII bytes). The bytes may be anything, invalid UTF-8 too:
 * the event's encoder replaces what is not UTF-8. */
static void push_untrusted(lua_State *L, const kfield *f) {
  size_t n = f->vl > FIELD_MAX * 2 ? FIELD_MAX * 2 : f->vl;
  if (f->quoted) {
    lua_pushlstring(L, f->v, n > FIELD_MAX ? FIELD_MAX : n);
    return;
  }
  if (n % 2 == 0 && n > 0) {
    char out[FIELD_MAX];
    size_t o = 0;
    int ok = 1;
    for (size_t i = 0; i + 1 < n && o < sizeof out; i += 2) {
      int hi = hexdig(f->v[i]), lo = hexdig(f->v[i + 1]);
      if (hi < 0 || lo < 0) {
        ok = 0;
        break;
      }
      out[o++] = (char)(hi * 16 + lo);
    }
    if (ok) {
      lua_pushlstring(L, out, o);
      return;
    }
  }
  lua_pushlstring(L, f->v, n > FIELD_MAX ? FIELD_MAX : n);
}

static const char *arch_name(unsigned long long arch) {
  switch (arch) {
  case 0xc000003eull:
    return "x86_64";
  case 0x40000003ull:
    return "x86";
  case 0xc00000b7ull:
    return "aarch64";
  case 0x40000028ull:
    return "arm";
  case 0xc00000f3ull:
    return "riscv64";
  case 0x80000016ull:
    return "s390x";
  case 0xc0000015ull:
    return "ppc64le";
  default:
    return NULL;
  }
}

static const char *action_kind(unsigned long long code, const char **action) {
  switch (code & 0xffff0000ull) {
  case 0x80000000ull:
    *action = "kill_process";
    return "seccomp.kill";
  case 0x00000000ull:
    *action = "kill_thread";
    return "seccomp.kill";
  case 0x00030000ull:
    *action = "trap";
    return "seccomp.trap";
  case 0x00050000ull:
    *action = "errno";
    return "seccomp.deny";
  case 0x7fc00000ull:
    *action = "user_notif";
    return "seccomp.notify";
  case 0x7ff00000ull:
    *action = "trace";
    return "seccomp.trace";
  case 0x7ffc0000ull:
    *action = "log";
    return "seccomp.log";
  case 0x7fff0000ull:
    *action = "allow";
    return "seccomp.allow";
  default:
    *action = "unknown";
    return "seccomp.unknown";
  }
}

/* Parses one AUDIT_SECCOMP record. On success pushes the detail table and returns the kind,
 * with *pid set; on failure pushes nothing and returns NULL with *why set. */
static const char *parse_seccomp(lua_State *L, const char *s, size_t n, pid_t *pid,
                                 const char **why) {
  const char *p = s, *e = s + n;
  *pid = 0;
  *why = NULL;
  /* audit(<seconds>.<ms>:<serial>): */
  if (n < 8 || memcmp(s, "audit(", 6) != 0) {
    *why = "no audit(...) header";
    return NULL;
  }
  const char *close = memchr(s, ')', n);
  if (!close || close + 1 >= e || close[1] != ':') {
    *why = "unterminated audit(...) header";
    return NULL;
  }
  luaL_checkstack(L, 6, "audit kernel record");
  lua_createtable(L, 0, 16);
  lua_pushlstring(L, s + 6, (size_t)(close - s - 6));
  lua_setfield(L, -2, "audit_id");
  lua_pushliteral(L, "kernel");
  lua_setfield(L, -2, "source");
  p = close + 2;
  kfield f;
  long long arch = -1, nr = -1, code = -1, v;
  int have_pid = 0;
  while (next_field(&p, e, &f)) {
    if (!f.v) continue;
    if (fkey(&f, "pid")) {
      if (fnum(&f, &v, 10) && v > 0 && v <= INT32_MAX) {
        *pid = (pid_t)v;
        have_pid = 1;
      }
    } else if (fkey(&f, "arch")) {
      fnum(&f, &arch, 16);
    } else if (fkey(&f, "syscall")) {
      fnum(&f, &nr, 10);
    } else if (fkey(&f, "code")) {
      fnum(&f, &code, 0);
    } else if (fkey(&f, "comm") || fkey(&f, "exe") || fkey(&f, "subj")) {
      if (f.vl == 6 && memcmp(f.v, "(null)", 6) == 0) continue;
      lua_pushlstring(L, f.k, f.kl);
      push_untrusted(L, &f);
      lua_rawset(L, -3);
    } else if (fkey(&f, "uid") || fkey(&f, "gid") || fkey(&f, "auid") || fkey(&f, "ses") ||
               fkey(&f, "sig") || fkey(&f, "compat")) {
      if (fnum(&f, &v, 10)) {
        lua_pushlstring(L, f.k, f.kl);
        lua_pushinteger(L, (lua_Integer)v);
        lua_rawset(L, -3);
      }
    } else if (fkey(&f, "ip")) {
      lua_pushliteral(L, "ip");
      lua_pushlstring(L, f.v, f.vl > 32 ? 32 : f.vl);
      lua_rawset(L, -3);
    }
  }
  if (!have_pid || nr < 0 || code < 0) {
    lua_pop(L, 1);
    *why = !have_pid ? "no pid" : (nr < 0 ? "no syscall" : "no code");
    return NULL;
  }
  const char *action;
  const char *kind = action_kind((unsigned long long)code, &action);
  lua_pushstring(L, action);
  lua_setfield(L, -2, "action");
  char hex[24];
  snprintf(hex, sizeof hex, "0x%llx", (unsigned long long)code);
  lua_pushstring(L, hex);
  lua_setfield(L, -2, "code");
  lua_pushinteger(L, (lua_Integer)nr);
  lua_setfield(L, -2, "nr");
  if (arch >= 0) {
    const char *an = arch_name((unsigned long long)arch);
    if (an) {
      lua_pushstring(L, an);
    } else {
      snprintf(hex, sizeof hex, "0x%llx", (unsigned long long)arch);
      lua_pushstring(L, hex);
    }
    lua_setfield(L, -2, "arch");
    char *name = seccomp_syscall_resolve_num_arch((uint32_t)arch, (int)nr);
    if (name) {
      lua_pushstring(L, name);
      lua_setfield(L, -2, "syscall");
      free(name);
    }
  }
  return kind;
}

/* ------------------------------------------------------------------------------------------ */
/* The source                                                                                 */

static void handle_record(ksource *k, const char *text, size_t n) {
  audit *a = k->a;
  lua_State *L = a->L;
  int top = lua_gettop(L);
  pid_t pid;
  const char *why;
  const char *kind = parse_seccomp(L, text, n, &pid, &why);
  if (!kind) {
    k->malformed++;
    lua_settop(L, top);
    return;
  }
  const char *sb = audit_attribute(a, pid, 1);
  if (!sb && !k->scope_all) {
    k->unmatched++;
    lua_settop(L, top);
    return;
  }
  k->events++;
  audit_emit(L, a, kind, sb, pid, lua_gettop(L), NULL);
  lua_settop(L, top);
}

/* The kernel dropped records for us (our socket buffer was full): say so, at most every 10 s,
 * so that a gap in the seccomp events is never silent. */
static void report_overruns(ksource *k) {
  uint64_t now = cl_now_ns();
  if (k->overruns == k->overruns_reported) return;
  if (k->last_overrun_report && now - k->last_overrun_report < 10ull * 1000000000ull) return;
  lua_State *L = k->a->L;
  int top = lua_gettop(L);
  lua_createtable(L, 0, 2);
  lua_pushliteral(L, "kernel.seccomp");
  lua_setfield(L, -2, "source");
  lua_pushinteger(L, (lua_Integer)(k->overruns - k->overruns_reported));
  lua_setfield(L, -2, "overruns");
  k->overruns_reported = k->overruns;
  k->last_overrun_report = now;
  audit_emit(L, k->a, "audit.source.overrun", NULL, 0, lua_gettop(L), NULL);
  lua_settop(L, top);
}

static void on_netlink(cl_watch *w, uint32_t events) {
  ksource *k = w->data;
  report_overruns(k);
  for (int i = 0; i < MAX_PER_WAKE; i++) {
    ssize_t n = recv(k->fd, k->buf, RECV_BUF, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOBUFS) { /* the kernel dropped records: we were too slow */
        k->overruns++;
        report_overruns(k);
        continue;
      }
      return;
    }
    if (n == 0) return;
    int len = (int)n;
    for (struct nlmsghdr *h = (struct nlmsghdr *)k->buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
      k->records++;
      if (h->nlmsg_type != AUDIT_SECCOMP) continue;
      size_t plen = h->nlmsg_len - NLMSG_HDRLEN;
      const char *text = NLMSG_DATA(h);
      while (plen > 0 && text[plen - 1] == 0) plen--;
      handle_record(k, text, plen);
    }
  }
}

static void set_unavailable(lua_State *L, audit *a, ksource *k, const char *why, int err,
                            int quiet) {
  k->state = K_UNAVAILABLE;
  if (err)
    snprintf(k->error, sizeof k->error, "%s: %s", why, strerror(err));
  else
    snprintf(k->error, sizeof k->error, "%s", why);
  if (k->announced || quiet) return;
  k->announced = 1;
  int top = lua_gettop(L);
  lua_createtable(L, 0, 3);
  lua_pushliteral(L, "kernel.seccomp");
  lua_setfield(L, -2, "source");
  lua_pushstring(L, k->error);
  lua_setfield(L, -2, "error");
  if (err) {
    lua_pushinteger(L, err);
    lua_setfield(L, -2, "errno");
  }
  audit_emit(L, a, "audit.source.unavailable", NULL, 0, lua_gettop(L), NULL);
  lua_settop(L, top);
}

/* The kernel multicasts audit records in the initial network namespace only. Kernel threads
 * live there: compare with kthreadd (pid 2) when this pid namespace shows it; recent kernels
 * also give the initial namespace a fixed inode number. Returns 0 only when surely elsewhere. */
#define INIT_NET_INO 0xEFFFFFF9u
static int in_initial_netns(void) {
  struct stat self, kt;
  if (stat("/proc/self/ns/net", &self) < 0) return 1;
  if (self.st_ino == INIT_NET_INO) return 1;
  char comm[32] = {0};
  FILE *f = fopen("/proc/2/comm", "re");
  if (f) {
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
  }
  if (strcmp(comm, "kthreadd\n") != 0 || stat("/proc/2/ns/net", &kt) < 0) return 1; /* unknown */
  return self.st_ino == kt.st_ino && self.st_dev == kt.st_dev;
}

static void set_rcvbuf(int fd, int bytes) {
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) < 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
}

int audit_kernel_start(lua_State *L, audit *a, int scope_all, int quiet) {
  ksource *k = a->kernel;
  if (!k) {
    k = calloc(1, sizeof *k);
    if (!k) return ENOMEM;
    k->fd = -1;
    k->a = a;
    k->rcvbuf = DEFAULT_RCVBUF;
    a->kernel = k;
  }
  k->scope_all = scope_all;
  if (k->state == K_RUNNING) return 0;
  if (!in_initial_netns()) {
    set_unavailable(L, a, k,
                    "not in the initial network namespace (the kernel sends audit records only "
                    "there)",
                    0, quiet);
    return EPERM;
  }
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_AUDIT);
  if (fd < 0) {
    int err = errno;
    set_unavailable(L, a, k, "netlink audit socket", err, quiet);
    return err;
  }
  struct sockaddr_nl sa;
  memset(&sa, 0, sizeof sa);
  sa.nl_family = AF_NETLINK;
  sa.nl_groups = 1u << (AUDIT_NLGRP_READLOG - 1);
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    int err = errno;
    close(fd);
    set_unavailable(L, a, k,
                    err == EPERM ? "joining the audit log group needs CAP_AUDIT_READ"
                                 : "joining the audit log group",
                    err, quiet);
    return err;
  }
  set_rcvbuf(fd, k->rcvbuf);
  if (!k->buf) k->buf = malloc(RECV_BUF);
  int err = k->buf ? cl_watch_start(cl_loop_get(L), &k->watch, fd, EPOLLIN, on_netlink) : ENOMEM;
  if (err) {
    close(fd);
    set_unavailable(L, a, k, "watching the audit socket", err, quiet);
    return err;
  }
  k->watch.data = k;
  k->fd = fd;
  k->state = K_RUNNING;
  k->error[0] = 0;
  return 0;
}

void audit_kernel_stop(audit *a) {
  ksource *k = a->kernel;
  if (!k) return;
  if (k->fd >= 0) {
    cl_watch_stop(&k->watch);
    close(k->fd);
    k->fd = -1;
  }
  free(k->buf);
  free(k);
  a->kernel = NULL;
}

void audit_kernel_push_state(lua_State *L, audit *a) {
  ksource *k = a->kernel;
  lua_createtable(L, 0, 9);
  lua_pushstring(L, k ? state_names[k->state] : (a->kernel_disabled ? "disabled" : "stopped"));
  lua_setfield(L, -2, "state");
  if (!k) return;
  if (k->error[0]) {
    lua_pushstring(L, k->error);
    lua_setfield(L, -2, "error");
  }
  lua_pushstring(L, k->scope_all ? "all" : "tracked");
  lua_setfield(L, -2, "scope");
  lua_pushinteger(L, (lua_Integer)k->records);
  lua_setfield(L, -2, "records");
  lua_pushinteger(L, (lua_Integer)k->events);
  lua_setfield(L, -2, "events");
  lua_pushinteger(L, (lua_Integer)k->unmatched);
  lua_setfield(L, -2, "unmatched");
  lua_pushinteger(L, (lua_Integer)k->malformed);
  lua_setfield(L, -2, "malformed");
  lua_pushinteger(L, (lua_Integer)k->overruns);
  lua_setfield(L, -2, "overruns");
}

/* Lua: audit.kernel_source([{enable=true, scope="tracked"|"all", rcvbuf=1 MiB}]) -> state
 * table. Starting an unavailable source returns the state too (with .error); it never raises
 * for that. */
int audit_l_kernel_source(lua_State *L) {
  static const char *const fields[] = {"enable", "scope", "rcvbuf", NULL};
  audit *a = audit_get(L);
  int enable = 1, scope_all = a->kernel ? a->kernel->scope_all : 0;
  lua_Integer rcvbuf = 0;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    cl_check_fields(L, 1, fields);
    enable = cl_opt_boolean(L, 1, "enable", 1);
    rcvbuf = cl_opt_integer(L, 1, "rcvbuf", 0);
    if (rcvbuf && (rcvbuf < 4096 || rcvbuf > (64 << 20)))
      cl_field_error(L, "rcvbuf", "bytes in 4096..67108864 expected");
    const char *scope = cl_opt_string(L, 1, "scope", scope_all ? "all" : "tracked");
    if (strcmp(scope, "all") == 0)
      scope_all = 1;
    else if (strcmp(scope, "tracked") == 0)
      scope_all = 0;
    else
      cl_field_error(L, "scope", "\"tracked\" or \"all\" expected");
  }
  if (enable) {
    a->kernel_disabled = 0;
    if (rcvbuf && a->kernel) {
      a->kernel->rcvbuf = (int)rcvbuf;
      if (a->kernel->fd >= 0) set_rcvbuf(a->kernel->fd, (int)rcvbuf);
    }
    audit_kernel_start(L, a, scope_all, 0);
    if (rcvbuf && a->kernel && a->kernel->rcvbuf != (int)rcvbuf) {
      a->kernel->rcvbuf = (int)rcvbuf;
      if (a->kernel->fd >= 0) set_rcvbuf(a->kernel->fd, (int)rcvbuf);
    }
  } else {
    audit_kernel_stop(a);
    a->kernel_disabled = 1;
  }
  audit_kernel_push_state(L, a);
  return 1;
}

/* Hidden test hook: audit._parse_kernel(text) -> kind, detail, pid | nil, reason. Exercises the
 * parser with records the kernel would not produce on demand (truncated, garbage, odd bytes). */
int audit_l_parse_kernel(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  pid_t pid;
  const char *why;
  const char *kind = parse_seccomp(L, s, n, &pid, &why);
  if (!kind) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  lua_pushstring(L, kind);
  lua_insert(L, -2);
  lua_pushinteger(L, pid);
  return 3;
}

/* The C API's pid tracking: the ring core keeps the table; the first sandboxed process is what
 * makes kernel records worth reading, so it starts this source. */
void cl_audit_track_pid(lua_State *L, pid_t pid, const char *sandbox) {
  audit *a = audit_get(L);
  if (!a || !audit_track_pid(a, pid, sandbox)) return;
  if (!a->kernel && !a->kernel_disabled) audit_kernel_start(L, a, 0, 0);
}
