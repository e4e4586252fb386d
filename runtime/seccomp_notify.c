/*
 * User notification: the supervisor that answers notified syscalls on the loop with the
 * filter's Lua handler, run by worker tasks (the handler may wait; meanwhile other workers take
 * the next notifications), bounded by max_pending and notify_timeout, audited.
 */
#include "seccomp_int.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

static const char SV_KEY = 'S'; /* registry: supervisor pointer -> userdata (weak) */

typedef struct supervisor supervisor;

typedef struct pending {
  supervisor *sv;
  uint64_t id;
  uint64_t gen; /* bumped whenever the slot is answered, so a late handler cannot reuse it */
  int busy;
  int task_ref; /* registry ref to the worker running the handler (the worker's, not owned) */
  int ev_ref;   /* registry ref to the event table, until the slot is answered */
  pid_t pid;
  char syscall[48];
  double started;
  cl_timer timer;
} pending;

struct supervisor {
  lua_State *L; /* main thread */
  cl_loop *loop;
  int fd;
  cl_watch watch;
  int closed;
  int finalizing; /* collected: no Lua (audit, registry) from here on */
  double timeout;
  int max_pending, npending;
  pid_t pid;
  char sandbox[128];
  lua_Integer received, allowed, denied, timeouts, errors, overloaded, stale;
  pending *slots;
  /* Workers: tasks that run the handler for queued slots one after another (a task per
   * notification costs more than the handler itself). Idle ones wait on `idle`. */
  int *queue; /* ring of slot numbers waiting for a worker */
  int qhead, qlen;
  int nworkers;
  cl_waitq idle;
};

