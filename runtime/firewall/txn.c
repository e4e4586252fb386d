/*
 * Running a firewall transaction from a Lua call: the batch is owned by a userdata (tbox) so an
 * error or a cancelled call frees it, the call waits on the loop for the kernel's answer, and
 * op_done applies what the kernel accepted to the registry (vms.c).
 */
#include "fw.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libmnl/libmnl.h>
#include <libnftnl/chain.h>
#include <libnftnl/expr.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>
#include <libnftnl/udata.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>

/* ------------------------------------------------------------------------------------------ */
/* Operations: a transaction plus what to do with the registry once the kernel answered       */

typedef struct op_ctx {
  int kind;
  fw_vm **vms; /* attach: new VMs; update: the replacement; detach: keys in vms[i]->key */
  size_t n;
} op_ctx;

static void ctx_free(fw *f, op_ctx *c) {
  if (!c) return;
  for (size_t i = 0; i < c->n; i++) cl_fw_vm_free(f, c->vms[i]);
  free(c->vms);
  free(c);
}

static void op_done(fw *f, fw_txn *t) {
  op_ctx *c = t->ctx;
  t->ctx = NULL;
  if (!c) return;
  if (!t->err) {
    for (size_t i = 0; i < c->n; i++) {
      fw_vm *v = c->vms[i];
      fw_vm *old = cl_fw_find_key(f, v->key);
      switch (c->kind) {
      case OP_ATTACH:
        if (cl_fw_reg_insert(f, v) == 0) {
          c->vms[i] = NULL;
          cl_fw_refresh_start(f, v);
        }
        break;
      case OP_UPDATE:
        if (old) {
          cl_fw_reg_remove(f, old);
          cl_fw_vm_free(f, old);
        }
        if (cl_fw_reg_insert(f, v) == 0) {
          c->vms[i] = NULL;
          cl_fw_refresh_start(f, v);
        }
        break;
      case OP_DETACH:
        if (old) {
          cl_fw_reg_remove(f, old);
          cl_fw_vm_free(f, old);
        }
        break;
      default:
        break;
      }
    }
    if (c->kind == OP_DESTROY) {
      for (size_t b = 0; b < f->nbuckets; b++) {
        fw_vm *v = f->bykey[b];
        f->bykey[b] = f->byif[b] = NULL;
        while (v) {
          fw_vm *next = v->next_key;
          cl_fw_vm_free(f, v);
          v = next;
        }
      }
      f->nvms = 0;
    }
  }
  ctx_free(f, c);
}

/* The transaction of a Lua call lives in a userdata on its stack: whatever happens to the call
 * (error, cancellation, collection), the transaction is freed or handed to the firewall. */
static const char TBOX_MT[] = "clawlua.firewall.txn";

static int tbox_gc(lua_State *L) {
  tbox *b = lua_touserdata(L, 1);
  if (b->t) {
    if (b->t->sent && !b->t->done) {
      b->t->orphan = 1; /* the firewall frees it when the kernel has answered */
      b->t->waiter = NULL;
      b->t->on_msg = NULL; /* a dump's accumulator lived on the caller's stack */
    } else {
      if (!b->t->sent && b->t->ctx) {
        /* never submitted: nobody else will run its completion */
        ctx_free(NULL, b->t->ctx);
        b->t->ctx = NULL;
      }
      cl_fw_txn_free(b->t);
    }
    b->t = NULL;
  }
  return 0;
}

tbox *cl_fw_push_tbox(lua_State *L, fw_txn *t) {
  tbox *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->t = t;
  luaL_setmetatable(L, TBOX_MT);
  return b;
}

static void on_abort(cl_wait *w) {
  fw_txn *t = w->data;
  if (t) {
    t->waiter = NULL;
    t->on_msg = NULL;
  }
}

/* Submits the transaction in the tbox at stack index bidx and waits for the kernel's answer;
 * then continues in k. */
int cl_fw_run_txn(lua_State *L, fw *f, int bidx, lua_KFunction k) {
  tbox *b = lua_touserdata(L, bidx);
  cl_fw_submit(f, b->t);
  if (b->t->done) return k(L, LUA_OK, 0);
  cl_wait *w = cl_wait_push(L);
  w->external = 1;
  w->data = b->t;
  w->on_abort = on_abort;
  b->t->waiter = w;
  return cl_wait_suspend(L, w, k, lua_gettop(L));
}

/* In a continuation: the tbox is the first userdata of type TBOX_MT above the arguments. */
fw_txn *cl_fw_resumed_txn(lua_State *L, lua_KContext ctx, int bidx) {
  if (ctx) cl_wait_resumed(L, ctx);
  tbox *b = lua_touserdata(L, bidx);
  return b->t;
}

int cl_fw_txn_result(lua_State *L, fw *f, fw_txn *t, const char *op, const char *id) {
  if (f->closed && !t->done) return cl_failf(L, ECANCELED, "firewall: %s: firewall closed", op);
  if (t->err) {
    if (id) return cl_failf(L, t->err, "firewall: %s '%s': %s", op, id, t->errmsg);
    return cl_failf(L, t->err, "firewall: %s: %s", op, t->errmsg);
  }
  lua_pushboolean(L, 1);
  return 1;
}

fw_txn *cl_fw_new_batch(lua_State *L, fw *f, int kind) {
  fw_txn *t = cl_fw_txn_new(0);
  op_ctx *c = calloc(1, sizeof *c);
  if (!t || !c || cl_fw_txn_begin(f, t) != 0) {
    free(c);
    cl_fw_txn_free(t);
    cl_fw_oom(L);
  }
  c->kind = kind;
  t->ctx = c;
  t->on_done = op_done;
  cl_fw_push_tbox(L, t);
  return t;
}

void cl_fw_ctx_add(lua_State *L, fw_txn *t, fw_vm *v) {
  op_ctx *c = t->ctx;
  fw_vm **n = realloc(c->vms, (c->n + 1) * sizeof(void *));
  if (!n) {
    cl_fw_vm_free(NULL, v);
    cl_fw_oom(L);
  }
  c->vms = n;
  c->vms[c->n++] = v;
}

void cl_fw_finish_batch(lua_State *L, fw *f, fw_txn *t, int err) {
  if (!err) err = cl_fw_txn_finish(f, t);
  if (err) luaL_error(L, "firewall: cannot build the batch: %s", strerror(err));
}

/* ------------------------------------------------------------------------------------------ */

void cl_fw_txn_register(lua_State *L) {
  static const cl_class cls = {TBOX_MT, NULL, tbox_gc, NULL};
  cl_class_register(L, &cls);
}
