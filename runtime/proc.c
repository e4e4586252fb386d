/*
 * clawlua.proc: child processes. Spawning uses clone(CLONE_VM | CLONE_VFORK) like posix_spawn
 * (the child borrows our memory until exec, so starting a process costs no page-table copy),
 * or a fork-style clone3 when the jail needs code in the child and a hand-shake with the parent.
 * Children are tracked by pidfd: waits are loop readiness, signals cannot hit a recycled pid.
 *
 * A process handle owns the child, its pidfd and its pipes. Closing or collecting a handle of
 * a running child kills its process group and leaves the reaping to the loop: no zombies.
 */
#include "clawlua.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#endif

#define PROC_MT     "clawlua.proc"
#define STREAM_MT   "clawlua.stream"
#define VFORK_STACK (64 * 1024)

extern char **environ;
int cl_entry_redirect(lua_State *L, const char *name);

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* ------------------------------------------------------------------------------------------ */
/* Spawning                                                                                   */

typedef struct child_args {
  const cl_spawn_req *req;
  pid_t parent;
  uint64_t reset; /* signals with a handler or ignored in the parent (bit n-1: signal n) */
  int errfd;      /* the child reports a failure before exec here (close-on-exec: EOF = exec'd) */
  int syncfd;     /* fork path: the child waits here for the parent's set-up */
} child_args;

typedef struct child_report {
  int err;
  char stage[60];
} child_report;

static void child_fail(child_args *a, int err, const char *stage) {
  child_report msg;
  memset(&msg, 0, sizeof msg);
  msg.err = err;
  strncpy(msg.stage, stage, sizeof msg.stage - 1);
  ssize_t w = write(a->errfd, &msg, sizeof msg);
  CL_UNUSED(w);
  _exit(127);
}

/* Runs in the child: only async-signal-safe calls from here to exec. */
static int child_main(void *arg) {
  child_args *a = arg;
  const cl_spawn_req *r = a->req;
  /* Dispositions that survive exec (ignored signals) go back to default; handlers installed by
   * anyone in this process must not run in a child that shares our memory. */
  for (int sig = 1; sig < NSIG && sig <= 64; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP || !(a->reset & ((uint64_t)1 << (sig - 1)))) continue;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigaction(sig, &sa, NULL);
  }
  if (a->syncfd >= 0) { /* wait for the parent's set-up (uid maps, cgroups) */
    char c;
    ssize_t n;
    do n = read(a->syncfd, &c, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1) _exit(127); /* the parent gave up */
    close(a->syncfd);
  }
  if (r->new_session && setsid() < 0)
    child_fail(a, errno, "setsid");
  else if (!r->new_session && r->new_pgroup && setpgid(0, 0) < 0)
    child_fail(a, errno, "setpgid");
  if (r->pdeathsig) {
    if (prctl(PR_SET_PDEATHSIG, r->pdeathsig) < 0) child_fail(a, errno, "prctl");
    if (getppid() != a->parent && !(r->clone_flags & CLONE_NEWPID)) _exit(127);
  }
  /* stdio: move sources out of 0..2 first so no dup2 clobbers another's source. */
  int src[3];
  for (int i = 0; i < 3; i++) {
    src[i] = r->fds[i];
    if (src[i] == -1) {
      src[i] = open("/dev/null", O_RDWR | O_CLOEXEC);
      if (src[i] < 0) child_fail(a, errno, "open /dev/null");
    }
    if (src[i] >= 0 && src[i] < 3 && src[i] != i) {
      src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 3);
      if (src[i] < 0) child_fail(a, errno, "dup");
    }
  }
  for (int i = 0; i < 3; i++) {
    if (src[i] == -2) continue;
    if (src[i] == i) {
      int fl = fcntl(i, F_GETFD);
      if (fl >= 0) fcntl(i, F_SETFD, fl & ~FD_CLOEXEC);
    } else if (dup2(src[i], i) < 0) {
      child_fail(a, errno, "dup2");
    }
  }
  /* Whatever this process inherited without close-on-exec stays out of the child. */
  if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
    for (int fd = 3; fd < 1024; fd++) {
      int fl = fcntl(fd, F_GETFD);
      if (fl >= 0) fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
    }
  }
  /* Passed fds become 3, 4, ... (inheritable); the error pipe moves above them first. */
  if (r->npass > 0) {
    int top = 3 + r->npass, tmp[CL_MAX_PASS_FDS];
    if (a->errfd < top) {
      int moved = fcntl(a->errfd, F_DUPFD_CLOEXEC, top);
      if (moved < 0) _exit(127);
      a->errfd = moved;
    }
    for (int i = 0; i < r->npass; i++)
      if ((tmp[i] = fcntl(r->pass_fds[i], F_DUPFD_CLOEXEC, top)) < 0) child_fail(a, errno, "fds");
    for (int i = 0; i < r->npass; i++) {
      if (dup2(tmp[i], 3 + i) < 0) child_fail(a, errno, "fds");
      close(tmp[i]);
    }
  }
  /* Every handler is back to default (above), so signals may be delivered from here on. */
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  if (r->cwd && !r->cwd_after_setup && chdir(r->cwd) < 0) child_fail(a, errno, "chdir");
  if (r->child_setup) {
    const char *stage = "setup";
    int err = r->child_setup(r->child_arg, &stage);
    if (err) child_fail(a, err, stage);
  }
  if (r->cwd && r->cwd_after_setup && chdir(r->cwd) < 0) child_fail(a, errno, "chdir");
  char *const *envp = r->envp ? r->envp : environ;
  char found[4096];
  const char *path = r->path;
  if (!path) { /* search PATH here, in the child's own root, without allocating */
    int best = ENOENT;
    const char *p = r->search_path ? r->search_path : "/usr/local/bin:/usr/bin:/bin";
    path = found;
    found[0] = 0;
    while (*p) {
      const char *c = strchr(p, ':');
      size_t dl = c ? (size_t)(c - p) : strlen(p);
      size_t nl = strlen(r->argv[0]);
      if (dl && dl + nl + 2 <= sizeof found) {
        memcpy(found, p, dl);
        found[dl] = '/';
        memcpy(found + dl + 1, r->argv[0], nl + 1);
        if (access(found, X_OK) == 0) break;
        if (errno == EACCES) best = EACCES;
      }
      found[0] = 0;
      if (!c) break;
      p = c + 1;
    }
    if (!found[0]) child_fail(a, best, "exec (searching PATH)");
  }
  /* The filter goes last: nothing of ours runs under it but the hand-off and the exec. */
  if (r->seccomp) {
    const char *stage = "seccomp";
    int err = cl_seccomp_child_install(r->seccomp, &stage);
    if (err) child_fail(a, err, stage);
  }
  execve(path, r->argv, envp);
  child_fail(a, errno, "exec");
  return 127;
}

