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
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "proto.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <linux/reboot.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define OUT_HIGH           (1u << 20) /* stop producing data above this much queued output */
#define IN_CAP             (CLA_HEADER + CLA_MAX_PAYLOAD)
#define DEFAULT_MAX_OUTPUT ((uint64_t)16 << 20)
#define DEFAULT_MAX_READ   ((uint64_t)64 << 20)
#define EXIT_DRAIN_MS      250 /* after the child exits, how long its pipes may stay open */
#define STDIN_BUF_CAP      (CLA_STDIN_WINDOW + CLA_MAX_PAYLOAD)

static const char *const base_env[] = {
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=linux",
    NULL};

enum { CH_SERIAL, CH_VSOCK, CH_FD };

static struct {
  int pid1;
  int mode;
  int fd;        /* the channel; -1 while (re)opening */
  int listen_fd; /* vsock */
  int sigfd;
  int inputs[8];
  int ninputs;
  unsigned char *in;
  size_t in_len;
  unsigned char *out;
  size_t out_off, out_len, out_cap;
  uint64_t reopen_at; /* ms: next attempt to open the port */
  int shutting_down;
  int shutdown_action;
  uint32_t shutdown_id;
  uint32_t vsock_port;
} g;

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...) {
  char buf[512] = "clawlua-agent: ";
  size_t pre = strlen(buf);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf + pre, sizeof buf - pre - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  size_t len = pre + (size_t)n;
  if (len > sizeof buf - 2) len = sizeof buf - 2;
  buf[len++] = '\n';
  if (write(2, buf, len) < 0) return; /* the console is gone: nothing to tell */
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t uptime_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ------------------------------------------------------------------------------------------ */
/* Output queue and frames                                                                    */

static int out_reserve(size_t n) {
  if (g.out_off > 0 && g.out_off + g.out_len + n > g.out_cap) {
    memmove(g.out, g.out + g.out_off, g.out_len);
    g.out_off = 0;
  }
  if (g.out_len + n <= g.out_cap) return 1;
  size_t cap = g.out_cap ? g.out_cap : 65536;
  while (cap < g.out_len + n) cap *= 2;
  unsigned char *p = realloc(g.out, cap);
  if (!p) return 0;
  g.out = p;
  g.out_cap = cap;
  return 1;
}

static void send_frame(uint16_t type, uint32_t id, const void *payload, size_t len) {
  if (g.fd < 0) return; /* nobody to tell: the host reconnects and asks again */
  if (len > CLA_MAX_PAYLOAD || !out_reserve(CLA_HEADER + len)) {
    logf_("cannot queue a frame of %zu bytes", len);
    return;
  }
  unsigned char *p = g.out + g.out_off + g.out_len;
  cla_header_put(p, type, id, (uint32_t)len);
  if (len) memcpy(p + CLA_HEADER, payload, len);
  g.out_len += CLA_HEADER + len;
}

typedef struct tlvbuf {
  unsigned char b[4096];
  size_t n;
} tlvbuf;

static void tlv_bytes(tlvbuf *t, uint16_t tag, const void *v, size_t len) {
  if (len > sizeof t->b - 6 - t->n)
    len = sizeof t->b - 6 - t->n; /* messages are cut, never overflow */
  cla_put16(t->b + t->n, tag);
  cla_put32(t->b + t->n + 2, (uint32_t)len);
  memcpy(t->b + t->n + 6, v, len);
  t->n += 6 + len;
}

static void tlv_str(tlvbuf *t, uint16_t tag, const char *s) {
  tlv_bytes(t, tag, s, strlen(s));
}

static void tlv_u64(tlvbuf *t, uint16_t tag, uint64_t v) {
  unsigned char b[8];
  cla_put64(b, v);
  tlv_bytes(t, tag, b, 8);
}

static void send_error(uint32_t id, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void send_error(uint32_t id, int err, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  tlvbuf t = {.n = 0};
  tlv_u64(&t, CLA_T_ERRNO, (uint64_t)(unsigned)err);
  tlv_str(&t, CLA_T_MESSAGE, msg);
  send_frame(CLA_ERROR, id, t.b, t.n);
}

static void send_ready(uint16_t type, uint32_t id) {
  tlvbuf t = {.n = 0};
  tlv_u64(&t, CLA_T_VERSION, CLA_VERSION);
  struct utsname u;
  if (uname(&u) == 0) {
    char s[400];
    snprintf(s, sizeof s, "%s %s %s %s", u.sysname, u.release, u.version, u.machine);
    tlv_str(&t, CLA_T_UNAME, s);
  }
  tlv_u64(&t, CLA_T_UPTIME_MS, uptime_ms());
  tlv_u64(&t, CLA_T_PID, (uint64_t)getpid());
  send_frame(type, id, t.b, t.n);
}

/* Writes queued output; returns -1 when the channel broke. */
static int flush_out(void) {
  while (g.out_len > 0 && g.fd >= 0) {
    ssize_t n = write(g.fd, g.out + g.out_off, g.out_len);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return 0;
      return -1;
    }
    g.out_off += (size_t)n;
    g.out_len -= (size_t)n;
  }
  if (g.out_len == 0) g.out_off = 0;
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Jobs: running commands, files being written, files being read                             */

enum { J_EXEC, J_WRITE, J_READ };

typedef struct job {
  int kind;
  uint32_t id;
  struct job *next;
  /* exec */
  pid_t pid;
  int out_fd, err_fd, in_fd;
  uint64_t out_n, err_n, max_out, max_err;
  int out_trunc, err_trunc;
  uint64_t deadline; /* ms, 0: none */
  int timed_out, exited, status;
  uint64_t exited_at;
  unsigned char *in_buf;
  size_t in_len;
  int in_eof; /* the host closed stdin: close the pipe once drained */
  uint64_t in_unacked;
  /* write / read */
  int fd;
  char *path, *tmp;
  uint64_t size, done, max;
  int error;
  char errmsg[256];
} job;

static job *jobs;
static int njobs;

static job *job_find(uint32_t id) {
  for (job *j = jobs; j; j = j->next)
    if (j->id == id) return j;
  return NULL;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static void job_free(job *j) {
  for (job **p = &jobs; *p; p = &(*p)->next)
    if (*p == j) {
      *p = j->next;
      break;
    }
  njobs--;
  close_fd(&j->out_fd);
  close_fd(&j->err_fd);
  close_fd(&j->in_fd);
  close_fd(&j->fd);
  if (j->tmp) unlink(j->tmp);
  free(j->tmp);
  free(j->path);
  free(j->in_buf);
  free(j);
}

static job *job_new(int kind, uint32_t id) {
  if (njobs >= CLA_MAX_JOBS) {
    send_error(id, EAGAIN, "agent: more than %d requests in progress", CLA_MAX_JOBS);
    return NULL;
  }
  if (job_find(id)) {
    send_error(id, EEXIST, "agent: request id %u is in use", id);
    return NULL;
  }
  job *j = calloc(1, sizeof *j);
  if (!j) {
    send_error(id, ENOMEM, "agent: out of memory");
    return NULL;
  }
  j->kind = kind;
  j->id = id;
  j->out_fd = j->err_fd = j->in_fd = j->fd = -1;
  j->next = jobs;
  jobs = j;
  njobs++;
  return j;
}

/* Looks a program up in PATH (from envp) the way execvp does. */
static void exec_search(const char *file, char *const argv[], char *const envp[]) {
  if (strchr(file, '/')) {
    execve(file, argv, envp);
    return;
  }
  const char *path = "/usr/sbin:/usr/bin:/sbin:/bin";
  for (char *const *e = envp; *e; e++)
    if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
  int err = ENOENT;
  char buf[4096];
  for (const char *p = path; *p;) {
    const char *c = strchr(p, ':');
    size_t dl = c ? (size_t)(c - p) : strlen(p);
    if (dl > 0 && dl + strlen(file) + 2 < sizeof buf) {
      snprintf(buf, sizeof buf, "%.*s/%s", (int)dl, p, file);
      execve(buf, argv, envp);
      if (errno == EACCES)
        err = EACCES;
      else if (errno != ENOENT && errno != ENOTDIR)
        err = errno;
    }
    if (!c) break;
    p = c + 1;
  }
  errno = err;
}

typedef struct exec_args {
  char **argv, **envp;
  const char *cwd;
  int in, out, err, report;
} exec_args;

static char child_stack[64 * 1024] __attribute__((aligned(16)));

/* The child, on child_stack and our memory until it execs: system calls only. */
static int exec_child(void *arg) {
  exec_args *a = arg;
  /* Its own session (a kill reaches everything it starts), default signals and mask. */
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(SIGPIPE, &dfl, NULL);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  setsid();
  int in = a->in >= 0 ? a->in : open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (in < 0 || dup2(in, 0) < 0 || dup2(a->out, 1) < 0 || dup2(a->err, 2) < 0) _exit(127);
  const char *stage = "chdir";
  if (chdir(a->cwd) == 0) {
    stage = "exec";
    exec_search(a->argv[0], a->argv, a->envp);
  }
  int e = errno;
  char msg[64];
  int n = snprintf(msg, sizeof msg, "%d %s", e, stage);
  if (write(a->report, msg, (size_t)n) < 0) _exit(126);
  _exit(127);
}

static void handle_exec(uint32_t id, const unsigned char *p, uint32_t len) {
  char *argv[CLA_MAX_ARGS + 1];
  char *envp[CLA_MAX_ARGS + 8];
  int argc = 0, envc = 0, want_stdin = 0;
  const char *cwd = "/";
  char *cwd_buf = NULL;
  uint64_t timeout = 0, max_out = DEFAULT_MAX_OUTPUT, max_err = DEFAULT_MAX_OUTPUT, v;
  /* Strings are copied: the input buffer moves on before the child uses them. */
  char *strs = malloc((size_t)len + CLA_MAX_ARGS * 2 + 16);
  if (!strs) {
    send_error(id, ENOMEM, "agent: out of memory");
    return;
  }
  char *sp = strs;
  for (const char *const *e = base_env; *e; e++) envp[envc++] = (char *)*e;
  int base_envc = envc;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  int r;
  while ((r = cla_tlv_next(&t)) > 0) {
    char *s = sp;
    if (t.tag == CLA_T_ARG || t.tag == CLA_T_ENV || t.tag == CLA_T_CWD) {
      if (memchr(t.val, 0, t.len)) {
        free(strs);
        send_error(id, EINVAL, "exec: NUL byte in an argument");
        return;
      }
      memcpy(sp, t.val, t.len);
      sp[t.len] = 0;
      sp += t.len + 1;
    }
    switch (t.tag) {
    case CLA_T_ARG:
      if (argc >= CLA_MAX_ARGS) {
        free(strs);
        send_error(id, E2BIG, "exec: more than %d arguments", CLA_MAX_ARGS);
        return;
      }
      argv[argc++] = s;
      break;
    case CLA_T_ENV: {
      if (envc >= CLA_MAX_ARGS) {
        free(strs);
        send_error(id, E2BIG, "exec: more than %d environment entries", CLA_MAX_ARGS);
        return;
      }
      /* Replaces a base entry with the same name. */
      char *eq = strchr(s, '=');
      size_t kl = eq ? (size_t)(eq - s) : strlen(s);
      int replaced = 0;
      for (int i = 0; i < base_envc; i++)
        if (strncmp(envp[i], s, kl) == 0 && envp[i][kl] == '=') {
          envp[i] = s;
          replaced = 1;
        }
      if (!replaced) envp[envc++] = s;
      break;
    }
    case CLA_T_ENV_CLEAR: /* before any ENV: drops the base entries */
      envc = base_envc = 0;
      break;
    case CLA_T_CWD:
      cwd = cwd_buf = s;
      break;
    case CLA_T_TIMEOUT_MS:
      if (cla_tlv_u64(&t, &v)) timeout = v;
      break;
    case CLA_T_MAX_OUT:
      if (cla_tlv_u64(&t, &v)) max_out = v;
      break;
    case CLA_T_MAX_ERR:
      if (cla_tlv_u64(&t, &v)) max_err = v;
      break;
    case CLA_T_STDIN:
      if (cla_tlv_u64(&t, &v)) want_stdin = v != 0;
      break;
    default:
      break;
    }
  }
  (void)cwd_buf;
  if (r < 0 || argc == 0) {
    free(strs);
    send_error(id, EINVAL, r < 0 ? "exec: malformed request" : "exec: empty argv");
    return;
  }
  argv[argc] = NULL;
  envp[envc] = NULL;
  job *j = job_new(J_EXEC, id);
  if (!j) {
    free(strs);
    return;
  }
  int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1}, px[2] = {-1, -1};
  if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || pipe2(px, O_CLOEXEC) < 0 ||
      (want_stdin && pipe2(pi, O_CLOEXEC) < 0)) {
    int e = errno;
    for (int i = 0; i < 2; i++) {
      close_fd(&po[i]);
      close_fd(&pe[i]);
      close_fd(&pi[i]);
      close_fd(&px[i]);
    }
    free(strs);
    job_free(j);
    send_error(id, e, "exec: pipe: %s", strerror(e));
    return;
  }
  /* vfork semantics (the child borrows our memory until exec): no page tables to copy, no
   * copy-on-write faults afterwards, which under TCG makes a command markedly cheaper. */
  exec_args ea = {argv, envp, cwd, want_stdin ? pi[0] : -1, po[1], pe[1], px[1]};
  pid_t pid = (pid_t)clone(exec_child, child_stack + sizeof child_stack,
                           CLONE_VM | CLONE_VFORK | SIGCHLD, &ea);
  int fork_err = errno;
  close_fd(&po[1]);
  close_fd(&pe[1]);
  close_fd(&pi[0]);
  close_fd(&px[1]);
  if (pid < 0) {
    close_fd(&po[0]);
    close_fd(&pe[0]);
    close_fd(&pi[1]);
    close_fd(&px[0]);
    free(strs);
    job_free(j);
    send_error(id, fork_err, "exec: fork: %s", strerror(fork_err));
    return;
  }
  /* Exec closes px: EOF means the program runs. */
  char msg[64];
  ssize_t n;
  do n = read(px[0], msg, sizeof msg - 1);
  while (n < 0 && errno == EINTR);
  close_fd(&px[0]);
  if (n > 0) {
    msg[n] = 0;
    int e = (int)strtol(msg, NULL, 10);
    const char *stage = strchr(msg, ' ') ? strchr(msg, ' ') + 1 : "exec";
    waitpid(pid, NULL, 0);
    close_fd(&po[0]);
    close_fd(&pe[0]);
    close_fd(&pi[1]);
    if (strcmp(stage, "chdir") == 0)
      send_error(id, e, "exec %s: cwd %s: %s", argv[0], cwd, strerror(e));
    else
      send_error(id, e, "exec %s: %s", argv[0], strerror(e));
    free(strs);
    job_free(j);
    return;
  }
  free(strs);
  j->pid = pid;
  j->out_fd = po[0];
  j->err_fd = pe[0];
  j->in_fd = pi[1];
  set_nonblock(j->out_fd);
  set_nonblock(j->err_fd);
  if (j->in_fd >= 0) set_nonblock(j->in_fd);
  j->max_out = max_out;
  j->max_err = max_err;
  j->deadline = timeout ? now_ms() + timeout : 0;
  tlvbuf tb = {.n = 0};
  tlv_u64(&tb, CLA_T_PID, (uint64_t)pid);
  send_frame(CLA_STARTED, id, tb.b, tb.n);
}

static void ack_stdin(job *j, int force) {
  if (j->in_unacked == 0) return;
  if (!force && j->in_unacked < CLA_STDIN_WINDOW / 4) return;
  tlvbuf t = {.n = 0};
  tlv_u64(&t, CLA_T_SIZE, j->in_unacked);
  send_frame(CLA_STDIN_ACK, j->id, t.b, t.n);
  j->in_unacked = 0;
}

/* Moves buffered stdin into the pipe. */
static void pump_stdin(job *j) {
  while (j->in_fd >= 0 && j->in_len > 0) {
    ssize_t n = write(j->in_fd, j->in_buf, j->in_len);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      /* The program closed its stdin: what the host still sends is dropped (and acknowledged,
       * so the host never stalls on a window that cannot open). */
      j->in_unacked += j->in_len;
      j->in_len = 0;
      close_fd(&j->in_fd);
      break;
    }
    memmove(j->in_buf, j->in_buf + n, j->in_len - (size_t)n);
    j->in_len -= (size_t)n;
    j->in_unacked += (uint64_t)n;
  }
  if (j->in_eof && j->in_len == 0) close_fd(&j->in_fd);
  ack_stdin(j, j->in_len == 0);
}

