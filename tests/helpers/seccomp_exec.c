/*
 * clawlua-seccomp-exec: the second half of a spawn with a seccomp filter in test builds for
 * valgrind (cmake -DCLAWLUA_SECCOMP_TRAMPOLINE=ON; never in a production build). valgrind does
 * not implement seccomp(2), and a child of the runtime runs under valgrind until it execs; so
 * there the child execs this static program instead (runtime/seccomp_child.c,
 * cl_seccomp_child_trampoline), which does the rest natively, exactly as the child would have:
 * no_new_privs, the filter, the notify listener handed over, then the target's execve.
 *
 * usage (from the runtime only): clawlua-seccomp-exec CTLFD
 * CTLFD is a memfd: struct seccomp_exec_ctl, the BPF program, then path\0argv[0]\0...; the
 * environment is the target's. A failure is written to the spawn's error pipe in its format.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../../runtime/fdpass.h"
#include "../../runtime/seccomp_exec.h"

extern char **environ;

static int errfd = -1;

static void fail(int err, const char *stage) {
  struct seccomp_exec_report msg;
  memset(&msg, 0, sizeof msg);
  msg.err = err;
  strncpy(msg.stage, stage, sizeof msg.stage - 1);
  if (errfd >= 0) {
    ssize_t w = write(errfd, &msg, sizeof msg);
    (void)w;
  }
  _exit(127);
}

int main(int argc, char **argv) {
  if (argc != 2) return 127;
  int ctl = atoi(argv[1]);
  struct stat st;
  if (fstat(ctl, &st) < 0 || (size_t)st.st_size < sizeof(struct seccomp_exec_ctl)) return 127;
  char *buf = malloc((size_t)st.st_size + 1);
  if (!buf) return 127;
  size_t got = 0;
  while (got < (size_t)st.st_size) {
    ssize_t n = pread(ctl, buf + got, (size_t)st.st_size - got, (off_t)got);
    if (n <= 0) return 127;
    got += (size_t)n;
  }
  buf[got] = 0;
  close(ctl);
  struct seccomp_exec_ctl c;
  memcpy(&c, buf, sizeof c);
  errfd = c.errfd;
  size_t off = sizeof c + (size_t)c.ninsns * sizeof(struct sock_filter);
  if (off >= got || c.argc < 1 || c.argc > 1 << 20) fail(EINVAL, "seccomp-exec control");
  struct sock_fprog prog = {(unsigned short)c.ninsns, (struct sock_filter *)(buf + sizeof c)};
  char *path = buf + off;
  char **args = calloc((size_t)c.argc + 1, sizeof *args);
  if (!args) fail(ENOMEM, "seccomp-exec");
  char *p = path + strlen(path) + 1;
  for (uint32_t i = 0; i < c.argc; i++) {
    if (p >= buf + got) fail(EINVAL, "seccomp-exec control");
    args[i] = p;
    p += strlen(p) + 1;
  }
  /* the error pipe is close-on-exec again (its EOF tells the runtime the target runs), and so
   * is the hand-off socket: nothing is closed under the filter */
  if (errfd >= 0) fcntl(errfd, F_SETFD, FD_CLOEXEC);
  if (c.sock >= 0) fcntl(c.sock, F_SETFD, FD_CLOEXEC);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail(errno, "prctl(no_new_privs)");
  long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, c.flags, &prog);
  if (fd < 0) fail(errno, "seccomp");
  if (c.sock >= 0) {
    if (cl_send_fd(c.sock, (int)fd) < 0) fail(errno, "seccomp listener hand-off (sendmsg)");
  }
  execve(path, args, environ);
  fail(errno, "exec");
  return 127;
}