/* The signals the child must reset: those this process catches or ignores, from one read of
 * /proc/self/status rather than 64 sigaction queries in every child. All of them when /proc
 * cannot tell. */
static uint64_t signals_to_reset(void) {
  uint64_t mask = 0;
  int found = 0;
  int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n > 0) {
      buf[n] = 0;
      static const char *const keys[] = {"\nSigIgn:", "\nSigCgt:"};
      for (int i = 0; i < 2; i++) {
        const char *p = strstr(buf, keys[i]);
        if (!p) continue;
        mask |= strtoull(p + strlen(keys[i]), NULL, 16);
        found++;
      }
    }
  }
  return found == 2 ? mask : ~(uint64_t)0;
}

static void reap_now(int pidfd) {
  siginfo_t si;
  while (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED) < 0 && errno == EINTR) {
  }
}

static long spawn_vfork(child_args *a, int *pidfd) {
  /* The child runs on this buffer while we are suspended (the musl posix_spawn approach).
   * Under valgrind the clone becomes a fork; the error pipe works either way. */
  char stack[VFORK_STACK] __attribute__((aligned(16)));
  long p = clone(child_main, stack + sizeof stack, CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD,
                 a, pidfd);
#ifdef __SANITIZE_ADDRESS__
  /* The child's instrumented frames poisoned redzones in our shadow memory, which it shares. */
  __asan_unpoison_memory_region(stack, sizeof stack);
#endif
  return p;
}