static void handle_stdin(uint32_t id, const unsigned char *p, uint32_t len) {
  job *j = job_find(id);
  if (!j || j->kind != J_EXEC) return; /* finished already: late data is dropped */
  if (len == 0) {
    j->in_eof = 1;
    pump_stdin(j);
    return;
  }
  if (j->in_fd < 0) {
    j->in_unacked += len;
    ack_stdin(j, 1);
    return;
  }
  if (j->in_len + len > STDIN_BUF_CAP) { /* the host ignored the window */
    logf_("request %u: stdin beyond the window, dropped", id);
    j->in_unacked += len;
    ack_stdin(j, 1);
    return;
  }
  unsigned char *nb = realloc(j->in_buf, j->in_len + len);
  if (!nb) return;
  j->in_buf = nb;
  memcpy(j->in_buf + j->in_len, p, len);
  j->in_len += len;
  pump_stdin(j);
}

static void handle_kill(uint32_t id, const unsigned char *p, uint32_t len) {
  job *j = job_find(id);
  uint64_t sig = SIGKILL;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  while (cla_tlv_next(&t) > 0)
    if (t.tag == CLA_T_SIGNAL) cla_tlv_u64(&t, &sig);
  if (!j || j->kind != J_EXEC || j->exited || sig == 0 || sig >= 65) return;
  if (kill(-j->pid, (int)sig) < 0) kill(j->pid, (int)sig);
}

