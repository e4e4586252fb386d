/*
 * clawlua-agent: commands (see agent_int.h). Each runs in its own session with pipes for its
 * output (and stdin when asked), started with vfork semantics; its output goes to the host
 * in frames up to a cap, its stdin comes through a window the agent acknowledges, a timeout
 * kills the whole session, and the exit is reported once its pipes are drained.
 */
#include "agent_int.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define DEFAULT_MAX_OUTPUT ((uint64_t)16 << 20)
#define EXIT_DRAIN_MS      250 /* after the child exits, how long its pipes may stay open */
#define STDIN_BUF_CAP      (CLA_STDIN_WINDOW + CLA_MAX_PAYLOAD)

static const char *const base_env[] = {"PATH=" AGENT_PATH, "HOME=/root", "TERM=linux", NULL};

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

/* An exec request, parsed. */
typedef struct exec_req {
  char *argv[CLA_MAX_ARGS + 1];
  char *envp[CLA_MAX_ARGS + 8];
  const char *cwd;
  uint64_t timeout, max_out, max_err;
  int want_stdin;
  char *strs; /* the strings argv, envp and cwd point into */
} exec_req;

/* Parses an exec request into rq; returns 0 after telling the host what is wrong. */
static int exec_parse(uint32_t id, const unsigned char *p, uint32_t len, exec_req *rq) {
  char **argv = rq->argv, **envp = rq->envp;
  int argc = 0, envc = 0;
  uint64_t v;
  rq->cwd = "/";
  rq->timeout = 0;
  rq->max_out = rq->max_err = DEFAULT_MAX_OUTPUT;
  rq->want_stdin = 0;
  /* Strings are copied: the input buffer moves on before the child uses them. */
  char *strs = rq->strs = malloc((size_t)len + CLA_MAX_ARGS * 2 + 16);
  if (!strs) {
    cl_send_error(id, ENOMEM, "agent: out of memory");
    return 0;
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
        cl_send_error(id, EINVAL, "exec: NUL byte in an argument");
        return 0;
      }
      memcpy(sp, t.val, t.len);
      sp[t.len] = 0;
      sp += t.len + 1;
    }
    switch (t.tag) {
    case CLA_T_ARG:
      if (argc >= CLA_MAX_ARGS) {
        free(strs);
        cl_send_error(id, E2BIG, "exec: more than %d arguments", CLA_MAX_ARGS);
        return 0;
      }
      argv[argc++] = s;
      break;
    case CLA_T_ENV: {
      if (envc >= CLA_MAX_ARGS) {
        free(strs);
        cl_send_error(id, E2BIG, "exec: more than %d environment entries", CLA_MAX_ARGS);
        return 0;
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
      rq->cwd = s;
      break;
    case CLA_T_TIMEOUT_MS:
      if (cla_tlv_u64(&t, &v)) rq->timeout = v;
      break;
    case CLA_T_MAX_OUT:
      if (cla_tlv_u64(&t, &v)) rq->max_out = v;
      break;
    case CLA_T_MAX_ERR:
      if (cla_tlv_u64(&t, &v)) rq->max_err = v;
      break;
    case CLA_T_STDIN:
      if (cla_tlv_u64(&t, &v)) rq->want_stdin = v != 0;
      break;
    default:
      break;
    }
  }
  if (r < 0 || argc == 0) {
    free(strs);
    cl_send_error(id, EINVAL, r < 0 ? "exec: malformed request" : "exec: empty argv");
    return 0;
  }
  argv[argc] = NULL;
  envp[envc] = NULL;
  return 1;
}