struct clone_args_compat {
  uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

/* fork semantics: the child continues here on a copy of our memory. */
static long spawn_fork(const cl_spawn_req *req, child_args *a, int *pidfd, int sp_w, int ep_r) {
  struct clone_args_compat ca;
  memset(&ca, 0, sizeof ca);
  ca.flags = CLONE_PIDFD | req->clone_flags;
  ca.pidfd = (uint64_t)(uintptr_t)pidfd;
  ca.exit_signal = SIGCHLD;
  long p = syscall(SYS_clone3, &ca, sizeof ca);
  if (p < 0 && errno == ENOSYS) /* old kernels, valgrind */
    p = syscall(SYS_clone, (unsigned long)(CLONE_PIDFD | SIGCHLD) | req->clone_flags, NULL, pidfd,
                NULL, NULL);
  if (p == 0) {
    close(ep_r);
    if (sp_w >= 0) close(sp_w);
    child_main(a);
    _exit(127);
  }
  return p;
}

int cl_spawn(const cl_spawn_req *req, pid_t *pid, int *pidfd, char *err, size_t errlen) {
  child_args a;
  memset(&a, 0, sizeof a);
  a.req = req;
  a.parent = getpid();
  a.reset = signals_to_reset();
  a.syncfd = -1;
  err[0] = 0;
  int ep[2] = {-1, -1}, sp[2] = {-1, -1};
  if (pipe2(ep, O_CLOEXEC) < 0) {
    snprintf(err, errlen, "pipe: %s", strerror(errno));
    return errno;
  }
  int forked = req->child_setup || req->parent_setup || req->clone_flags || req->seccomp ||
               !req->path || req->npass;
  if (req->parent_setup && pipe2(sp, O_CLOEXEC) < 0) {
    int e = errno;
    close(ep[0]);
    close(ep[1]);
    snprintf(err, errlen, "pipe: %s", strerror(e));
    return e;
  }
  a.errfd = ep[1];
  a.syncfd = sp[0];
  /* Joining a network namespace: this thread enters it for the clone and comes back, so the
   * child starts there whatever namespaces it creates (a child in a new user namespace could
   * not join a namespace the host owns by itself). */
  int home_net = -1;
  if (req->netns_fd > 0) {
    home_net = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home_net < 0 || setns(req->netns_fd, CLONE_NEWNET) < 0) {
      int se = errno;
      if (home_net >= 0) close(home_net);
      close(ep[0]);
      close(ep[1]);
      if (sp[0] >= 0) close(sp[0]), close(sp[1]);
      snprintf(err, errlen, "setns(net): %s", strerror(se));
      return se;
    }
    forked = 1;
  }
  /* No signal handler may run in a child that shares our memory: block all around clone. */
  sigset_t all, old;
  sigfillset(&all);
  sigprocmask(SIG_SETMASK, &all, &old);
  int fd = -1;
  long p = forked ? spawn_fork(req, &a, &fd, sp[1], ep[0]) : spawn_vfork(&a, &fd);
  int e = p < 0 ? errno : 0;
  sigprocmask(SIG_SETMASK, &old, NULL);
  if (home_net >= 0) {
    if (setns(home_net, CLONE_NEWNET) < 0) abort(); /* cannot happen: our own namespace */
    close(home_net);
  }
  close(ep[1]);
  if (sp[0] >= 0) close(sp[0]);
  if (p < 0) {
    close(ep[0]);
    if (sp[1] >= 0) close(sp[1]);
    snprintf(err, errlen, "clone: %s", strerror(e));
    return e;
  }
  if (req->parent_setup) {
    int pe = req->parent_setup(req->parent_arg, (pid_t)p, err, errlen);
    if (pe) {
      close(sp[1]); /* the child reads EOF and exits */
      close(ep[0]);
      kill((pid_t)p, SIGKILL); /* our unreaped child: its pid cannot have been reused */
      reap_now(fd);
      close(fd);
      return pe;
    }
    char c = 1;
    ssize_t w = write(sp[1], &c, 1);
    CL_UNUSED(w);
    close(sp[1]);
  }
  /* Exec closes the error pipe: EOF means the child runs the new program. */
  child_report msg;
  ssize_t n;
  if (req->seccomp && cl_seccomp_prog_notifies(req->seccomp)) {
    n = cl_seccomp_exec_wait(req->seccomp, (pid_t)p, ep[0], &msg, sizeof msg);
    if (n < 0) {
      close(ep[0]);
      kill((pid_t)p, SIGKILL);
      reap_now(fd);
      close(fd);
      snprintf(err, errlen, "seccomp: handing over the notify fd: %s%s", strerror((int)-n),
               n == -EPROTO || n == -ETIMEDOUT ? " (does the filter let sendmsg and execve "
                                                 "through?)"
                                               : "");
      return (int)-n;
    }
  } else {
    do n = read(ep[0], &msg, sizeof msg);
    while (n < 0 && errno == EINTR);
  }
  close(ep[0]);
  if (n == (ssize_t)sizeof msg) { /* the child failed before exec and has exited */
    msg.stage[sizeof msg.stage - 1] = 0;
    snprintf(err, errlen, "%s: %s", msg.stage, strerror(msg.err));
    reap_now(fd);
    close(fd);
    return msg.err ? msg.err : EIO;
  }
  *pid = (pid_t)p;
  *pidfd = fd;
  return 0;
}

int cl_find_executable(const char *name, const char *path_env, char *out, size_t outlen) {
  struct stat st;
  if (!*name) return ENOENT;
  if (strchr(name, '/')) {
    if (stat(name, &st) < 0) return errno;
    if (!S_ISREG(st.st_mode)) return EACCES;
    if (access(name, X_OK) < 0) return errno;
    if (strlen(name) >= outlen) return ENAMETOOLONG;
    strcpy(out, name);
    return 0;
  }
  if (!path_env) path_env = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  int found_noexec = 0;
  const char *p = path_env;
  while (*p) {
    const char *c = strchr(p, ':');
    size_t dl = c ? (size_t)(c - p) : strlen(p);
    int n = dl ? snprintf(out, outlen, "%.*s/%s", (int)dl, p, name)
               : snprintf(out, outlen, "./%s", name);
    if (n > 0 && (size_t)n < outlen && stat(out, &st) == 0 && S_ISREG(st.st_mode)) {
      if (access(out, X_OK) == 0) return 0;
      found_noexec = 1;
    }
    if (!c) break;
    p = c + 1;
  }
  return found_noexec ? EACCES : ENOENT;
}

/* ------------------------------------------------------------------------------------------ */
/* Process handles                                                                            */

typedef struct proc {
  pid_t pid;
  int pidfd;
  int group; /* the child leads a process group: kill the group on close */
  int reaped;
  int closed;
  int code, signo, core;
  struct rusage ru;
  double started, ended;
  cl_watch watch;
  cl_proc_ext *ext; /* owned: released after the child on every path */
  int ext_reaped;
  char name[64];
} proc;

static void ext_reaped(proc *p, lua_State *L) {
  if (p->ext && !p->ext_reaped) {
    p->ext_reaped = 1;
    p->ext->reaped(p->ext, L, p->pid);
  }
}

static void ext_done(void *arg) {
  cl_proc_ext *x = arg;
  x->reaped(x, NULL, 0);
  x->destroy(x);
}