/* Reads what a child wrote; returns 1 at EOF. */
static int drain_pipe(job *j, int *fd, uint16_t type, uint64_t *count, uint64_t max, int *trunc) {
  static unsigned char buf[CLA_CHUNK];
  for (int rounds = 0; rounds < 4; rounds++) {
    ssize_t n = read(*fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == EAGAIN ? 0 : (close_fd(fd), 1);
    if (n == 0) {
      close_fd(fd);
      return 1;
    }
    uint64_t room = *count < max ? max - *count : 0;
    size_t keep = (uint64_t)n > room ? (size_t)room : (size_t)n;
    if (keep < (size_t)n) *trunc = 1;
    if (keep) send_frame(type, j->id, buf, keep);
    *count += (uint64_t)n;
    if (g.out_len >= OUT_HIGH) return 0;
  }
  return 0;
}

static void finish_exec(job *j) {
  tlvbuf t = {.n = 0};
  if (WIFSIGNALED(j->status))
    tlv_u64(&t, CLA_T_SIGNAL, (uint64_t)WTERMSIG(j->status));
  else
    tlv_u64(&t, CLA_T_CODE, (uint64_t)WEXITSTATUS(j->status));
  uint64_t flags = (j->timed_out ? CLA_F_TIMED_OUT : 0) | (j->out_trunc ? CLA_F_OUT_TRUNCATED : 0) |
                   (j->err_trunc ? CLA_F_ERR_TRUNCATED : 0);
  tlv_u64(&t, CLA_T_FLAGS, flags);
  tlv_u64(&t, CLA_T_OUT_BYTES, j->out_n);
  tlv_u64(&t, CLA_T_ERR_BYTES, j->err_n);
  ack_stdin(j, 1);
  send_frame(CLA_EXIT, j->id, t.b, t.n);
  job_free(j);
}

/* Called for every exit the kernel reports. PID 1 adopts orphans, so most are not ours. */
static void reap_children(void) {
  for (;;) {
    int st;
    pid_t pid = waitpid(-1, &st, WNOHANG);
    if (pid <= 0) {
      if (pid < 0 && errno == EINTR) continue;
      return;
    }
    for (job *j = jobs; j; j = j->next)
      if (j->kind == J_EXEC && j->pid == pid && !j->exited) {
        j->exited = 1;
        j->status = st;
        j->exited_at = now_ms();
      }
  }
}

static void handle_write(uint32_t id, const unsigned char *p, uint32_t len) {
  const unsigned char *path = NULL;
  uint32_t plen = 0;
  uint64_t mode = 0644, size = UINT64_MAX, v;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  int r;
  while ((r = cla_tlv_next(&t)) > 0) {
    if (t.tag == CLA_T_PATH)
      path = t.val, plen = t.len;
    else if (t.tag == CLA_T_MODE && cla_tlv_u64(&t, &v))
      mode = v & 07777;
    else if (t.tag == CLA_T_SIZE && cla_tlv_u64(&t, &v))
      size = v;
  }
  if (r < 0 || !path || plen == 0 || plen >= 4096 || memchr(path, 0, plen) || path[0] != '/') {
    send_error(id, EINVAL, "write: an absolute path is required");
    return;
  }
  job *j = job_new(J_WRITE, id);
  if (!j) return;
  j->path = strndup((const char *)path, plen);
  const char *slash = j->path ? strrchr(j->path, '/') : NULL;
  if (!j->path || !slash || !slash[1]) {
    send_error(id, EINVAL, "write %s: not a file path", j->path ? j->path : "?");
    job_free(j);
    return;
  }
  /* A temporary name in the same directory, renamed over the target at the end: readers never
   * see a partial file. */
  if (asprintf(&j->tmp, "%.*s/.%s.clawlua-%u", (int)(slash - j->path), j->path, slash + 1, id) <
      0) {
    j->tmp = NULL;
    send_error(id, ENOMEM, "write: out of memory");
    job_free(j);
    return;
  }
  j->fd = open(j->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)mode);
  if (j->fd < 0) {
    int e = errno;
    free(j->tmp);
    j->tmp = NULL;
    send_error(id, e, "write %s: %s", j->path, strerror(e));
    job_free(j);
    return;
  }
  fchmod(j->fd, (mode_t)mode); /* the umask must not narrow the mode asked for */
  j->size = size;
  send_frame(CLA_OK, id, NULL, 0);
}