void cl_handle_exec(uint32_t id, const unsigned char *p, uint32_t len) {
  exec_req rq = {.strs = NULL}; /* zeroed: cppcheck cannot follow exec_parse filling it */
  if (!exec_parse(id, p, len, &rq)) return;
  char **argv = rq.argv, **envp = rq.envp, *strs = rq.strs;
  const char *cwd = rq.cwd;
  int want_stdin = rq.want_stdin;
  job *j = cl_job_new(J_EXEC, id);
  if (!j) {
    free(strs);
    return;
  }
  int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1}, px[2] = {-1, -1};
  if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || pipe2(px, O_CLOEXEC) < 0 ||
      (want_stdin && pipe2(pi, O_CLOEXEC) < 0)) {
    int e = errno;
    for (int i = 0; i < 2; i++) {
      cl_close_fd(&po[i]);
      cl_close_fd(&pe[i]);
      cl_close_fd(&pi[i]);
      cl_close_fd(&px[i]);
    }
    free(strs);
    cl_job_free(j);
    cl_send_error(id, e, "exec: pipe: %s", strerror(e));
    return;
  }
  /* vfork semantics (the child borrows our memory until exec): no page tables to copy, no
   * copy-on-write faults afterwards, which under TCG makes a command markedly cheaper. */
  exec_args ea = {argv, envp, cwd, want_stdin ? pi[0] : -1, po[1], pe[1], px[1]};
  pid_t pid = (pid_t)clone(exec_child, child_stack + sizeof child_stack,
                           CLONE_VM | CLONE_VFORK | SIGCHLD, &ea);
  int fork_err = errno;
  cl_close_fd(&po[1]);
  cl_close_fd(&pe[1]);
  cl_close_fd(&pi[0]);
  cl_close_fd(&px[1]);
  if (pid < 0) {
    cl_close_fd(&po[0]);
    cl_close_fd(&pe[0]);
    cl_close_fd(&pi[1]);
    cl_close_fd(&px[0]);
    free(strs);
    cl_job_free(j);
    cl_send_error(id, fork_err, "exec: fork: %s", strerror(fork_err));
    return;
  }
  /* Exec closes px: EOF means the program runs. */
  char msg[64];
  ssize_t n;
  do n = read(px[0], msg, sizeof msg - 1);
  while (n < 0 && errno == EINTR);
  cl_close_fd(&px[0]);
  if (n > 0) {
    msg[n] = 0;
    int e = (int)strtol(msg, NULL, 10);
    const char *stage = strchr(msg, ' ') ? strchr(msg, ' ') + 1 : "exec";
    waitpid(pid, NULL, 0);
    cl_close_fd(&po[0]);
    cl_close_fd(&pe[0]);
    cl_close_fd(&pi[1]);
    if (strcmp(stage, "chdir") == 0)
      cl_send_error(id, e, "exec %s: cwd %s: %s", argv[0], cwd, strerror(e));
    else
      cl_send_error(id, e, "exec %s: %s", argv[0], strerror(e));
    free(strs);
    cl_job_free(j);
    return;
  }
  free(strs);
  j->pid = pid;
  j->out_fd = po[0];
  j->err_fd = pe[0];
  j->in_fd = pi[1];
  cl_set_nonblock(j->out_fd);
  cl_set_nonblock(j->err_fd);
  if (j->in_fd >= 0) cl_set_nonblock(j->in_fd);
  j->max_out = rq.max_out;
  j->max_err = rq.max_err;
  j->deadline = rq.timeout ? cl_now_ms() + rq.timeout : 0;
  tlvbuf tb = {.n = 0};
  cl_tlv_u64(&tb, CLA_T_PID, (uint64_t)pid);
  cl_send_frame(CLA_STARTED, id, tb.b, tb.n);
}

static void ack_stdin(job *j, int force) {
  if (j->in_unacked == 0) return;
  if (!force && j->in_unacked < CLA_STDIN_WINDOW / 4) return;
  tlvbuf t = {.n = 0};
  cl_tlv_u64(&t, CLA_T_SIZE, j->in_unacked);
  cl_send_frame(CLA_STDIN_ACK, j->id, t.b, t.n);
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
      cl_close_fd(&j->in_fd);
      break;
    }
    memmove(j->in_buf, j->in_buf + n, j->in_len - (size_t)n);
    j->in_len -= (size_t)n;
    j->in_unacked += (uint64_t)n;
  }
  if (j->in_eof && j->in_len == 0) cl_close_fd(&j->in_fd);
  ack_stdin(j, j->in_len == 0);
}