static proc *check_proc(lua_State *L, int i) {
  return luaL_checkudata(L, i, PROC_MT);
}

/* Reaps if the child has exited. Returns 1 when reaped (now or before). */
static int try_reap_L(proc *p, lua_State *L) {
  if (p->reaped) return 1;
  if (p->pidfd < 0) return 0;
  siginfo_t si;
  memset(&si, 0, sizeof si);
  long r;
  do r = syscall(SYS_waitid, P_PIDFD, p->pidfd, &si, WEXITED | WNOHANG, &p->ru);
  while (r < 0 && errno == EINTR);
  if (r < 0 || si.si_pid == 0) return 0;
  p->reaped = 1;
  p->ended = cl_now();
  if (si.si_code == CLD_EXITED) {
    p->code = si.si_status;
    p->signo = 0;
  } else {
    p->code = -1;
    p->signo = si.si_status;
    p->core = si.si_code == CLD_DUMPED;
  }
  cl_watch_stop(&p->watch);
  close(p->pidfd);
  p->pidfd = -1;
  ext_reaped(p, L);
  return 1;
}

static void push_status(lua_State *L, proc *p) {
  lua_createtable(L, 0, 8);
  if (p->signo) {
    lua_pushinteger(L, p->signo);
    lua_setfield(L, -2, "signal");
    lua_pushstring(L, cl_signal_name(p->signo));
    lua_setfield(L, -2, "signal_name");
    lua_pushboolean(L, p->core);
    lua_setfield(L, -2, "core_dumped");
  } else {
    lua_pushinteger(L, p->code);
    lua_setfield(L, -2, "code");
  }
  lua_pushinteger(L, p->pid);
  lua_setfield(L, -2, "pid");
  lua_pushnumber(L, p->ended - p->started);
  lua_setfield(L, -2, "duration");
  lua_pushnumber(L, (double)p->ru.ru_utime.tv_sec + (double)p->ru.ru_utime.tv_usec / 1e6);
  lua_setfield(L, -2, "utime");
  lua_pushnumber(L, (double)p->ru.ru_stime.tv_sec + (double)p->ru.ru_stime.tv_usec / 1e6);
  lua_setfield(L, -2, "stime");
  lua_pushinteger(L, p->ru.ru_maxrss);
  lua_setfield(L, -2, "maxrss_kb");
  if (p->ext) p->ext->status(p->ext, L);
}

static int kill_child(proc *p, int sig, int group) {
  if (p->reaped || p->pidfd < 0) return ESRCH;
  /* Until we reap it, the child's pid (and the group id it leads) cannot be reused, so plain
   * kill() is as exact as pidfd_send_signal, and works where that is missing (valgrind). */
  if (group && p->group && kill(-p->pid, sig) == 0) return 0;
  if (kill(p->pid, sig) < 0) return errno;
  return 0;
}

/* Kills a running child and hands the reaping to the loop. */
static void proc_release(lua_State *L, proc *p) {
  if (p->closed) return;
  p->closed = 1;
  if (!p->reaped && p->pidfd >= 0) {
    kill_child(p, SIGKILL, 1);
    if (p->ext) p->ext->kill(p->ext);
    if (!try_reap_L(p, L)) {
      cl_watch_stop(&p->watch);
      cl_loop *lp = p->watch.loop ? p->watch.loop : cl_loop_get(L);
      if (p->ext) { /* the reaper releases the rest once the child is gone */
        cl_reap_later_then(lp, p->pid, p->pidfd, ext_done, p->ext);
        p->ext = NULL;
      } else {
        cl_reap_later(lp, p->pid, p->pidfd);
      }
      p->pidfd = -1;
    }
  }
  /* The notify supervisor stops with the handle. */
  if (lua_getiuservalue(L, 1, 4) == LUA_TUSERDATA && luaL_callmeta(L, -1, "__close")) lua_pop(L, 1);
  lua_pop(L, 1);
  /* Pipes: close the streams the handle owns. */
  for (int i = 1; i <= 3; i++) {
    if (lua_getiuservalue(L, 1, i) == LUA_TUSERDATA && luaL_callmeta(L, -1, "__gc")) lua_pop(L, 1);
    lua_pop(L, 1);
  }
}

static int wait_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  proc *p = check_proc(L, 1);
  if (try_reap_L(p, L)) {
    push_status(L, p);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) return cl_timed_out(L);
  if (p->pidfd < 0 || p->closed) return cl_failf(L, ECHILD, "wait: process handle closed");
  return cl_watch_wait(L, w, &p->watch, 0, wait_k, ctx);
}

/* Lua: p:wait([timeout]) -> {code=|signal=, signal_name=, pid=, duration=, utime=, stime=,
 * maxrss_kb=} | nil, "timeout", "ETIMEDOUT" */
static int l_wait(lua_State *L) {
  proc *p = check_proc(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 2);
  if (try_reap_L(p, L)) {
    push_status(L, p);
    return 1;
  }
  if (p->closed || p->pidfd < 0) return cl_failf(L, ECHILD, "wait: process handle closed");
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return cl_watch_wait(L, w, &p->watch, 0, wait_k, lua_gettop(L));
}

