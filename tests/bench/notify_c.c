/*
 * The bare C peer of the notify benchmark: a child traps getppid with a notify filter and calls
 * it N times; this process answers every notification with "continue" straight from a
 * blocking ioctl loop. Prints the child's ns per call. Usage: clawlua-notify-bench N
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../runtime/fdpass.h"

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 10000;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) return 1;
  pid_t pid = fork();
  if (pid == 0) {
    close(sv[0]);
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(getppid), 0);
    if (seccomp_load(ctx) < 0) _exit(2);
    int fd = seccomp_notify_fd(ctx);
    cl_send_fd(sv[1], fd);
    close(fd);
    double t0 = now_ns();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    printf("%.2f\n", (now_ns() - t0) / (double)n);
    fflush(stdout);
    _exit(0);
  }
  close(sv[1]);
  int fd = cl_recv_fd(sv[0], 0);
  if (fd < 0) return 1;
  struct seccomp_notif *req;
  struct seccomp_notif_resp *resp;
  if (seccomp_notify_alloc(&req, &resp) < 0) return 1;
  for (;;) {
    struct pollfd pf = {fd, POLLIN, 0};
    if (poll(&pf, 1, -1) < 0 && errno != EINTR) break;
    if (pf.revents & POLLHUP) break;
    memset(req, 0, sizeof *req);
    if (seccomp_notify_receive(fd, req) < 0) continue;
    memset(resp, 0, sizeof *resp);
    resp->id = req->id;
    resp->flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
    seccomp_notify_respond(fd, resp);
  }
  int st;
  waitpid(pid, &st, 0);
  return 0;
}