static void handle_wdata(uint32_t id, const unsigned char *p, uint32_t len) {
  job *j = job_find(id);
  if (!j || j->kind != J_WRITE || j->error) return;
  if (j->done + len > j->size) {
    j->error = EFBIG;
    snprintf(j->errmsg, sizeof j->errmsg, "more data than the %llu bytes announced",
             (unsigned long long)j->size);
    return;
  }
  while (len > 0) {
    ssize_t n = write(j->fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      j->error = errno;
      snprintf(j->errmsg, sizeof j->errmsg, "%s", strerror(errno));
      return;
    }
    p += n;
    len -= (uint32_t)n;
    j->done += (uint64_t)n;
  }
}

static void handle_wend(uint32_t id) {
  job *j = job_find(id);
  if (!j || j->kind != J_WRITE) return;
  if (!j->error && j->size != UINT64_MAX && j->done != j->size) {
    j->error = EIO;
    snprintf(j->errmsg, sizeof j->errmsg, "%llu of %llu bytes arrived", (unsigned long long)j->done,
             (unsigned long long)j->size);
  }
  if (!j->error && fsync(j->fd) < 0) {
    j->error = errno;
    snprintf(j->errmsg, sizeof j->errmsg, "fsync: %s", strerror(errno));
  }
  if (!j->error && rename(j->tmp, j->path) < 0) {
    j->error = errno;
    snprintf(j->errmsg, sizeof j->errmsg, "rename: %s", strerror(errno));
  }
  if (j->error) {
    send_error(id, j->error, "write %s: %s", j->path, j->errmsg);
  } else {
    free(j->tmp); /* renamed: nothing to remove */
    j->tmp = NULL;
    tlvbuf t = {.n = 0};
    tlv_u64(&t, CLA_T_SIZE, j->done);
    send_frame(CLA_OK, id, t.b, t.n);
  }
  job_free(j);
}

