/*
 * Shared by the harnesses of the host's VM parsers (runtime/vm/input.h): one vm handle with no
 * VMM, no fds and no loop, whose audit records go to the fuzz Lua state, and the way a harness
 * cuts its input into the reads a socket could have returned.
 */
#ifndef CLAWLUA_FUZZ_VM_H
#define CLAWLUA_FUZZ_VM_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_lua_state.h"
#include "vm/input.h"

static inline vm *fz_vm(void) {
  static vm *v;
  if (v) return v;
  v = calloc(1, sizeof *v);
  if (!v) fz_abort("calloc", "out of memory");
  v->L = fz_state();
  /* audit records of protocol violations fill a ring: a small one is full after a few inputs,
   * so an input frees (evicts) as much as it allocates and the per-input leak check stays rare */
  if (luaL_dostring(v->L, "claw.audit.configure{capacity = 4}") != LUA_OK)
    fz_abort("audit.configure", lua_tostring(v->L, -1));
  v->qmpfd = v->vsock_fd = v->pidfd = v->logfd = v->tapfd = v->snapshot_fd = -1;
  cl_chan_init(&v->chan);
  snprintf(v->id, sizeof v->id, "fuzz");
  v->state = VS_STARTING;
  v->channel = CH_VSOCK;
  return v;
}

/* Read sizes: the first input byte seeds them (1..64 bytes, or everything at once when 0). */
typedef struct fz_cuts {
  uint32_t seed;
  int whole;
} fz_cuts;

static inline fz_cuts fz_cuts_of(const uint8_t **data, size_t *size) {
  fz_cuts c = {1, 1};
  if (*size) {
    c.seed = (uint32_t)(*data)[0] * 2654435761u + 1;
    c.whole = (*data)[0] == 0;
    (*data)++;
    (*size)--;
  }
  return c;
}

static inline size_t fz_cut(fz_cuts *c, size_t left) {
  if (c->whole) return left;
  c->seed = c->seed * 1103515245u + 12345u;
  size_t n = 1 + (c->seed >> 16) % 64;
  return n < left ? n : left;
}

#endif