/* Lua: p:kill([sig="TERM"], ["group"]) -> true | nil, err, code */
static int l_kill(lua_State *L) {
  proc *p = check_proc(L, 1);
  int sig = lua_isnoneornil(L, 2) ? SIGTERM : cl_signal_number(L, 2);
  if (sig < 0) return luaL_argerror(L, 2, "unknown signal");
  int group = 0;
  if (!lua_isnoneornil(L, 3)) {
    const char *g = luaL_checkstring(L, 3);
    if (strcmp(g, "group") != 0) return luaL_argerror(L, 3, "\"group\" expected");
    group = 1;
  }
  if (p->reaped || p->closed) return cl_failf(L, ESRCH, "kill: process %d has exited", p->pid);
  int e = kill_child(p, sig, group);
  if (e) return cl_fail(L, "kill", e);
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: p:pid() -> the child's pid (it stays the handle's after the exit: no other process gets
 * it while the handle has not reaped it) */
static int l_pid(lua_State *L) {
  lua_pushinteger(L, check_proc(L, 1)->pid);
  return 1;
}

/* Lua: p:running() -> boolean (reaps without blocking) */
static int l_running(lua_State *L) {
  proc *p = check_proc(L, 1);
  lua_pushboolean(L, !p->closed && !try_reap_L(p, L));
  return 1;
}

/* Lua: p:status() -> status table or nil while running */
static int l_status(lua_State *L) {
  proc *p = check_proc(L, 1);
  if (!try_reap_L(p, L)) return 0;
  push_status(L, p);
  return 1;
}