void cl_handle_stdin(uint32_t id, const unsigned char *p, uint32_t len) {
  job *j = cl_job_find(id);
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
    cl_log("request %u: stdin beyond the window, dropped", id);
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

void cl_handle_kill(uint32_t id, const unsigned char *p, uint32_t len) {
  job *j = cl_job_find(id);
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
    if (n < 0) return errno == EAGAIN ? 0 : (cl_close_fd(fd), 1);
    if (n == 0) {
      cl_close_fd(fd);
      return 1;
    }
    uint64_t room = *count < max ? max - *count : 0;
    size_t keep = (uint64_t)n > room ? (size_t)room : (size_t)n;
    if (keep < (size_t)n) *trunc = 1;
    if (keep) cl_send_frame(type, j->id, buf, keep);
    *count += (uint64_t)n;
    if (cl_agent.out_len >= OUT_HIGH) return 0;
  }
  return 0;
}

static void finish_exec(job *j) {
  tlvbuf t = {.n = 0};
  if (WIFSIGNALED(j->status))
    cl_tlv_u64(&t, CLA_T_SIGNAL, (uint64_t)WTERMSIG(j->status));
  else
    cl_tlv_u64(&t, CLA_T_CODE, (uint64_t)WEXITSTATUS(j->status));
  uint64_t flags = (j->timed_out ? CLA_F_TIMED_OUT : 0) | (j->out_trunc ? CLA_F_OUT_TRUNCATED : 0) |
                   (j->err_trunc ? CLA_F_ERR_TRUNCATED : 0);
  cl_tlv_u64(&t, CLA_T_FLAGS, flags);
  cl_tlv_u64(&t, CLA_T_OUT_BYTES, j->out_n);
  cl_tlv_u64(&t, CLA_T_ERR_BYTES, j->err_n);
  ack_stdin(j, 1);
  cl_send_frame(CLA_EXIT, j->id, t.b, t.n);
  cl_job_free(j);
}

/* Called for every exit the kernel reports. PID 1 adopts orphans, so most are not ours. */
void cl_reap_children(void) {
  for (;;) {
    int st;
    pid_t pid = waitpid(-1, &st, WNOHANG);
    if (pid <= 0) {
      if (pid < 0 && errno == EINTR) continue;
      return;
    }
    for (job *j = cl_jobs; j; j = j->next)
      if (j->kind == J_EXEC && j->pid == pid && !j->exited) {
        j->exited = 1;
        j->status = st;
        j->exited_at = cl_now_ms();
      }
  }
}

void cl_exec_tick(uint64_t now, int *timeout) {
  for (job *j = cl_jobs, *next; j; j = next) {
    next = j->next;
    if (j->kind != J_EXEC) continue;
    if (j->deadline && !j->exited && now >= j->deadline && !j->timed_out) {
      j->timed_out = 1;
      kill(-j->pid, SIGKILL);
    }
    if (j->exited && (j->out_fd >= 0 || j->err_fd >= 0) && now >= j->exited_at + EXIT_DRAIN_MS) {
      /* A background process holds the pipes open: the command itself is over. */
      cl_close_fd(&j->out_fd);
      cl_close_fd(&j->err_fd);
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
      if (*timeout < 0 || ms < *timeout) *timeout = ms;
    }
  }
}

int cl_exec_poll_fds(struct pollfd *pf, job **pjob, int n) {
  for (job *j = cl_jobs; j; j = j->next) {
    if (j->kind != J_EXEC) continue;
    if (cl_agent.out_len < OUT_HIGH) {
      if (j->out_fd >= 0) pf[n].fd = j->out_fd, pf[n].events = POLLIN, pjob[n++] = j;
      if (j->err_fd >= 0) pf[n].fd = j->err_fd, pf[n].events = POLLIN, pjob[n++] = j;
    }
    if (j->in_fd >= 0 && j->in_len > 0) pf[n].fd = j->in_fd, pf[n].events = POLLOUT, pjob[n++] = j;
  }
  return n;
}

void cl_exec_ready(job *j, int fd) {
  if (fd == j->out_fd)
    drain_pipe(j, &j->out_fd, CLA_STDOUT, &j->out_n, j->max_out, &j->out_trunc);
  else if (fd == j->err_fd)
    drain_pipe(j, &j->err_fd, CLA_STDERR, &j->err_n, j->max_err, &j->err_trunc);
  else if (fd == j->in_fd)
    pump_stdin(j);
}
