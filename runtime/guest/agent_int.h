/*
 * clawlua-agent's private header: the state, the job table and the frame-writing layer shared
 * by the agent's files (protocol in proto.h; what the agent does in agent.c).
 *
 * Calls flow one way, top to bottom:
 *
 *   agent.c   main, the poll() loop, the channel (open, read, drop) and the frame dispatcher
 *      |  calls
 *      v
 *   exec.c    commands: spawn, stdin window, output pipes, timeouts, kills, reaping
 *   file.c    file transfer: atomic writes, chunked reads
 *   pid1.c    PID 1's set-up (mounts, modules, network, power button) and power-off
 *      |  call only
 *      v
 *   job.c     the table of requests in progress (one per id)
 *   frame.c   the output queue, frames, TLV building, logs, clocks
 *
 * No file calls one above it or beside it; agent.c is the only one that calls the concerns.
 */
#ifndef CLAWLUA_AGENT_INT_H
#define CLAWLUA_AGENT_INT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "proto.h"

#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define OUT_HIGH (1u << 20) /* stop producing data above this much queued output */
/* The guest's PATH: the base environment of every command and the agent's own. */
#define AGENT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum { CH_SERIAL, CH_VSOCK, CH_FD };

struct cl_agent_state {
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
};

extern struct cl_agent_state cl_agent;

/* ---- frame.c: logs, clocks, the output queue and frames ----------------------------------- */

typedef struct tlvbuf {
  unsigned char b[4096];
  size_t n;
} tlvbuf;

void cl_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint64_t cl_now_ms(void);
void cl_set_nonblock(int fd);
void cl_close_fd(int *fd);
void cl_send_frame(uint16_t type, uint32_t id, const void *payload, size_t len);
void cl_tlv_bytes(tlvbuf *t, uint16_t tag, const void *v, size_t len);
void cl_tlv_str(tlvbuf *t, uint16_t tag, const char *s);
void cl_tlv_u64(tlvbuf *t, uint16_t tag, uint64_t v);
void cl_send_error(uint32_t id, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void cl_send_ready(uint16_t type, uint32_t id);
int cl_flush_out(void); /* writes queued output; -1 when the channel broke */

/* ---- job.c: requests in progress: running commands, files being written or read ----------- */

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

extern job *cl_jobs;

job *cl_job_find(uint32_t id);
job *cl_job_new(int kind, uint32_t id); /* NULL after telling the host why */
void cl_job_free(job *j);

/* ---- exec.c -------------------------------------------------------------------------------- */

void cl_handle_exec(uint32_t id, const unsigned char *p, uint32_t len);
void cl_handle_stdin(uint32_t id, const unsigned char *p, uint32_t len);
void cl_handle_kill(uint32_t id, const unsigned char *p, uint32_t len);
/* One turn of the loop: deadlines, finished commands; lowers *timeout to the next wake-up. */
void cl_exec_tick(uint64_t now, int *timeout);
/* Adds the pipes to poll to pf/pjob from index n; returns the new count. */
int cl_exec_poll_fds(struct pollfd *pf, job **pjob, int n);
void cl_exec_ready(job *j, int fd); /* fd of j is ready */
void cl_reap_children(void);        /* every exit the kernel reports */

/* ---- file.c -------------------------------------------------------------------------------- */

void cl_handle_write(uint32_t id, const unsigned char *p, uint32_t len);
void cl_handle_wdata(uint32_t id, const unsigned char *p, uint32_t len);
void cl_handle_wend(uint32_t id);
void cl_handle_read(uint32_t id, const unsigned char *p, uint32_t len);
int cl_pump_read(job *j); /* sends the next chunk; 1 when the job is finished */

/* ---- pid1.c -------------------------------------------------------------------------------- */

void cl_pid1_setup(void);
void cl_check_power_button(int fd);
void cl_handle_shutdown(uint32_t id, const unsigned char *p, uint32_t len);
void cl_power_off(int action);

#endif