static void respond(supervisor *sv, uint64_t id, int allow, int err) {
  struct seccomp_notif_resp resp;
  memset(&resp, 0, sizeof resp);
  resp.id = id;
  if (allow)
    resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  else
    resp.error = -err;
  if (sv->fd >= 0) ioctl(sv->fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
}

static void audit_decision(supervisor *sv, pending *pd, const char *decision, int err,
                           const char *reason) {
  lua_State *L = sv->L;
  int top = lua_gettop(L);
  lua_createtable(L, 0, 6);
  lua_pushstring(L, pd->syscall);
  lua_setfield(L, -2, "syscall");
  lua_pushstring(L, decision);
  lua_setfield(L, -2, "decision");
  if (err) {
    lua_pushinteger(L, err);
    lua_setfield(L, -2, "errno");
  }
  if (reason) {
    lua_pushstring(L, reason);
    lua_setfield(L, -2, "reason");
  }
  /* Whole microseconds: an integer is cheaper to record than a float. */
  lua_pushinteger(L, (lua_Integer)((cl_now() - pd->started) * 1e6 + 0.5));
  lua_setfield(L, -2, "latency_us");
  const char *sb = sv->sandbox[0] ? sv->sandbox : NULL;
  cl_audit_emit(L, "seccomp.notify", sb, pd->pid, lua_gettop(L));
  if (!strcmp(decision, "deny")) cl_audit_emit(L, "seccomp.deny", sb, pd->pid, lua_gettop(L));
  lua_settop(L, top);
}

static void slot_finish(pending *pd) {
  supervisor *sv = pd->sv;
  cl_timer_stop(&pd->timer);
  pd->task_ref = LUA_NOREF;
  if (pd->ev_ref != LUA_NOREF && !sv->finalizing) luaL_unref(sv->L, LUA_REGISTRYINDEX, pd->ev_ref);
  pd->ev_ref = LUA_NOREF;
  pd->busy = 0;
  pd->gen++;
  sv->npending--;
}

/* Answers slot pd once. */
static void decide(pending *pd, int allow, int err, const char *reason) {
  supervisor *sv = pd->sv;
  respond(sv, pd->id, allow, err);
  if (allow)
    sv->allowed++;
  else
    sv->denied++;
  if (!sv->finalizing) audit_decision(sv, pd, allow ? "allow" : "deny", allow ? 0 : err, reason);
  slot_finish(pd);
}

static void on_slot_timeout(cl_timer *t) {
  pending *pd = (pending *)((char *)t - offsetof(pending, timer));
  supervisor *sv = pd->sv;
  if (!pd->busy) return;
  sv->timeouts++;
  int ref = pd->task_ref;
  pd->task_ref = LUA_NOREF;
  decide(pd, 0, EPERM, "timeout");
  if (ref != LUA_NOREF) { /* stop the handler: its answer no longer counts */
    lua_State *L = sv->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    if (lua_getfield(L, -1, "cancel") == LUA_TFUNCTION) {
      lua_pushvalue(L, -2);
      if (lua_pcall(L, 1, 0, 0) != LUA_OK) lua_pop(L, 1);
    } else {
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
}

/* Reads a NUL-terminated string from the target's memory (bounded). Pushes it or nil. */
static void push_remote_string(lua_State *L, pid_t pid, uint64_t addr) {
  if (!addr) {
    lua_pushnil(L);
    return;
  }
  char buf[MAX_READ_STRING];
  size_t got = 0;
  while (got < sizeof buf) {
    /* Never cross a page boundary in one read: the next page may be unmapped. */
    uint64_t a = addr + got;
    size_t chunk = 4096 - (size_t)(a & 4095);
    if (chunk > sizeof buf - got) chunk = sizeof buf - got;
    struct iovec local = {buf + got, chunk};
    /* NOLINTNEXTLINE(performance-no-int-to-ptr) */
    struct iovec remote = {(void *)(uintptr_t)a, chunk};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n <= 0) {
      char path[64];
      snprintf(path, sizeof path, "/proc/%d/mem", (int)pid);
      int mfd = open(path, O_RDONLY | O_CLOEXEC);
      n = mfd >= 0 ? pread(mfd, buf + got, chunk, (off_t)a) : -1;
      if (mfd >= 0) close(mfd);
      if (n <= 0) break;
    }
    void *nul = memchr(buf + got, 0, (size_t)n);
    if (nul) {
      lua_pushlstring(L, buf, (size_t)((char *)nul - buf));
      return;
    }
    got += (size_t)n;
  }
  if (got == 0)
    lua_pushnil(L);
  else
    lua_pushlstring(L, buf, got); /* cut at the bound */
}

static void push_sockaddr(lua_State *L, pid_t pid, uint64_t addr, uint64_t len) {
  unsigned char buf[MAX_SOCKADDR];
  if (!addr || len < sizeof(sa_family_t)) {
    lua_pushnil(L);
    return;
  }
  if (len > sizeof buf) len = sizeof buf;
  struct iovec local = {buf, (size_t)len};
  /* NOLINTNEXTLINE(performance-no-int-to-ptr) */
  struct iovec remote = {(void *)(uintptr_t)addr, (size_t)len};
  ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (n < (ssize_t)sizeof(sa_family_t)) {
    lua_pushnil(L);
    return;
  }
  sa_family_t fam;
  memcpy(&fam, buf, sizeof fam);
  lua_createtable(L, 0, 3);
  char text[INET6_ADDRSTRLEN];
  if (fam == AF_INET && n >= (ssize_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in sin;
    memcpy(&sin, buf, sizeof sin);
    lua_pushliteral(L, "inet");
    lua_setfield(L, -2, "family");
    inet_ntop(AF_INET, &sin.sin_addr, text, sizeof text);
    lua_pushstring(L, text);
    lua_setfield(L, -2, "address");
    lua_pushinteger(L, ntohs(sin.sin_port));
    lua_setfield(L, -2, "port");
  } else if (fam == AF_INET6 && n >= (ssize_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 s6;
    memcpy(&s6, buf, sizeof s6);
    lua_pushliteral(L, "inet6");
    lua_setfield(L, -2, "family");
    inet_ntop(AF_INET6, &s6.sin6_addr, text, sizeof text);
    lua_pushstring(L, text);
    lua_setfield(L, -2, "address");
    lua_pushinteger(L, ntohs(s6.sin6_port));
    lua_setfield(L, -2, "port");
  } else if (fam == AF_UNIX) {
    lua_pushliteral(L, "unix");
    lua_setfield(L, -2, "family");
    size_t off = offsetof(struct sockaddr_un, sun_path);
    if ((size_t)n > off) {
      const char *p = (const char *)buf + off;
      size_t pl = (size_t)n - off;
      if (p[0] == 0) { /* abstract: shown with a leading '@' */
        lua_pushliteral(L, "@");
        lua_pushlstring(L, p + 1, pl - 1);
        lua_concat(L, 2);
      } else {
        lua_pushlstring(L, p, strnlen(p, pl));
      }
      lua_setfield(L, -2, "path");
    }
  } else {
    lua_pushinteger(L, fam);
    lua_setfield(L, -2, "family");
  }
}

/* Which arguments are paths or socket addresses, by syscall name. */
typedef struct arg_kind {
  const char *name;
  signed char path1, path2, sa, salen;
} arg_kind;

static const arg_kind arg_kinds[] = {
    {"open", 0, -1, -1, -1},       {"openat", 1, -1, -1, -1},     {"openat2", 1, -1, -1, -1},
    {"creat", 0, -1, -1, -1},      {"stat", 0, -1, -1, -1},       {"lstat", 0, -1, -1, -1},
    {"newfstatat", 1, -1, -1, -1}, {"statx", 1, -1, -1, -1},      {"access", 0, -1, -1, -1},
    {"faccessat", 1, -1, -1, -1},  {"faccessat2", 1, -1, -1, -1}, {"execve", 0, -1, -1, -1},
    {"execveat", 1, -1, -1, -1},   {"mkdir", 0, -1, -1, -1},      {"mkdirat", 1, -1, -1, -1},
    {"rmdir", 0, -1, -1, -1},      {"unlink", 0, -1, -1, -1},     {"unlinkat", 1, -1, -1, -1},
    {"rename", 0, 1, -1, -1},      {"renameat", 1, 3, -1, -1},    {"renameat2", 1, 3, -1, -1},
    {"link", 0, 1, -1, -1},        {"linkat", 1, 3, -1, -1},      {"symlink", 0, 1, -1, -1},
    {"symlinkat", 0, 2, -1, -1},   {"readlink", 0, -1, -1, -1},   {"readlinkat", 1, -1, -1, -1},
    {"chmod", 0, -1, -1, -1},      {"fchmodat", 1, -1, -1, -1},   {"chown", 0, -1, -1, -1},
    {"lchown", 0, -1, -1, -1},     {"fchownat", 1, -1, -1, -1},   {"truncate", 0, -1, -1, -1},
    {"chdir", 0, -1, -1, -1},      {"chroot", 0, -1, -1, -1},     {"mount", 0, 1, -1, -1},
    {"umount2", 0, -1, -1, -1},    {"utimensat", 1, -1, -1, -1},  {"mknod", 0, -1, -1, -1},
    {"mknodat", 1, -1, -1, -1},    {"statfs", 0, -1, -1, -1},     {"pivot_root", 0, 1, -1, -1},
    {"connect", -1, -1, 1, 2},     {"bind", -1, -1, 1, 2},        {"sendto", -1, -1, 4, 5},
};

/* Syscall names and argument kinds by number, resolved once per number (libseccomp's lookup
 * allocates and scans a table: too slow for every notification). */
#define SYSCALL_CACHE 1024

typedef struct syscall_info {
  char name[40];
  signed char kind; /* index in arg_kinds, -1: no path or address arguments */
  unsigned char known;
} syscall_info;

static const syscall_info *syscall_of(uint32_t arch, int nr) {
  static syscall_info cache[2][SYSCALL_CACHE];
  static syscall_info other;
  int a = arch == AUDIT_ARCH_X86_64 ? 0 : arch == AUDIT_ARCH_I386 ? 1 : -1;
  syscall_info *si = a >= 0 && nr >= 0 && nr < SYSCALL_CACHE ? &cache[a][nr] : &other;
  if (si->known && si != &other) return si;
  char *name = seccomp_syscall_resolve_num_arch(arch, nr);
  const char *x = !name && arch == AUDIT_ARCH_X86_64 ? cl_seccomp_extra_name(nr) : NULL;
  snprintf(si->name, sizeof si->name, "%s", name ? name : x ? x : "?");
  free(name);
  si->kind = -1;
  for (size_t k = 0; k < CL_ARRAY_LEN(arg_kinds); k++)
    if (strcmp(arg_kinds[k].name, si->name) == 0) si->kind = (signed char)k;
  si->known = 1;
  return si;
}

/* Adds the path and socket address arguments the target passed; returns whether it read any. */
static int push_remote_args(lua_State *L, int ev, const arg_kind *ak, struct seccomp_notif *req) {
  if (ak->path1 >= 0) {
    push_remote_string(L, (pid_t)req->pid, req->data.args[ak->path1]);
    lua_setfield(L, ev, "path");
  }
  if (ak->path2 >= 0) {
    push_remote_string(L, (pid_t)req->pid, req->data.args[ak->path2]);
    lua_setfield(L, ev, "path2");
  }
  if (ak->sa >= 0) {
    push_sockaddr(L, (pid_t)req->pid, req->data.args[ak->sa], req->data.args[ak->salen]);
    lua_setfield(L, ev, "sockaddr");
  }
  return 1;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
  return 1;
}

/* The handler of slot `slot` (generation gen) returned (ok) or failed, its result or error on
 * top: answers unless the answer is late. */
static void answer(lua_State *L, supervisor *sv, int slot, uint64_t gen, int ok) {
  if (sv->closed || slot >= sv->max_pending) return;
  pending *pd = &sv->slots[slot];
  if (!pd->busy || pd->gen != gen) return; /* answered already (timeout): nothing to say */
  if (!ok) {
    sv->errors++;
    fprintf(stderr, "clawlua: seccomp notify handler failed: %s\n", lua_tostring(L, -1));
    char reason[200];
    const char *msg = lua_tostring(L, -1);
    snprintf(reason, sizeof reason, "handler error: %s", msg ? msg : "?");
    char *nl = strchr(reason, '\n');
    if (nl) *nl = 0;
    decide(pd, 0, EPERM, reason);
    return;
  }
  int t = lua_type(L, -1);
  if (t == LUA_TSTRING && strcmp(lua_tostring(L, -1), "allow") == 0) {
    decide(pd, 1, 0, NULL);
  } else if (t == LUA_TSTRING && strcmp(lua_tostring(L, -1), "deny") == 0) {
    decide(pd, 0, EPERM, "handler");
  } else if (lua_isinteger(L, -1) && lua_tointeger(L, -1) > 0 && lua_tointeger(L, -1) < 4096) {
    decide(pd, 0, (int)lua_tointeger(L, -1), "handler");
  } else {
    sv->errors++;
    fprintf(stderr,
            "clawlua: seccomp notify handler returned %s; \"allow\", \"deny\" or an "
            "errno expected: denied\n",
            luaL_typename(L, -1));
    decide(pd, 0, EPERM, "bad handler result");
  }
}

/*
 * A worker task. Stack: 1 supervisor, 2 handler, 3 a table whose `ref` is the registry ref of
 * its own task handle (for a timeout to cancel it), 4 its idle wait; while a handler runs, 5
 * the slot and 6 its generation. It takes queued slots one after another and calls the handler for
 * each (the handler may wait: the call yields; meanwhile other workers take the next slots).
 * It ends when the supervisor closes, or when cancelled while idle (the loop shutting down).
 */
static int worker_next(lua_State *L);

static void worker_gone(lua_State *L, supervisor *sv) {
  sv->nworkers--;
  if (lua_getfield(L, 3, "ref") == LUA_TNUMBER)
    luaL_unref(L, LUA_REGISTRYINDEX, (int)lua_tointeger(L, -1));
  lua_pop(L, 1);
}

static int worker_idle_k(lua_State *L, int status, lua_KContext ctx) {
  CL_UNUSED(status);
  cl_wait *w = lua_touserdata(L, (int)ctx);
  supervisor *sv = lua_touserdata(L, 1);
  if (w->state == CL_WAIT_CANCELLED) worker_gone(L, sv);
  cl_wait_resumed(L, ctx); /* raises the cancellation */
  return worker_next(L);
}

static int worker_handler_k(lua_State *L, int status, lua_KContext ctx) {
  CL_UNUSED(ctx);
  supervisor *sv = lua_touserdata(L, 1);
  answer(L, sv, (int)lua_tointeger(L, 5), (uint64_t)lua_tointeger(L, 6),
         status == LUA_OK || status == LUA_YIELD);
  return worker_next(L);
}

static int worker_next(lua_State *L) {
  for (;;) {
    lua_settop(L, 4);
    supervisor *sv = lua_touserdata(L, 1);
    if (sv->closed) {
      worker_gone(L, sv);
      return 0;
    }
    if (sv->qlen == 0) {
      cl_wait *w = lua_touserdata(L, 4);
      cl_waitq_add(&sv->idle, w);
      return cl_wait_suspend(L, w, worker_idle_k, 4);
    }
    int slot = sv->queue[sv->qhead];
    sv->qhead = (sv->qhead + 1) % sv->max_pending;
    sv->qlen--;
    pending *pd = &sv->slots[slot];
    if (!pd->busy) continue; /* answered while queued (timeout) */
    lua_getfield(L, 3, "ref");
    pd->task_ref = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    lua_pushinteger(L, slot);
    lua_pushinteger(L, (lua_Integer)pd->gen);
    lua_pushcfunction(L, traceback);
    lua_pushvalue(L, 2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, pd->ev_ref);
    int st = lua_pcallk(L, 1, 1, 7, 0, worker_handler_k);
    answer(L, sv, slot, (uint64_t)lua_tointeger(L, 6), st == LUA_OK);
  }
}

static int worker(lua_State *L) {
  lua_settop(L, 3);
  cl_wait_push(L);
  return worker_next(L);
}

/* Hands slot to an idle worker, or to a new one. */
static void dispatch(lua_State *L, supervisor *sv, int slot, int sv_idx, int handler_idx) {
  sv->queue[(sv->qhead + sv->qlen) % sv->max_pending] = slot;
  sv->qlen++;
  if (cl_waitq_wake_one(&sv->idle, 0)) return;
  lua_createtable(L, 0, 1);
  int ti = lua_gettop(L);
  lua_pushcfunction(L, worker);
  lua_pushvalue(L, sv_idx);
  lua_pushvalue(L, handler_idx);
  lua_pushvalue(L, ti);
  cl_task *t = cl_task_spawn(L, 3);
  cl_task_set_daemon(t, 1);
  sv->nworkers++;
  lua_pushinteger(L, luaL_ref(L, LUA_REGISTRYINDEX)); /* the task handle */
  lua_setfield(L, ti, "ref");
  lua_pop(L, 1);
}

static void handle_notification(supervisor *sv, struct seccomp_notif *req, int handler_idx,
                                int sv_idx) {
  lua_State *L = sv->L;
  sv->received++;
  int slot = -1;
  for (int i = 0; i < sv->max_pending; i++)
    if (!sv->slots[i].busy) {
      slot = i;
      break;
    }
  const syscall_info *si = syscall_of(req->data.arch, req->data.nr);
  const char *sname = si->name;
  if (slot < 0) { /* bounded: beyond max_pending in flight, deny at once */
    sv->overloaded++;
    sv->denied++;
    respond(sv, req->id, 0, EPERM);
    pending tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.pid = (pid_t)req->pid;
    tmp.started = cl_now();
    snprintf(tmp.syscall, sizeof tmp.syscall, "%s", sname);
    audit_decision(sv, &tmp, "deny", EPERM, "overload");
    return;
  }
  int top = lua_gettop(L);
  lua_createtable(L, 0, 10);
  int ev = lua_gettop(L);
  lua_pushinteger(L, req->pid);
  lua_setfield(L, ev, "pid");
  lua_pushstring(L, sname);
  lua_setfield(L, ev, "syscall");
  lua_pushinteger(L, req->data.nr);
  lua_setfield(L, ev, "nr");
  lua_pushstring(L, req->data.arch == AUDIT_ARCH_X86_64 ? "x86_64"
                    : req->data.arch == AUDIT_ARCH_I386 ? "x86"
                                                        : "other");
  lua_setfield(L, ev, "arch");
  lua_pushinteger(L, (lua_Integer)req->id);
  lua_setfield(L, ev, "id");
  lua_createtable(L, 6, 0);
  for (int i = 0; i < 6; i++) {
    lua_pushinteger(L, (lua_Integer)req->data.args[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, ev, "args");
  if (si->kind >= 0 && push_remote_args(L, ev, &arg_kinds[si->kind], req)) {
    /* What we read is only meaningful if the target is still in this syscall: the pid could
     * have been recycled, or the call interrupted, while we read. (Without such reads the
     * answer itself is refused for a stale id: no check needed.) */
    uint64_t id = req->id;
    if (ioctl(sv->fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) < 0) {
      sv->stale++;
      lua_settop(L, top);
      return;
    }
  }
  pending *pd = &sv->slots[slot];
  pd->busy = 1;
  pd->id = req->id;
  pd->pid = (pid_t)req->pid;
  pd->started = cl_now();
  pd->task_ref = LUA_NOREF;
  snprintf(pd->syscall, sizeof pd->syscall, "%s", sname);
  sv->npending++;
  cl_timer_start(sv->loop, &pd->timer, cl_deadline(sv->timeout), on_slot_timeout);
  lua_pushvalue(L, ev);
  pd->ev_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  dispatch(L, sv, slot, sv_idx, handler_idx);
  lua_settop(L, top);
}

static void supervisor_stop(supervisor *sv) {
  if (sv->closed) return;
  sv->closed = 1;
  /* Deny what is still waiting, so no target stays blocked on a supervisor that is gone. */
  for (int i = 0; sv->slots && i < sv->max_pending; i++)
    if (sv->slots[i].busy) decide(&sv->slots[i], 0, EPERM, "supervisor closed");
  cl_watch_stop(&sv->watch);
  if (sv->fd >= 0) close(sv->fd);
  sv->fd = -1;
  free(sv->slots);
  sv->slots = NULL;
  free(sv->queue);
  sv->queue = NULL;
  sv->qlen = 0;
  cl_waitq_wake_all(&sv->idle, 0); /* idle workers see the supervisor closed and end */
}

static void push_supervisor(lua_State *L, supervisor *sv) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SV_KEY); /* weak table: pointer -> userdata */
  lua_rawgetp(L, -1, sv);
  lua_remove(L, -2);
}

static void on_notify_fd(cl_watch *w, uint32_t events) {
  supervisor *sv = w->data;
  lua_State *L = sv->L;
  int top = lua_gettop(L);
  push_supervisor(L, sv);
  int svi = lua_gettop(L);
  if (lua_isnil(L, svi)) {
    lua_settop(L, top);
    return;
  }
  lua_getiuservalue(L, svi, 1);
  int hi = lua_gettop(L);
  if (events & EPOLLIN) {
    /* One per readiness report: epoll is level-triggered, and readable means a notification
     * was waiting, so RECV cannot block (one that vanished since, its target killed, gives
     * ENOENT). */
    struct seccomp_notif req;
    memset(&req, 0, sizeof req);
    if (ioctl(sv->fd, SECCOMP_IOCTL_NOTIF_RECV, &req) == 0) handle_notification(sv, &req, hi, svi);
  }
  if ((events & (EPOLLHUP | EPOLLERR)) && !(events & EPOLLIN)) {
    /* Every process using the filter is gone. */
    cl_watch_stop(&sv->watch);
  }
  lua_settop(L, top);
}

static supervisor *check_supervisor(lua_State *L, int i) {
  return luaL_checkudata(L, i, SUPER_MT);
}

static int supervisor_gc(lua_State *L) {
  supervisor *sv = lua_touserdata(L, 1);
  sv->finalizing = 1;
  supervisor_stop(sv);
  return 0;
}

void cl_seccomp_supervise(lua_State *L, int prep_idx, pid_t pid, const char *sandbox) {
  prep_idx = lua_absindex(L, prep_idx);
  cl_seccomp_prog *p = luaL_checkudata(L, prep_idx, PREP_MT);
  supervisor *sv = lua_newuserdatauv(L, sizeof *sv, 1);
  memset(sv, 0, sizeof *sv);
  sv->fd = -1;
  sv->closed = 1;
  luaL_setmetatable(L, SUPER_MT);
  int svi = lua_gettop(L);
  lua_getiuservalue(L, prep_idx, 1);
  lua_setiuservalue(L, svi, 1);
  sv->slots = calloc((size_t)p->max_pending, sizeof *sv->slots);
  sv->queue = calloc((size_t)p->max_pending, sizeof *sv->queue);
  if (!sv->slots || !sv->queue) {
    free(sv->slots);
    free(sv->queue);
    sv->slots = NULL;
    sv->queue = NULL;
    cl_seccomp_oom(L);
  }
  sv->closed = 0;
  lua_State *main;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main = lua_tothread(L, -1);
  lua_pop(L, 1);
  sv->L = main;
  sv->loop = cl_loop_get(L);
  sv->timeout = p->timeout;
  sv->max_pending = p->max_pending;
  sv->pid = pid;
  if (sandbox) snprintf(sv->sandbox, sizeof sv->sandbox, "%s", sandbox);
  for (int i = 0; i < sv->max_pending; i++) {
    sv->slots[i].sv = sv;
    sv->slots[i].task_ref = LUA_NOREF;
    sv->slots[i].ev_ref = LUA_NOREF;
  }
  sv->fd = p->listener;
  p->listener = -1;
  /* A weak back-reference from the registry, for callbacks that start from the raw pointer. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SV_KEY);
  lua_pushvalue(L, svi);
  lua_rawsetp(L, -2, sv);
  lua_pop(L, 1);
  if (sv->fd >= 0) {
    if (cl_watch_start(sv->loop, &sv->watch, sv->fd, EPOLLIN, on_notify_fd) != 0)
      luaL_error(L, "seccomp: cannot watch the notify fd: %s", strerror(errno));
    sv->watch.data = sv;
    if (p->carry_valid) {
      p->carry_valid = 0;
      lua_getiuservalue(L, svi, 1);
      handle_notification(sv, &p->carry, lua_gettop(L), svi);
      lua_pop(L, 1);
    }
  }
}

/* Lua: supervisor:stats() -> {received, allowed, denied, timeouts, errors, overloaded, stale,
 * pending, active} */
static int l_sv_stats(lua_State *L) {
  supervisor *sv = check_supervisor(L, 1);
  lua_createtable(L, 0, 9);
  lua_Integer v[] = {sv->received, sv->allowed,    sv->denied, sv->timeouts,
                     sv->errors,   sv->overloaded, sv->stale,  sv->npending};
  const char *n[] = {"received", "allowed",    "denied", "timeouts",
                     "errors",   "overloaded", "stale",  "pending"};
  for (size_t i = 0; i < CL_ARRAY_LEN(v); i++) {
    lua_pushinteger(L, v[i]);
    lua_setfield(L, -2, n[i]);
  }
  lua_pushboolean(L, !sv->closed && sv->watch.active);
  lua_setfield(L, -2, "active");
  return 1;
}

static int l_sv_close(lua_State *L) {
  supervisor_stop(check_supervisor(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}

static int l_sv_fd(lua_State *L) {
  supervisor *sv = check_supervisor(L, 1);
  lua_pushinteger(L, sv->fd);
  return 1;
}

static const luaL_Reg sv_methods[] = {
    {"stats", l_sv_stats},
    {"close", l_sv_close},
    {"fd", l_sv_fd},
    {NULL, NULL},
};

void cl_seccomp_open_supervisor(lua_State *L) {
  static const luaL_Reg prep_meta[] = {{"__gc", cl_seccomp_prep_gc}, {NULL, NULL}};
  static const cl_class prep = {PREP_MT, NULL, NULL, prep_meta};
  cl_class_register(L, &prep);
  /* __gc and __close differ: a supervisor being finalized stops without touching Lua state */
  static const luaL_Reg sv_meta[] = {
      {"__gc", supervisor_gc}, {"__close", l_sv_close}, {NULL, NULL}};
  static const cl_class sv = {SUPER_MT, sv_methods, NULL, sv_meta};
  cl_class_register(L, &sv);
  /* supervisor pointer -> userdata, weak values */
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &SV_KEY);
}