static int l_close(lua_State *L) {
  proc_release(L, check_proc(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}

static int l_gc(lua_State *L) {
  proc *p = lua_touserdata(L, 1);
  proc_release(L, p);
  if (p->ext) { /* reaped already (or never started): release what is left */
    ext_reaped(p, NULL);
    p->ext->destroy(p->ext);
    p->ext = NULL;
  }
  return 0;
}

static int l_tostring(lua_State *L) {
  proc *p = check_proc(L, 1);
  lua_pushfstring(L, "clawlua.proc (%s, pid %d, %s)", p->name, (int)p->pid,
                  p->reaped ? "exited" : (p->closed ? "closed" : "running"));
  return 1;
}

static const luaL_Reg methods[] = {
    {"wait", l_wait},     {"kill", l_kill},   {"running", l_running}, {"pid", l_pid},
    {"status", l_status}, {"close", l_close}, {NULL, NULL},
};

static int l_index(lua_State *L) {
  check_proc(L, 1);
  const char *k = luaL_checkstring(L, 2);
  static const char *const stdio[] = {"stdin", "stdout", "stderr"};
  for (int i = 0; i < 3; i++)
    if (strcmp(k, stdio[i]) == 0) {
      lua_getiuservalue(L, 1, i + 1);
      return 1;
    }
  if (strcmp(k, "seccomp") == 0) {
    lua_getiuservalue(L, 1, 4);
    return 1;
  }
  if (strcmp(k, "jail") == 0) {
    lua_getiuservalue(L, 1, 5);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* proc.spawn                                                                                 */

/* How one stdio slot is set up: resolved before any fd is created. */
typedef struct stdio_spec {
  int kind; /* 0 inherit, 1 null, 2 pipe, 3 fd (borrowed), 4 path (opened), 5 same as stdout */
  int fd;
  const char *path;
  int flags;
} stdio_spec;

static void parse_stdio(lua_State *L, int opts, const char *name, int slot, stdio_spec *sp) {
  memset(sp, 0, sizeof *sp);
  sp->fd = -1;
  int t = lua_getfield(L, opts, name);
  if (t == LUA_TNIL) {
    sp->kind = 0;
  } else if (t == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    if (strcmp(s, "inherit") == 0)
      sp->kind = 0;
    else if (strcmp(s, "null") == 0)
      sp->kind = 1;
    else if (strcmp(s, "pipe") == 0)
      sp->kind = 2;
    else if (slot == 2 && strcmp(s, "stdout") == 0)
      sp->kind = 5;
    else {
      const char *msg = lua_pushfstring(L,
                                        "\"inherit\", \"null\", \"pipe\"%s, a file, a stream, "
                                        "an fd or {path=, mode=} expected, got \"%s\"",
                                        slot == 2 ? ", \"stdout\"" : "", s);
      cl_field_error(L, name, msg);
    }
  } else if (t == LUA_TNUMBER && lua_isinteger(L, -1)) {
    sp->kind = 3;
    sp->fd = (int)lua_tointeger(L, -1);
    if (fcntl(sp->fd, F_GETFD) < 0) cl_field_error(L, name, "not an open file descriptor");
  } else if (t == LUA_TUSERDATA) {
    luaL_Stream *f = luaL_testudata(L, -1, LUA_FILEHANDLE);
    cl_stream *s = luaL_testudata(L, -1, STREAM_MT);
    sp->kind = 3;
    if (f && f->closef && f->f)
      sp->fd = fileno(f->f);
    else if (s)
      sp->fd = cl_stream_fd(s);
    if (sp->fd < 0) cl_field_error(L, name, "closed file or stream");
    if (f && f->f) fflush(f->f);
  } else if (t == LUA_TTABLE) {
    static const char *const fields[] = {"path", "mode", NULL};
    cl_check_fields(L, -1, fields);
    sp->kind = 4;
    lua_getfield(L, -1, "path");
    sp->path = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (!sp->path) cl_field_error(L, name, "path missing");
    const char *mode = cl_opt_string(L, lua_gettop(L), "mode", slot == 0 ? "r" : "w");
    if (strcmp(mode, "r") == 0)
      sp->flags = O_RDONLY;
    else if (strcmp(mode, "w") == 0)
      sp->flags = O_WRONLY | O_CREAT | O_TRUNC;
    else if (strcmp(mode, "a") == 0)
      sp->flags = O_WRONLY | O_CREAT | O_APPEND;
    else
      cl_field_error(L, name, "mode must be \"r\", \"w\" or \"a\"");
  } else {
    const char *msg =
        lua_pushfstring(L, "string, integer, file or table expected, got %s", luaL_typename(L, -1));
    cl_field_error(L, name, msg);
  }
  lua_pop(L, 1); /* strings stay anchored in the option table */
}

/* Copies env's name -> value pairs into merged (false unsets a name). */
static void merge_env(lua_State *L, int env, int merged) {
  lua_pushnil(L);
  while (lua_next(L, env)) {
    if (lua_type(L, -2) != LUA_TSTRING ||
        (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER &&
         lua_type(L, -1) != LUA_TBOOLEAN))
      cl_field_error(L, "env", "string keys with string values expected");
    size_t kl;
    const char *k = lua_tolstring(L, -2, &kl);
    if (kl == 0 || strchr(k, '=') || strlen(k) != kl)
      cl_field_error(L, lua_pushfstring(L, "env.%s", k), "invalid variable name");
    lua_pushvalue(L, -2);
    if (lua_type(L, -2) == LUA_TBOOLEAN && !lua_toboolean(L, -2))
      lua_pushnil(L); /* unset */
    else
      lua_pushstring(L, luaL_tolstring(L, -2, NULL)), lua_remove(L, -2);
    lua_rawset(L, merged);
    lua_pop(L, 1);
  }
}

/* Builds envp in a userdata vector pushed on the stack, or returns NULL (pushing nothing) when
 * the child inherits the environment as it is. env merges into the runtime's environment (or an
 * empty one with env_clear = true). */
static char **build_env(lua_State *L, int opts) {
  int top = lua_gettop(L);
  int has_env = lua_getfield(L, opts, "env") != LUA_TNIL;
  if (has_env && !lua_istable(L, -1)) cl_field_error(L, "env", "table expected");
  int clear = cl_opt_boolean(L, opts, "env_clear", 0);
  if (!has_env && !clear) {
    lua_settop(L, top);
    return NULL;
  }
  lua_newtable(L);
  int merged = lua_gettop(L);
  for (char **e = clear ? NULL : environ; e && *e; e++) {
    const char *eq = strchr(*e, '=');
    if (!eq) continue;
    lua_pushlstring(L, *e, (size_t)(eq - *e));
    lua_pushstring(L, eq + 1);
    lua_rawset(L, merged);
  }
  if (has_env) merge_env(L, top + 1, merged);
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, merged)) {
    n++;
    lua_pop(L, 1);
  }
  char **v = lua_newuserdatauv(L, sizeof(char *) * (n + 1), 1);
  lua_newtable(L);
  size_t i = 0;
  lua_pushnil(L);
  while (lua_next(L, merged)) {
    const char *kv = lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
    v[i++] = (char *)kv;
    lua_rawseti(L, -4, (lua_Integer)i);
    lua_pop(L, 1);
  }
  v[n] = NULL;
  lua_setiuservalue(L, -2, 1);
  /* Keep only the vector: it anchors its strings. */
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
  return v;
}

static const char *env_path(char **envp) {
  if (!envp) return getenv("PATH");
  for (char **e = envp; *e; e++)
    if (strncmp(*e, "PATH=", 5) == 0) return *e + 5;
  return NULL;
}

/* Lua: proc.spawn{argv... | argv=, cwd=, env=, env_clear=, stdin=, stdout=, stderr=, group=true,
 * session=false, pdeathsig="KILL", seccomp=filter, fds={fd, ...}} -> process | nil, err, code */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  return cl_proc_spawn(L, 1, NULL);
}

int cl_proc_spawn(lua_State *L, int opts, const cl_spawn_hooks *hooks) {
  static const char *const fields[] = {"argv",   "cwd",     "env",   "env_clear", "stdin",
                                       "stdout", "stderr",  "group", "session",   "pdeathsig",
                                       "name",   "seccomp", "fds",   NULL};
  opts = lua_absindex(L, opts);
  luaL_checktype(L, opts, LUA_TTABLE);
  /* Unknown fields: ours plus the caller's. */
  const char *known[64];
  size_t nk = 0;
  for (const char *const *f = fields; *f; f++) known[nk++] = *f;
  for (const char *const *f = hooks ? hooks->fields : NULL; f && *f && nk < 63; f++)
    known[nk++] = *f;
  known[nk] = NULL;
  cl_check_fields(L, opts, known);
  int base = lua_gettop(L);
  char **argv;
  if (lua_getfield(L, opts, "argv") != LUA_TNIL) {
    if (lua_rawlen(L, opts) > 0) cl_field_error(L, "argv", "given twice (positional and argv=)");
    argv = cl_check_argv(L, -1, "argv", 0);
  } else {
    argv = cl_check_argv(L, opts, "argv", 0);
  }
  int argv_idx = lua_gettop(L);
  const char *cwd = cl_opt_string(L, opts, "cwd", NULL);
  int group = cl_opt_boolean(L, opts, "group", 1);
  int session = cl_opt_boolean(L, opts, "session", 0);
  int pdeath = SIGKILL;
  if (lua_getfield(L, opts, "pdeathsig") != LUA_TNIL) {
    if (lua_isboolean(L, -1) && !lua_toboolean(L, -1))
      pdeath = 0;
    else if ((pdeath = cl_signal_number(L, -1)) < 0)
      cl_field_error(L, "pdeathsig", "unknown signal");
  }
  lua_pop(L, 1);
  stdio_spec sp[3];
  parse_stdio(L, opts, "stdin", 0, &sp[0]);
  parse_stdio(L, opts, "stdout", 1, &sp[1]);
  parse_stdio(L, opts, "stderr", 2, &sp[2]);
  char **envp = build_env(L, opts);
  lua_settop(L, argv_idx + (envp ? 1 : 0));
  cl_seccomp_prog *sc = NULL;
  int sc_idx = 0;
  if (lua_getfield(L, opts, "seccomp") != LUA_TNIL) {
    sc = cl_seccomp_prepare(L, -1);
    lua_remove(L, -2);
    sc_idx = lua_gettop(L);
  } else {
    lua_pop(L, 1);
  }
  CL_UNUSED(base);
  /* fds = {fd, ...}: open fds the child gets as 3, 4, ... (borrowed: the caller keeps them). */
  int pass[CL_MAX_PASS_FDS], npass = 0;
  if (lua_getfield(L, opts, "fds") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "fds", "list of open file descriptors expected");
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    if (n > CL_MAX_PASS_FDS) cl_field_error(L, "fds", "more than 16 file descriptors");
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      int isnum;
      lua_Integer fd = lua_tointegerx(L, -1, &isnum);
      if (!isnum || fd < 0 || fd > 0x7fffffff || fcntl((int)fd, F_GETFD) < 0)
        cl_field_error(L, "fds", lua_pushfstring(L, "entry %I is not an open file descriptor", i));
      pass[npass++] = (int)fd;
      lua_pop(L, 1);
    }
    if (npass && sc && cl_seccomp_prog_notifies(sc))
      cl_field_error(L, "fds", "cannot be passed together with a notify seccomp filter");
  }
  lua_pop(L, 1);

  int in_jail = hooks && hooks->in_jail;
  char path[4096];
  if (!in_jail) {
    int e = cl_find_executable(argv[0], env_path(envp), path, sizeof path);
    if (e) {
      if (e == ENOENT && !strchr(argv[0], '/'))
        return cl_failf(L, e, "spawn %s: not found in PATH", argv[0]);
      return cl_failf(L, e, "spawn %s: %s", argv[0], strerror(e));
    }
  }
  if (cwd && !in_jail) {
    struct stat st;
    if (stat(cwd, &st) < 0)
      return cl_failf(L, errno, "spawn %s: cwd %s: %s", argv[0], cwd, strerror(errno));
    if (!S_ISDIR(st.st_mode))
      return cl_failf(L, ENOTDIR, "spawn %s: cwd %s: not a directory", argv[0], cwd);
  }

  /* The handle exists before any fd, so every later failure has an owner to release. */
  proc *p = lua_newuserdatauv(L, sizeof *p, 5);
  memset(p, 0, sizeof *p);
  p->pidfd = -1;
  p->closed = 1;
  luaL_setmetatable(L, PROC_MT);
  int pi = lua_gettop(L);
  snprintf(p->name, sizeof p->name, "%s", argv[0]);
  cl_spawn_req req;
  memset(&req, 0, sizeof req);
  char msg[512] = "";
  if (hooks && hooks->prepare) {
    /* The handle owns the extension from here: collecting it on an error releases it. */
    /* What prepare pushes stays on the stack (above the handle) until we return. */
    int pe = hooks->prepare(L, opts, &req, hooks->arg, &p->ext, msg, sizeof msg);
    if (pe) { /* never started: release what prepare made (cgroups) now, not at collection */
      if (p->ext) p->ext->destroy(p->ext);
      p->ext = NULL;
      return cl_failf(L, pe, "spawn %s: %s", argv[0], msg);
    }
  }

  int child_fd[3] = {-2, -2, -2}, parent_fd[3] = {-1, -1, -1}, opened[3] = {-1, -1, -1};
  int err = 0;
  const char *what = "pipe";
  for (int i = 0; i < 3 && !err; i++) {
    switch (sp[i].kind) {
    case 0:
      child_fd[i] = -2;
      break;
    case 1:
      child_fd[i] = -1;
      break;
    case 2: {
      int pp[2];
      if (pipe2(pp, O_CLOEXEC) < 0) {
        err = errno;
        break;
      }
      parent_fd[i] = i == 0 ? pp[1] : pp[0];
      child_fd[i] = i == 0 ? pp[0] : pp[1];
      opened[i] = child_fd[i];
      break;
    }
    case 3:
      child_fd[i] = sp[i].fd;
      break;
    case 4:
      opened[i] = child_fd[i] = open(sp[i].path, sp[i].flags | O_CLOEXEC, 0644);
      if (opened[i] < 0) {
        err = errno;
        what = sp[i].path;
      }
      break;
    case 5:
      child_fd[i] = child_fd[1] == -2 ? 1 : child_fd[1];
      break;
    }
  }
  if (!err) {
    req.path = in_jail ? (strchr(argv[0], '/') ? argv[0] : NULL) : path;
    req.search_path = env_path(envp);
    req.argv = argv;
    req.envp = envp;
    req.cwd = cwd;
    req.cwd_after_setup = in_jail;
    for (int i = 0; i < 3; i++) req.fds[i] = child_fd[i];
    req.new_pgroup = group;
    req.new_session = session;
    req.pdeathsig = pdeath;
    req.seccomp = sc;
    req.pass_fds = pass;
    req.npass = npass;
    err = cl_spawn(&req, &p->pid, &p->pidfd, msg, sizeof msg);
    what = NULL;
  }
  for (int i = 0; i < 3; i++)
    if (opened[i] >= 0) close(opened[i]);
  if (err) {
    for (int i = 0; i < 3; i++)
      if (parent_fd[i] >= 0) close(parent_fd[i]);
    if (p->ext) p->ext->destroy(p->ext);
    p->ext = NULL;
    if (what) return cl_failf(L, err, "spawn %s: %s: %s", argv[0], what, strerror(err));
    return cl_failf(L, err, "spawn %s: %s", argv[0], msg);
  }
  p->closed = 0;
  p->group = group || session;
  p->started = cl_now();
  cl_watch_start(cl_loop_get(L), &p->watch, p->pidfd, 0, NULL);
  if (sc && cl_seccomp_prog_notifies(sc)) {
    cl_seccomp_supervise(L, sc_idx, p->pid, hooks ? hooks->sandbox : NULL);
    lua_setiuservalue(L, pi, 4);
  }
  if (hooks && hooks->started) {
    lua_pushvalue(L, pi);
    hooks->started(L, lua_gettop(L), p->pid, hooks->arg);
    lua_settop(L, pi);
  }
  static const char *const names[] = {"stdin", "stdout", "stderr"};
  for (int i = 0; i < 3; i++) {
    if (parent_fd[i] < 0) continue;
    cl_stream_new(L, parent_fd[i], i == 0 ? CL_STREAM_WRITE : CL_STREAM_READ, names[i]);
    lua_setiuservalue(L, pi, i + 1);
  }
  lua_settop(L, pi);
  return 1;
}

