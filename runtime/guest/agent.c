/*
 * clawlua-agent: the guest side of clawlua's host <-> guest channel (protocol in proto.h).
 *
 * In a guest image it is /init, so PID 1: it mounts the pseudo file systems, loads the kernel
 * modules listed in /etc/clawlua/modules (Debian builds every virtio driver as a module), reaps
 * every orphan, powers the machine off on ACPI power button, Ctrl-Alt-Del or SIGTERM/SIGPWR,
 * and serves the host over the virtio-serial port named org.clawlua.agent (found through
 * /sys/class/virtio-ports/<port>/name, opened once read-write and reopened when the host goes
 * away) or over vsock port 1024. `--fd N` serves an inherited socket instead (tests on the
 * host; the Firecracker stand-in).
 *
 * One thread, one poll() loop, every fd non-blocking, every system call retried on EINTR.
 * Signals arrive through a signalfd. Output waiting for the host is bounded: above a high
 * water mark the agent stops reading its children's pipes and files until the host catches up.
 * Statically linked: it runs in an initramfs with no libc.
 *
 * This file holds main, the poll() loop, the channel and the frame dispatcher; the concerns it
 * dispatches to (exec.c, file.c, pid1.c) and the layers below them are laid out in agent_int.h.
 */
#include "agent_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_CAP (CLA_HEADER + CLA_MAX_PAYLOAD)

/* ------------------------------------------------------------------------------------------ */
/* The channel                                                                                */

static void drop_connection(void) {
  /* The host that asked is gone: what it started is stopped, half-written files removed. */
  while (cl_jobs) {
    if (cl_jobs->kind == J_EXEC && !cl_jobs->exited) kill(-cl_jobs->pid, SIGKILL);
    cl_job_free(cl_jobs);
  }
  cl_close_fd(&cl_agent.fd);
  cl_agent.in_len = 0;
  cl_agent.out_len = cl_agent.out_off = 0;
}

static int find_port(char *dev, size_t len) {
  DIR *d = opendir("/sys/class/virtio-ports");
  if (!d) return 0;
  struct dirent *de;
  int found = 0;
  while (!found && (de = readdir(d))) {
    if (de->d_name[0] == '.') continue;
    char p[300], name[128];
    snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", de->d_name);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ssize_t n = read(fd, name, sizeof name - 1);
    close(fd);
    if (n <= 0) continue;
    name[n] = 0;
    if (name[n - 1] == '\n') name[n - 1] = 0;
    if (strcmp(name, CLA_PORT_NAME) == 0) {
      snprintf(dev, len, "/dev/%s", de->d_name);
      found = 1;
    }
  }
  closedir(d);
  return found;
}

/* Opens the channel when it is closed; returns 1 when it is open. */
static int open_channel(void) {
  if (cl_agent.fd >= 0) return 1;
  if (cl_agent.mode == CH_FD) return 0;
  if (cl_agent.mode == CH_VSOCK) {
    if (cl_agent.listen_fd < 0) {
      cl_agent.listen_fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      if (cl_agent.listen_fd < 0) return 0;
      struct sockaddr_vm a;
      memset(&a, 0, sizeof a);
      a.svm_family = AF_VSOCK;
      a.svm_cid = VMADDR_CID_ANY;
      a.svm_port = cl_agent.vsock_port;
      if (bind(cl_agent.listen_fd, (struct sockaddr *)&a, sizeof a) < 0 ||
          listen(cl_agent.listen_fd, 4) < 0) {
        cl_log("vsock port %u: %s", cl_agent.vsock_port, strerror(errno));
        cl_close_fd(&cl_agent.listen_fd);
        return 0;
      }
    }
    int c = accept4(cl_agent.listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c < 0) return 0;
    cl_agent.fd = c;
    cl_send_ready(CLA_READY, 0);
    return 1;
  }
  uint64_t now = cl_now_ms();
  if (now < cl_agent.reopen_at) return 0;
  cl_agent.reopen_at = now + 20;
  char dev[300];
  if (!find_port(dev, sizeof dev)) return 0;
  int fd = open(dev, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    cl_agent.reopen_at = now + 100;
    return 0;
  }
  cl_agent.fd = fd;
  cl_send_ready(CLA_READY, 0);
  return 1;
}

