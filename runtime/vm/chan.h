/*
 * What channel.c (the agent channel: frames, requests) shares with guest.c (its Lua methods:
 * exec, write_file, read_file, ping). Nothing else includes it.
 */
#ifndef CLAWLUA_VM_CHAN_H
#define CLAWLUA_VM_CHAN_H

#include "vm.h"

#include "../guest/proto.h"

#define REQ_MT "clawlua.vm.request"
#define IN_CAP (CLA_HEADER + CLA_MAX_PAYLOAD)
/* Writers wait while this much is queued for the guest; past STREAM_HIGH of streamed output
 * queued for callbacks, the channel stops reading. */
#define OUT_HIGH           ((size_t)512 << 10)
#define STREAM_HIGH        ((size_t)1 << 20)
#define DEFAULT_MAX_OUTPUT ((uint64_t)16 << 20)
#define DEFAULT_MAX_READ   ((uint64_t)64 << 20)
#define MAX_FILE           ((uint64_t)1 << 40)
#define EXEC_GRACE         10.0 /* seconds the host waits past a command's timeout for the agent */

enum { R_EXEC = 1, R_WRITE, R_READ, R_PING, R_SHUTDOWN };

typedef struct bbuf {
  char *p;
  size_t len, cap;
} bbuf;

typedef struct chunk {
  struct chunk *next;
  int err; /* stderr */
  size_t len;
  char data[];
} chunk;

struct vm_req {
  vm_req *next;
  vm *v; /* NULL once the request is unlinked */
  uint32_t id;
  int kind;
  int done, failed;
  int code; /* errno-style code of a failure */
  char error[512];
  cl_wait *w;
  uint64_t t0;
  /* exec */
  int started, exit_code, exit_signal;
  uint64_t flags, guest_pid;
  bbuf out, err;
  uint64_t out_total, err_total, max_out, max_err;
  int trunc_out, trunc_err;
  int streaming;
  chunk *qhead, *qtail;
  size_t queued;
  const char *in_data;
  size_t in_len, in_sent;
  uint64_t in_acked;
  int in_eof_sent;
  int want_write;
  /* write */
  int oks;
  const char *wdata;
  size_t wlen, wsent;
  int wend_sent;
  /* read */
  int rinfo;
  uint64_t rsize, rmax, rmode;
  bbuf data;
};

/* A request finished with an error (wakes its caller). */
void cl_chan_req_fail(vm_req *r, int code, const char *msg);
void cl_chan_unthrottle(vm *v);
void cl_chan_req_release(vm_req *r);
int cl_chan_req_gc(lua_State *L);
vm_req *cl_chan_new_req(lua_State *L, vm *v, int kind);
int cl_chan_unavailable(lua_State *L, vm *v, const char *what);
int cl_chan_req_failed(lua_State *L, vm_req *r);
int cl_chan_req_wait(lua_State *L, vm_req *r, cl_wait *w, lua_KFunction k, lua_KContext ctx);

#endif
