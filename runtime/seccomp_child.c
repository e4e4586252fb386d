/*
 * A prepared seccomp program in a child: installed as the last step before exec (no_new_privs,
 * the filter; async-signal-safe), and for notify filters the listener handed to the parent over
 * a socketpair while cl_spawn waits for the exec.
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
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    char one = 1;
    struct iovec iov = {&one, 1};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    int lfd = (int)fd;
    memcpy(CMSG_DATA(cm), &lfd, sizeof lfd);
    if (sendmsg(p->sock[1], &mh, MSG_NOSIGNAL) < 0) {
      *stage = "seccomp listener hand-off (sendmsg)";
      return errno;
    }
  }
  return 0;
}

static int recv_fd(int sock) {
  char cbuf[CMSG_SPACE(sizeof(int))];
  char one;
  struct iovec iov = {&one, 1};
  struct msghdr mh;
  memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf;
  mh.msg_controllen = sizeof cbuf;
  ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  if (n <= 0) return -1;
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  if (!cm || cm->cmsg_type != SCM_RIGHTS) return -1;
  int fd;
  memcpy(&fd, CMSG_DATA(cm), sizeof fd);
  return fd;
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
        p->listener = recv_fd(p->sock[0]);
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
      p->listener = recv_fd(p->sock[0]);
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