static void handle_frame(const cla_header *h, const unsigned char *p) {
  switch (h->type) {
  case CLA_PING:
    cl_send_ready(CLA_PONG, h->id);
    break;
  case CLA_EXEC:
    cl_handle_exec(h->id, p, h->len);
    break;
  case CLA_STDIN:
    cl_handle_stdin(h->id, p, h->len);
    break;
  case CLA_KILL:
    cl_handle_kill(h->id, p, h->len);
    break;
  case CLA_WRITE:
    cl_handle_write(h->id, p, h->len);
    break;
  case CLA_WDATA:
    cl_handle_wdata(h->id, p, h->len);
    break;
  case CLA_WEND:
    cl_handle_wend(h->id);
    break;
  case CLA_READ:
    cl_handle_read(h->id, p, h->len);
    break;
  case CLA_SHUTDOWN:
    cl_handle_shutdown(h->id, p, h->len);
    break;
  case CLA_CANCEL: {
    job *j = cl_job_find(h->id);
    if (j && j->kind == J_EXEC && !j->exited)
      kill(-j->pid, SIGKILL);
    else if (j)
      cl_job_free(j);
    break;
  }
  default:
    cl_send_error(h->id, ENOSYS, "agent: unknown request type %u", h->type);
    break;
  }
}