pid_t cl_proc_pid(lua_State *L, int idx) {
  proc *p = luaL_testudata(L, idx, PROC_MT);
  return p ? p->pid : 0;
}

int cl_proc_pidfd(lua_State *L, int idx) {
  proc *p = luaL_testudata(L, idx, PROC_MT);
  return p && !p->reaped && !p->closed ? p->pidfd : -1;
}

/* Lua: proc.run{...} -> {code|signal, stdout, stderr, truncated, timed_out, duration, ...}:
 * written in Lua (lua/clawlua/proc_run.lua) on top of spawn and the loop's tasks. */
static int l_run(lua_State *L) {
  return cl_call_lua(L, "clawlua.proc_run", "run");
}

/* Lua: proc.find_executable(name) -> path | nil, err */
static int l_find_executable(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  char out[4096];
  int e = cl_find_executable(name, getenv("PATH"), out, sizeof out);
  if (e) return cl_failf(L, e, "%s: %s", name, e == ENOENT ? "not found in PATH" : strerror(e));
  lua_pushstring(L, out);
  return 1;
}

/* Lua: proc.diagnostics() -> {fds = n, children = {pid, ...}} for leak checks. */
static int l_diagnostics(lua_State *L) {
  lua_createtable(L, 0, 2);
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    struct dirent *de;
    while ((de = readdir(d)))
      if (de->d_name[0] != '.') n++;
    closedir(d);
    n--; /* the directory's own fd */
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "fds");
  lua_newtable(L);
  int k = 0;
  char path[64];
  snprintf(path, sizeof path, "/proc/self/task/%d/children", (int)getpid());
  FILE *f = fopen(path, "re");
  if (f) {
    char buf[8192];
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    buf[got] = 0;
    fclose(f);
    for (char *p = buf, *end; *p; p = end) {
      long pid = strtol(p, &end, 10);
      if (end == p) break;
      lua_pushinteger(L, pid);
      lua_rawseti(L, -2, ++k);
    }
  }
  lua_setfield(L, -2, "children");
  return 1;
}

static const luaL_Reg funcs[] = {
    {"spawn", l_spawn},
    {"run", l_run},
    {"find_executable", l_find_executable},
    {"diagnostics", l_diagnostics},
    {NULL, NULL},
};

int luaopen_clawlua_proc(lua_State *L) {
  if (cl_entry_redirect(L, "proc")) return 1;
  luaL_newmetatable(L, PROC_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "methods");
  lua_pushcfunction(L, l_index);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
