/*
 * Starting a child (cl_spawn): clone(CLONE_VM|CLONE_VFORK) like posix_spawn, or a fork-style
 * clone when a jail runs set-up code in the child; stdio, signals reset, pdeathsig, the fds to
 * pass, the jail's child set-up and the seccomp filter last, then exec. A failure in the child
 * before exec comes back over a close-on-exec pipe, with the stage that failed. No Lua here:
 * proc.c is the Lua face.
 */
#include "clawlua.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <poll.h>
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

#define VFORK_STACK (64 * 1024)

extern char **environ;

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
    /* A parent that died before the prctl sends no signal. getppid() tells outside a new PID
     * namespace; inside one it is 0 either way, so the error pipe tells: its one reader is the
     * parent (until we exec), and a pipe without readers is POLLERR at the writing end. (A jailed
     * VMM whose runtime was SIGKILLed in that window ran on: sandbox_vm_kill_spec.) */
    if (r->clone_flags & CLONE_NEWPID) {
      struct pollfd pf = {.fd = a->errfd, .events = POLLOUT, .revents = 0};
      if (poll(&pf, 1, 0) > 0 && (pf.revents & POLLERR)) _exit(127);
    } else if (getppid() != a->parent) {
      _exit(127);
    }
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
#ifdef CLAWLUA_SECCOMP_TRAMPOLINE
    int err = cl_seccomp_child_trampoline(r->seccomp, a->errfd, path, r->argv, envp, &stage);
#else
    int err = cl_seccomp_child_install(r->seccomp, &stage);
#endif
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
#ifdef CLAWLUA_SECCOMP_TRAMPOLINE
  if (req->seccomp) cl_seccomp_trampoline_fd(); /* opened once, before any child needs it */
#endif
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