static void handle_read(uint32_t id, const unsigned char *p, uint32_t len) {
  const unsigned char *path = NULL;
  uint32_t plen = 0;
  uint64_t max = DEFAULT_MAX_READ, v;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  int r;
  while ((r = cla_tlv_next(&t)) > 0) {
    if (t.tag == CLA_T_PATH)
      path = t.val, plen = t.len;
    else if (t.tag == CLA_T_MAX && cla_tlv_u64(&t, &v))
      max = v;
  }
  if (r < 0 || !path || plen == 0 || plen >= 4096 || memchr(path, 0, plen)) {
    send_error(id, EINVAL, "read: a path is required");
    return;
  }
  char pbuf[4096];
  memcpy(pbuf, path, plen);
  pbuf[plen] = 0;
  int fd = open(pbuf, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) < 0) {
    int e = errno;
    if (fd >= 0) close(fd);
    send_error(id, e, "read %s: %s", pbuf, strerror(e));
    return;
  }
  if (S_ISDIR(st.st_mode)) {
    close(fd);
    send_error(id, EISDIR, "read %s: %s", pbuf, strerror(EISDIR));
    return;
  }
  if (S_ISREG(st.st_mode) && (uint64_t)st.st_size > max) {
    close(fd);
    send_error(id, EFBIG, "read %s: the file has %llu bytes, more than the limit of %llu", pbuf,
               (unsigned long long)st.st_size, (unsigned long long)max);
    return;
  }
  job *j = job_new(J_READ, id);
  if (!j) {
    close(fd);
    return;
  }
  j->fd = fd;
  j->max = max;
  j->path = strdup(pbuf);
  tlvbuf tb = {.n = 0};
  tlv_u64(&tb, CLA_T_SIZE, S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0);
  tlv_u64(&tb, CLA_T_MODE, st.st_mode & 07777);
  send_frame(CLA_RINFO, id, tb.b, tb.n);
}

/* Sends the next chunk of a file being read; returns 1 when the job is finished. */
static int pump_read(job *j) {
  static unsigned char buf[CLA_CHUNK];
  ssize_t n;
  do n = read(j->fd, buf, sizeof buf);
  while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EAGAIN) return 0;
  if (n < 0) {
    send_error(j->id, errno, "read %s: %s", j->path ? j->path : "?", strerror(errno));
    return 1;
  }
  if (n == 0) {
    send_frame(CLA_REND, j->id, NULL, 0);
    return 1;
  }
  if (j->done + (uint64_t)n > j->max) { /* it grew while we read it */
    send_error(j->id, EFBIG, "read %s: more than the limit of %llu bytes", j->path ? j->path : "?",
               (unsigned long long)j->max);
    return 1;
  }
  j->done += (uint64_t)n;
  send_frame(CLA_RDATA, j->id, buf, (size_t)n);
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Power                                                                                      */

static void power_off(int action) {
  logf_("%s", action == CLA_ACTION_REBOOT ? "rebooting" : "powering off");
  /* Not PID 1 (--fd on a host): the exit status tells whoever runs it what the guest did. */
  if (!g.pid1) exit(action == CLA_ACTION_REBOOT ? 101 : 100);
  sync();
  kill(-1, SIGTERM);
  uint64_t until = now_ms() + 300;
  while (now_ms() < until) {
    if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD) break;
    usleep(10000);
  }
  kill(-1, SIGKILL);
  sync();
  umount2("/mnt/root", MNT_DETACH);
  reboot(action == CLA_ACTION_REBOOT ? LINUX_REBOOT_CMD_RESTART : LINUX_REBOOT_CMD_POWER_OFF);
  _exit(0); /* PID 1 exiting panics the kernel: with panic=1 that too ends the VM */
}

static void handle_shutdown(uint32_t id, const unsigned char *p, uint32_t len) {
  uint64_t action = CLA_ACTION_POWEROFF;
  cla_tlv t;
  cla_tlv_init(&t, p, len);
  while (cla_tlv_next(&t) > 0)
    if (t.tag == CLA_T_ACTION) cla_tlv_u64(&t, &action);
  send_frame(CLA_OK, id, NULL, 0);
  g.shutting_down = 1;
  g.shutdown_action = action == CLA_ACTION_REBOOT ? CLA_ACTION_REBOOT : CLA_ACTION_POWEROFF;
  g.shutdown_id = id;
}

/* ------------------------------------------------------------------------------------------ */
/* The channel                                                                                */