/* Reads from the channel and handles every complete frame; returns -1 on EOF or error. */
static int read_channel(void) {
  for (;;) {
    ssize_t n = read(cl_agent.fd, cl_agent.in + cl_agent.in_len, IN_CAP - cl_agent.in_len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    if (n == 0) return -1;
    cl_agent.in_len += (size_t)n;
    size_t off = 0;
    while (cl_agent.in_len - off >= CLA_HEADER) {
      cla_header h;
      if (!cla_header_get(cl_agent.in + off, &h)) {
        /* Not our protocol: whatever the host sent is unusable. Start over at its next write. */
        cl_log("malformed frame from the host, input dropped");
        cl_send_error(0, EPROTO, "agent: malformed frame");
        off = cl_agent.in_len;
        break;
      }
      if (cl_agent.in_len - off < CLA_HEADER + h.len) break;
      handle_frame(&h, cl_agent.in + off + CLA_HEADER);
      off += CLA_HEADER + h.len;
      if (cl_agent.fd < 0) return -1;
    }
    memmove(cl_agent.in, cl_agent.in + off, cl_agent.in_len - off);
    cl_agent.in_len -= off;
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Main loop                                                                                  */

static void on_signals(void) {
  struct signalfd_siginfo si;
  while (read(cl_agent.sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
    if (si.ssi_signo == SIGCHLD) continue; /* reaped below */
    if (cl_agent.pid1 || si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
      cl_power_off(si.ssi_signo == SIGUSR1 ? CLA_ACTION_REBOOT : CLA_ACTION_POWEROFF);
  }
  cl_reap_children();
}

/* Serves the host until the channel closes for good (--fd) or the machine powers off. */
static int serve(void) {
  struct pollfd pf[8 + 3 * CLA_MAX_JOBS + 4];
  job *pjob[8 + 3 * CLA_MAX_JOBS + 4];
  for (;;) {
    int opened = open_channel();
    if (!opened && cl_agent.mode == CH_FD) return 0; /* test mode: the host went away */
    if (cl_agent.shutting_down && cl_agent.out_len == 0) cl_power_off(cl_agent.shutdown_action);
    uint64_t now = cl_now_ms();
    int timeout = -1;
    cl_exec_tick(now, &timeout);
    /* Files being read: one chunk each per turn while the host keeps up. */
    for (job *j = cl_jobs, *next; j; j = next) {
      next = j->next;
      if (j->kind == J_READ && cl_agent.out_len < OUT_HIGH && cl_pump_read(j)) cl_job_free(j);
    }
    if (cl_agent.fd >= 0 && cl_flush_out() < 0) {
      drop_connection();
      continue;
    }
    /* After the flush: a read held back by a full queue goes on as soon as the queue drained
     * (deciding this before the flush left a drained queue and a waiting read: a deadlock). */
    if (cl_agent.out_len < OUT_HIGH)
      for (job *j = cl_jobs; j; j = j->next)
        if (j->kind == J_READ) timeout = 0;
    if (cl_agent.shutting_down && (cl_agent.out_len == 0 || cl_agent.fd < 0))
      cl_power_off(cl_agent.shutdown_action);
    int n = 0;
    if (cl_agent.fd >= 0) {
      pf[n].fd = cl_agent.fd;
      pf[n].events = POLLIN | (cl_agent.out_len ? POLLOUT : 0);
      pjob[n++] = NULL;
    } else if (cl_agent.mode == CH_VSOCK && cl_agent.listen_fd >= 0) {
      pf[n].fd = cl_agent.listen_fd;
      pf[n].events = POLLIN;
      pjob[n++] = NULL;
    } else {
      int ms = (int)(cl_agent.reopen_at > now ? cl_agent.reopen_at - now : 20);
      if (timeout < 0 || ms < timeout) timeout = ms;
    }
    int sig_i = n;
    pf[n].fd = cl_agent.sigfd;
    pf[n].events = POLLIN;
    pjob[n++] = NULL;
    int in_first = n;
    for (int i = 0; i < cl_agent.ninputs; i++) {
      pf[n].fd = cl_agent.inputs[i];
      pf[n].events = POLLIN;
      pjob[n++] = NULL;
    }
    int job_first = n;
    n = cl_exec_poll_fds(pf, pjob, n);
    int r = poll(pf, (nfds_t)n, timeout);
    if (r < 0) {
      if (errno == EINTR) continue;
      cl_log("poll: %s", strerror(errno));
      sleep(1);
      continue;
    }
    if (pf[sig_i].revents) on_signals();
    for (int i = in_first; i < job_first; i++)
      if (pf[i].revents & POLLIN) cl_check_power_button(pf[i].fd);
    for (int i = job_first; i < n; i++) {
      if (pf[i].revents) cl_exec_ready(pjob[i], pf[i].fd);
    }
    if (cl_agent.fd >= 0 && pf[0].fd == cl_agent.fd && pf[0].revents) {
      if ((pf[0].revents & (POLLIN | POLLHUP | POLLERR)) && read_channel() < 0) {
        drop_connection();
        cl_agent.reopen_at = cl_now_ms() + 100;
      }
    }
  }
}

int main(int argc, char **argv) {
  cl_agent.fd = cl_agent.listen_fd = -1;
  cl_agent.mode = CH_SERIAL;
  cl_agent.vsock_port = CLA_VSOCK_PORT;
  cl_agent.pid1 = getpid() == 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
      cl_agent.mode = CH_FD;
      cl_agent.fd = (int)strtol(argv[++i], NULL, 10);
    } else if (strcmp(argv[i], "--vsock") == 0) {
      cl_agent.mode = CH_VSOCK;
    } else if (strcmp(argv[i], "--version") == 0) {
      printf("clawlua-agent protocol %d\n", CLA_VERSION);
      return 0;
    } else {
      fprintf(stderr, "usage: clawlua-agent [--fd N | --vsock | --version]\n");
      return 2;
    }
  }
  cl_agent.in = malloc(IN_CAP);
  if (!cl_agent.in) return 1;
  sigset_t ss;
  sigemptyset(&ss);
  sigaddset(&ss, SIGCHLD);
  sigaddset(&ss, SIGINT);
  sigaddset(&ss, SIGTERM);
  sigaddset(&ss, SIGPWR);
  sigaddset(&ss, SIGUSR1);
  sigprocmask(SIG_BLOCK, &ss, NULL);
  signal(SIGPIPE, SIG_IGN);
  cl_agent.sigfd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
  if (cl_agent.pid1) cl_pid1_setup();
  if (cl_agent.mode == CH_FD) {
    cl_set_nonblock(cl_agent.fd);
    cl_send_ready(CLA_READY, 0);
  }
  cl_log("started (protocol %d, %s channel)", CLA_VERSION,
         cl_agent.mode == CH_FD      ? "fd"
         : cl_agent.mode == CH_VSOCK ? "vsock"
                                     : "virtio-serial");
  return serve();
}
