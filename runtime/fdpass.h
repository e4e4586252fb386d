/*
 * Passing one file descriptor over a unix socket (SCM_RIGHTS), header-only: the seccomp child
 * hands its notify listener to the supervisor with it, and so do the static exec helper of the
 * valgrind test build (tests/helpers/seccomp_exec.c) and the C peer of the notify benchmark,
 * which link nothing of the runtime.
 */
#ifndef CLAWLUA_FDPASS_H
#define CLAWLUA_FDPASS_H

#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* Sends fd (with one byte of data) on sock; 0, or -1 with errno. */
static inline int cl_send_fd(int sock, int fd) {
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
  memcpy(CMSG_DATA(cm), &fd, sizeof fd);
  return sendmsg(sock, &mh, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* Receives one fd sent by cl_send_fd; the fd, or -1. flags: recvmsg's (MSG_DONTWAIT,
 * MSG_CMSG_CLOEXEC). */
static inline int cl_recv_fd(int sock, int flags) {
  char cbuf[CMSG_SPACE(sizeof(int))];
  char one;
  struct iovec iov = {&one, 1};
  struct msghdr mh;
  memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf;
  mh.msg_controllen = sizeof cbuf;
  if (recvmsg(sock, &mh, flags) <= 0) return -1;
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  if (!cm || cm->cmsg_type != SCM_RIGHTS) return -1;
  int fd;
  memcpy(&fd, CMSG_DATA(cm), sizeof fd);
  return fd;
}

#endif