static void drop_connection(void) {
  /* The host that asked is gone: what it started is stopped, half-written files removed. */
  while (jobs) {
    if (jobs->kind == J_EXEC && !jobs->exited) kill(-jobs->pid, SIGKILL);
    job_free(jobs);
  }
  close_fd(&g.fd);
  g.in_len = 0;
  g.out_len = g.out_off = 0;
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
  if (g.fd >= 0) return 1;
  if (g.mode == CH_FD) return 0;
  if (g.mode == CH_VSOCK) {
    if (g.listen_fd < 0) {
      g.listen_fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      if (g.listen_fd < 0) return 0;
      struct sockaddr_vm a;
      memset(&a, 0, sizeof a);
      a.svm_family = AF_VSOCK;
      a.svm_cid = VMADDR_CID_ANY;
      a.svm_port = g.vsock_port;
      if (bind(g.listen_fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(g.listen_fd, 4) < 0) {
        logf_("vsock port %u: %s", g.vsock_port, strerror(errno));
        close_fd(&g.listen_fd);
        return 0;
      }
    }
    int c = accept4(g.listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c < 0) return 0;
    g.fd = c;
    send_ready(CLA_READY, 0);
    return 1;
  }
  uint64_t now = now_ms();
  if (now < g.reopen_at) return 0;
  g.reopen_at = now + 20;
  char dev[300];
  if (!find_port(dev, sizeof dev)) return 0;
  int fd = open(dev, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    g.reopen_at = now + 100;
    return 0;
  }
  g.fd = fd;
  send_ready(CLA_READY, 0);
  return 1;
}

static void handle_frame(const cla_header *h, const unsigned char *p) {
  switch (h->type) {
  case CLA_PING:
    send_ready(CLA_PONG, h->id);
    break;
  case CLA_EXEC:
    handle_exec(h->id, p, h->len);
    break;
  case CLA_STDIN:
    handle_stdin(h->id, p, h->len);
    break;
  case CLA_KILL:
    handle_kill(h->id, p, h->len);
    break;
  case CLA_WRITE:
    handle_write(h->id, p, h->len);
    break;
  case CLA_WDATA:
    handle_wdata(h->id, p, h->len);
    break;
  case CLA_WEND:
    handle_wend(h->id);
    break;
  case CLA_READ:
    handle_read(h->id, p, h->len);
    break;
  case CLA_SHUTDOWN:
    handle_shutdown(h->id, p, h->len);
    break;
  case CLA_CANCEL: {
    job *j = job_find(h->id);
    if (j && j->kind == J_EXEC && !j->exited)
      kill(-j->pid, SIGKILL);
    else if (j)
      job_free(j);
    break;
  }
  default:
    send_error(h->id, ENOSYS, "agent: unknown request type %u", h->type);
    break;
  }
}

/* Reads from the channel and handles every complete frame; returns -1 on EOF or error. */
static int read_channel(void) {
  for (;;) {
    ssize_t n = read(g.fd, g.in + g.in_len, IN_CAP - g.in_len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    if (n == 0) return -1;
    g.in_len += (size_t)n;
    size_t off = 0;
    while (g.in_len - off >= CLA_HEADER) {
      cla_header h;
      if (!cla_header_get(g.in + off, &h)) {
        /* Not our protocol: whatever the host sent is unusable. Start over at its next write. */
        logf_("malformed frame from the host, input dropped");
        send_error(0, EPROTO, "agent: malformed frame");
        off = g.in_len;
        break;
      }
      if (g.in_len - off < CLA_HEADER + h.len) break;
      handle_frame(&h, g.in + off + CLA_HEADER);
      off += CLA_HEADER + h.len;
      if (g.fd < 0) return -1;
    }
    memmove(g.in, g.in + off, g.in_len - off);
    g.in_len -= off;
  }
}

/* ------------------------------------------------------------------------------------------ */
/* PID 1 set-up                                                                               */

static void mount_fs(const char *src, const char *dst, const char *type, unsigned long fl,
                     const char *data) {
  mkdir(dst, 0755);
  if (mount(src, dst, type, fl, data) < 0 && errno != EBUSY)
    logf_("mount %s on %s: %s", type, dst, strerror(errno));
}

static void load_modules(const char *list) {
  FILE *f = fopen(list, "re");
  if (!f) return;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    line[strcspn(line, "\r\n")] = 0;
    if (!line[0] || line[0] == '#') continue;
    int fd = open(line, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      logf_("module %s: %s", line, strerror(errno));
      continue;
    }
    if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
      logf_("module %s: %s", line, strerror(errno));
    close(fd);
  }
  fclose(f);
}

static void open_inputs(void) {
  DIR *d = opendir("/dev/input");
  if (!d) return;
  struct dirent *de;
  while ((de = readdir(d)) && g.ninputs < (int)(sizeof g.inputs / sizeof g.inputs[0])) {
    if (strncmp(de->d_name, "event", 5) != 0) continue;
    char p[300];
    snprintf(p, sizeof p, "/dev/input/%s", de->d_name);
    int fd = open(p, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) g.inputs[g.ninputs++] = fd;
  }
  closedir(d);
}

static void lo_up(void) {
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strcpy(ifr.ifr_name, "lo");
  if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags |= IFF_UP;
    ioctl(s, SIOCSIFFLAGS, &ifr);
  }
  close(s);
}

/* The sandbox network from `clawlua.net=ADDR/LEN,GATEWAY,DNS` on the kernel command line
 * (clawlua.sandbox.net): eth0 gets the address and comes up, the default route goes through
 * the gateway, /etc/resolv.conf names DNS (the host's forwarder, the guest's only resolver),
 * and IPv6 is turned off on eth0 (the sandbox network is IPv4 only). */
static int set_addr(int s, const char *ifname, unsigned long req, in_addr_t a) {
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
  struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
  sin->sin_family = AF_INET;
  sin->sin_addr.s_addr = a;
  return ioctl(s, req, &ifr);
}

