/*
 * A prepared seccomp program in a child: installed as the last step before exec (no_new_privs,
 * the filter; async-signal-safe), and for notify filters the listener handed to the parent over
 * a socketpair while cl_spawn waits for the exec.
 */
#include "seccomp_int.h"

#include "fdpass.h"

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

int cl_seccomp_prep_gc(lua_State *L) {
  cl_seccomp_prog *p = lua_touserdata(L, 1);
  for (int i = 0; i < 2; i++)
    if (p->sock[i] >= 0) close(p->sock[i]), p->sock[i] = -1;
  if (p->listener >= 0) close(p->listener), p->listener = -1;
  return 0;
}

int cl_seccomp_prog_notifies(const cl_seccomp_prog *p) {
  return p->notify;
}

/* In the child, last before exec: async-signal-safe. */
#ifdef CLAWLUA_SECCOMP_TRAMPOLINE
#include "seccomp_exec.h"

/* Test builds for valgrind only (cmake -DCLAWLUA_SECCOMP_TRAMPOLINE=ON): valgrind does not
 * implement seccomp(2) and a child runs under it until exec, so the child execs the static
 * helper clawlua-seccomp-exec (by an fd opened in the parent: the jail's root need not hold it)
 * with a memfd describing the filter and the target; the helper installs the filter natively
 * and execs the target. Same order of events for the target as cl_seccomp_child_install. */
static int trampoline_fd = -2;

int cl_seccomp_trampoline_fd(void) {
  if (trampoline_fd == -2) trampoline_fd = open(CLAWLUA_SECCOMP_TRAMPOLINE, O_PATH | O_CLOEXEC);
  return trampoline_fd;
}

static int write_all(int fd, const void *buf, size_t n) {
  const char *b = buf;
  while (n > 0) {
    ssize_t w = write(fd, b, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    b += w, n -= (size_t)w;
  }
  return 0;
}

/* In the child, instead of the install and the exec; returns only on failure (an errno). */
int cl_seccomp_child_trampoline(cl_seccomp_prog *p, int errfd, const char *path, char *const argv[],
                                char *const envp[], const char **stage) {
  *stage = "seccomp trampoline";
  if (trampoline_fd < 0) return ENOENT;
  int ctl = (int)syscall(SYS_memfd_create, "clawlua-seccomp-exec", 0U);
  if (ctl < 0) return errno;
  struct seccomp_exec_ctl c;
  memset(&c, 0, sizeof c);
  c.flags = p->flags;
  c.ninsns = p->prog.len;
  c.sock = p->notify ? p->sock[1] : -1;
  c.errfd = errfd;
  while (argv[c.argc]) c.argc++;
  if (write_all(ctl, &c, sizeof c) < 0 ||
      write_all(ctl, p->prog.filter, (size_t)p->prog.len * sizeof(struct sock_filter)) < 0 ||
      write_all(ctl, path, strlen(path) + 1) < 0)
    return errno;
  for (uint32_t i = 0; i < c.argc; i++)
    if (write_all(ctl, argv[i], strlen(argv[i]) + 1) < 0) return errno;
  /* the helper inherits the error pipe and the hand-off socket, and makes them close-on-exec */
  fcntl(errfd, F_SETFD, 0);
  if (c.sock >= 0) fcntl(c.sock, F_SETFD, 0);
  char num[16], *d = num + sizeof num; /* the fd in decimal, without stdio */
  *--d = 0;
  do *--d = (char)('0' + ctl % 10);
  while ((ctl /= 10) > 0);
  char *const hargv[] = {"clawlua-seccomp-exec", d, NULL};
  /* by /proc/self/fd, not execveat: valgrind turns an execveat into an execve of the fd's path,
   * which a jail's root does not have; the magic link reaches the file from any root */
  char self[40] = "/proc/self/fd/", rev[16], *e = self + 14;
  int n = trampoline_fd, len = 0;
  do rev[len++] = (char)('0' + n % 10);
  while ((n /= 10) > 0);
  while (len > 0) *e++ = rev[--len];
  *e = 0;
  execve(self, hargv, envp);
  return errno;
}
#endif

int cl_seccomp_child_install(cl_seccomp_prog *p, const char **stage) {
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
    *stage = "prctl(no_new_privs)";
    return errno;
  }
  long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, p->flags, &p->prog);
  if (fd < 0) {
    *stage = "seccomp";
    return errno;
  }
  if (p->notify) {
    /* From here on every syscall goes through the filter: the hand-off and the exec are the
     * only ones left before the program runs. */
    if (cl_send_fd(p->sock[1], (int)fd) < 0) {
      *stage = "seccomp listener hand-off (sendmsg)";
      return errno;
    }
  }
  return 0;
}

static int errfd_ready(int errfd) {
  struct pollfd pf = {errfd, POLLIN, 0};
  return poll(&pf, 1, 0) > 0;
}

/*
 * Parent, in place of cl_spawn's wait for exec when the filter notifies: receives the listener
 * and answers the notifications raised by the runtime's own code between the filter and exec
 * (the hand-off, execve) with "continue". A notification is the runtime's while the child has
 * not exec'd: the child is single-threaded and blocked in it, so exec cannot have happened; one
 * read after the exec is visible belongs to the program and is kept for the supervisor.
 */
ssize_t cl_seccomp_exec_wait(void *arg, pid_t pid, int errfd, void *buf, size_t len) {
  cl_seccomp_prog *p = arg;
  if (p->sock[1] >= 0) {
    close(p->sock[1]);
    p->sock[1] = -1;
  }
  uint64_t deadline = cl_now_ns() + (uint64_t)HANDOFF_TIMEOUT_MS * 1000000u;
  for (;;) {
    struct pollfd pf[3] = {{errfd, POLLIN, 0}, {p->sock[0], POLLIN, 0}, {p->listener, POLLIN, 0}};
    uint64_t now = cl_now_ns();
    if (now >= deadline) {
      kill(pid, SIGKILL);
      return -ETIMEDOUT;
    }
    int n = poll(pf, 3, (int)((deadline - now) / 1000000u) + 1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (pf[0].revents) {
      /* Exec'd (or failed): the listener was sent before, so it is in the socket already. */
      if (p->listener < 0 && p->sock[0] >= 0) {
        p->listener = cl_recv_fd(p->sock[0], MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (p->listener >= 0) cl_set_nonblock(p->listener, 1);
      }
      ssize_t r;
      do r = read(errfd, buf, len);
      while (r < 0 && errno == EINTR);
      if (r > 0) kill(pid, SIGKILL);   /* failed before exec: it may be stuck in a notified exit */
      if (r == 0 && p->listener < 0) { /* exec'd without handing over: cannot supervise */
        kill(pid, SIGKILL);
        return -EPROTO;
      }
      return r < 0 ? -errno : r;
    }
    if (pf[1].revents && p->listener < 0) {
      p->listener = cl_recv_fd(p->sock[0], MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
      close(p->sock[0]);
      p->sock[0] = -1;
      if (p->listener < 0) {
        kill(pid, SIGKILL);
        return -EPROTO;
      }
      cl_set_nonblock(p->listener, 1);
      continue;
    }
    if (p->listener >= 0 && (pf[2].revents & POLLIN)) {
      struct seccomp_notif req;
      memset(&req, 0, sizeof req);
      if (ioctl(p->listener, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) continue;
      if (errfd_ready(errfd)) { /* the program's: for the supervisor */
        p->carry = req;
        p->carry_valid = 1;
        continue;
      }
      struct seccomp_notif_resp resp;
      memset(&resp, 0, sizeof resp);
      resp.id = req.id;
      resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
      ioctl(p->listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
  }
}