static void configure_net(const char *spec) {
  char buf[256], *addr = buf, *slash, *gw, *dns, *end;
  struct in_addr a, g4, d;
  snprintf(buf, sizeof buf, "%s", spec);
  slash = strchr(buf, '/');
  gw = slash ? strchr(slash, ',') : NULL;
  dns = gw ? strchr(gw + 1, ',') : NULL;
  if (!dns) {
    logf_("clawlua.net=%s: expected ADDRESS/LEN,GATEWAY,DNS", spec);
    return;
  }
  *slash = *gw++ = *dns++ = 0;
  errno = 0;
  unsigned long len = strtoul(slash + 1, &end, 10);
  if (errno || *end || end == slash + 1 || len < 1 || len > 32 ||
      inet_pton(AF_INET, addr, &a) != 1 || inet_pton(AF_INET, gw, &g4) != 1 ||
      inet_pton(AF_INET, dns, &d) != 1) {
    logf_("clawlua.net=%s: expected ADDRESS/LEN,GATEWAY,DNS", spec);
    return;
  }
  int fd = open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", O_WRONLY | O_CLOEXEC);
  if (fd >= 0) {
    if (write(fd, "1\n", 2) < 0) logf_("eth0: disable_ipv6: %s", strerror(errno));
    close(fd);
  }
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return;
  /* virtio_net probes its device while the module loads; allow a moment all the same */
  int tries = 0;
  while (set_addr(s, "eth0", SIOCSIFADDR, a.s_addr) < 0) {
    if (errno != ENODEV || ++tries > 100) {
      logf_("eth0: address %s: %s", addr, strerror(errno));
      close(s);
      return;
    }
    usleep(10000);
  }
  if (set_addr(s, "eth0", SIOCSIFNETMASK, htonl(len == 32 ? 0xffffffffu : ~(0xffffffffu >> len))) <
      0)
    logf_("eth0: netmask /%lu: %s", len, strerror(errno));
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strcpy(ifr.ifr_name, "eth0");
  if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) logf_("eth0: up: %s", strerror(errno));
  }
  struct rtentry rt;
  memset(&rt, 0, sizeof rt);
  ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
  ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
  struct sockaddr_in *gwa = (struct sockaddr_in *)&rt.rt_gateway;
  gwa->sin_family = AF_INET;
  gwa->sin_addr = g4;
  rt.rt_flags = RTF_UP | RTF_GATEWAY;
  rt.rt_dev = (char *)"eth0";
  if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
    logf_("default route via %s: %s", gw, strerror(errno));
  close(s);
  mkdir("/etc", 0755);
  FILE *f = fopen("/etc/resolv.conf", "we");
  if (!f) {
    logf_("/etc/resolv.conf: %s", strerror(errno));
    return;
  }
  fprintf(f, "nameserver %s\noptions attempts:2 timeout:2\n", dns);
  fclose(f);
}

/* Reads clawlua.* options from the kernel command line. */
static void read_cmdline(char *root, size_t rootlen, char *net, size_t netlen) {
  char buf[4096];
  int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return;
  buf[n] = 0;
  for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) {
    if (strcmp(tok, "clawlua.channel=vsock") == 0)
      g.mode = CH_VSOCK;
    else if (strcmp(tok, "clawlua.channel=serial") == 0)
      g.mode = CH_SERIAL;
    else if (strncmp(tok, "clawlua.vsock_port=", 19) == 0)
      g.vsock_port = (uint32_t)strtoul(tok + 19, NULL, 10);
    else if (strncmp(tok, "clawlua.root=", 13) == 0)
      snprintf(root, rootlen, "%s", tok + 13);
    else if (strncmp(tok, "clawlua.net=", 12) == 0)
      snprintf(net, netlen, "%s", tok + 12);
  }
}

static void pid1_setup(void) {
  mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  int c = open("/dev/console", O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (c >= 0) {
    for (int i = 0; i < 3; i++) dup2(c, i);
    if (c > 2) close(c);
  }
  mount_fs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
  mount_fs("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mount_fs("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mount_fs("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  sethostname("clawlua", 7);
  lo_up();
  load_modules("/etc/clawlua/modules");
  char root[256] = "", net[256] = "";
  read_cmdline(root, sizeof root, net, sizeof net);
  if (net[0]) configure_net(net);
  if (g.mode == CH_VSOCK) load_modules("/etc/clawlua/modules.vsock");
  if (root[0]) {
    load_modules("/etc/clawlua/modules.ext4"); /* a disk for files: mounted on /mnt/root */
    mkdir("/mnt", 0755);
    mkdir("/mnt/root", 0755);
    if (mount(root, "/mnt/root", "ext4", 0, NULL) < 0 &&
        ((errno != EROFS && errno != EACCES) ||
         mount(root, "/mnt/root", "ext4", MS_RDONLY, NULL) < 0))
      logf_("mount %s: %s", root, strerror(errno));
  }
  open_inputs();
  /* Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) becomes SIGINT to PID 1 instead of a reset. */
  reboot(LINUX_REBOOT_CMD_CAD_OFF);
  umask(022);
  setenv("PATH", base_env[0] + 5, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Main loop                                                                                  */

static void check_power_button(int fd) {
  struct input_event ev[16];
  ssize_t n;
  while ((n = read(fd, ev, sizeof ev)) > 0)
    for (size_t i = 0; i < (size_t)n / sizeof ev[0]; i++)
      if (ev[i].type == EV_KEY && ev[i].code == KEY_POWER && ev[i].value == 1)
        power_off(CLA_ACTION_POWEROFF);
}

static void on_signals(void) {
  struct signalfd_siginfo si;
  while (read(g.sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
    if (si.ssi_signo == SIGCHLD) continue; /* reaped below */
    if (g.pid1 || si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
      power_off(si.ssi_signo == SIGUSR1 ? CLA_ACTION_REBOOT : CLA_ACTION_POWEROFF);
  }
  reap_children();
}

int main(int argc, char **argv) {
  g.fd = g.listen_fd = -1;
  g.mode = CH_SERIAL;
  g.vsock_port = CLA_VSOCK_PORT;
  g.pid1 = getpid() == 1;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
      g.mode = CH_FD;
      g.fd = (int)strtol(argv[++i], NULL, 10);
    } else if (strcmp(argv[i], "--vsock") == 0) {
      g.mode = CH_VSOCK;
    } else if (strcmp(argv[i], "--version") == 0) {
      printf("clawlua-agent protocol %d\n", CLA_VERSION);
      return 0;
    } else {
      fprintf(stderr, "usage: clawlua-agent [--fd N | --vsock | --version]\n");
      return 2;
    }
  }
  g.in = malloc(IN_CAP);
  if (!g.in) return 1;
  sigset_t ss;
  sigemptyset(&ss);
  sigaddset(&ss, SIGCHLD);
  sigaddset(&ss, SIGINT);
  sigaddset(&ss, SIGTERM);
  sigaddset(&ss, SIGPWR);
  sigaddset(&ss, SIGUSR1);
  sigprocmask(SIG_BLOCK, &ss, NULL);
  signal(SIGPIPE, SIG_IGN);
  g.sigfd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
  if (g.pid1) pid1_setup();
  if (g.mode == CH_FD) {
    set_nonblock(g.fd);
    send_ready(CLA_READY, 0);
  }
  logf_("started (protocol %d, %s channel)", CLA_VERSION,
        g.mode == CH_FD      ? "fd"
        : g.mode == CH_VSOCK ? "vsock"
                             : "virtio-serial");

  struct pollfd pf[8 + 3 * CLA_MAX_JOBS + 4];
  job *pjob[8 + 3 * CLA_MAX_JOBS + 4];
  for (;;) {
    int opened = open_channel();
    if (!opened && g.mode == CH_FD) return 0; /* test mode: the host went away */
    if (g.shutting_down && g.out_len == 0) power_off(g.shutdown_action);
    uint64_t now = now_ms();
    int timeout = -1;
    /* Exec jobs: deadlines, finished ones, pipes. */
    for (job *j = jobs, *next; j; j = next) {
      next = j->next;
      if (j->kind != J_EXEC) continue;
      if (j->deadline && !j->exited && now >= j->deadline && !j->timed_out) {
        j->timed_out = 1;
        kill(-j->pid, SIGKILL);
      }
      if (j->exited && (j->out_fd >= 0 || j->err_fd >= 0) && now >= j->exited_at + EXIT_DRAIN_MS) {
        /* A background process holds the pipes open: the command itself is over. */
        close_fd(&j->out_fd);
        close_fd(&j->err_fd);
      }
      if (j->exited && j->out_fd < 0 && j->err_fd < 0) {
        finish_exec(j);
        continue;
      }
      uint64_t wake = 0;
      if (j->deadline && !j->exited && !j->timed_out) wake = j->deadline;
      if (j->exited) wake = j->exited_at + EXIT_DRAIN_MS;
      if (wake) {
        int ms = wake > now ? (int)(wake - now) : 0;
        if (timeout < 0 || ms < timeout) timeout = ms;
      }
    }
    /* Files being read: one chunk each per turn while the host keeps up. */
    for (job *j = jobs, *next; j; j = next) {
      next = j->next;
      if (j->kind == J_READ && g.out_len < OUT_HIGH && pump_read(j)) job_free(j);
    }
    if (g.fd >= 0 && flush_out() < 0) {
      drop_connection();
      continue;
    }
    /* After the flush: a read held back by a full queue goes on as soon as the queue drained
     * (deciding this before the flush left a drained queue and a waiting read: a deadlock). */
    if (g.out_len < OUT_HIGH)
      for (job *j = jobs; j; j = j->next)
        if (j->kind == J_READ) timeout = 0;
    if (g.shutting_down && (g.out_len == 0 || g.fd < 0)) power_off(g.shutdown_action);
    int n = 0;
    if (g.fd >= 0) {
      pf[n].fd = g.fd;
      pf[n].events = POLLIN | (g.out_len ? POLLOUT : 0);
      pjob[n++] = NULL;
    } else if (g.mode == CH_VSOCK && g.listen_fd >= 0) {
      pf[n].fd = g.listen_fd;
      pf[n].events = POLLIN;
      pjob[n++] = NULL;
    } else {
      int ms = (int)(g.reopen_at > now ? g.reopen_at - now : 20);
      if (timeout < 0 || ms < timeout) timeout = ms;
    }
    int sig_i = n;
    pf[n].fd = g.sigfd;
    pf[n].events = POLLIN;
    pjob[n++] = NULL;
    int in_first = n;
    for (int i = 0; i < g.ninputs; i++) {
      pf[n].fd = g.inputs[i];
      pf[n].events = POLLIN;
      pjob[n++] = NULL;
    }
    int job_first = n;
    for (job *j = jobs; j; j = j->next) {
      if (j->kind != J_EXEC) continue;
      if (g.out_len < OUT_HIGH) {
        if (j->out_fd >= 0) pf[n].fd = j->out_fd, pf[n].events = POLLIN, pjob[n++] = j;
        if (j->err_fd >= 0) pf[n].fd = j->err_fd, pf[n].events = POLLIN, pjob[n++] = j;
      }
      if (j->in_fd >= 0 && j->in_len > 0)
        pf[n].fd = j->in_fd, pf[n].events = POLLOUT, pjob[n++] = j;
    }
    int r = poll(pf, (nfds_t)n, timeout);
    if (r < 0) {
      if (errno == EINTR) continue;
      logf_("poll: %s", strerror(errno));
      sleep(1);
      continue;
    }
    if (pf[sig_i].revents) on_signals();
    for (int i = in_first; i < job_first; i++)
      if (pf[i].revents & POLLIN) check_power_button(pf[i].fd);
    for (int i = job_first; i < n; i++) {
      job *j = pjob[i];
      if (!pf[i].revents) continue;
      if (pf[i].fd == j->out_fd)
        drain_pipe(j, &j->out_fd, CLA_STDOUT, &j->out_n, j->max_out, &j->out_trunc);
      else if (pf[i].fd == j->err_fd)
        drain_pipe(j, &j->err_fd, CLA_STDERR, &j->err_n, j->max_err, &j->err_trunc);
      else if (pf[i].fd == j->in_fd)
        pump_stdin(j);
    }
    if (g.fd >= 0 && pf[0].fd == g.fd && pf[0].revents) {
      if ((pf[0].revents & (POLLIN | POLLHUP | POLLERR)) && read_channel() < 0) {
        drop_connection();
        g.reopen_at = now_ms() + 100;
      }
    }
  }
}
