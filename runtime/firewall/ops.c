/*
 * The Lua methods that change the kernel's ruleset: fw:attach, fw:update, fw:attach_many,
 * fw:detach, fw:detach_many, fw:reconcile. Each is one batch (netlink.c) built by ruleset.c; the
 * registry (vms.c) changes only once the kernel accepted it. Domain names are resolved first.
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

/* Resolution of domain names before a batch                                                  */

typedef struct resolving {
  fw *f;
  int left;
  cl_wait *w;
  struct slot {
    struct resolving *r;
    fw_host *h;
    const char *vm;
  } * slots;
  size_t n;
} resolving;
static const char RBOX_MT[] = "clawlua.firewall.resolving";

static void resolved_one(fw *f, void *arg, const char *name, const fw_addr *addrs, size_t n,
                         uint32_t ttl, const char *err) {
  struct slot *s = arg;
  if (err)
    snprintf(s->h->err, sizeof s->h->err, "%s", err);
  else
    cl_fw_set_host_addrs(s->h, addrs, n, ttl);
  cl_fw_emit_resolve(f, s->vm, name, s->h->addrs, s->h->naddrs, err ? 0 : ttl, err, 1);
  resolving *r = s->r;
  s->r = NULL;
  if (--r->left == 0 && r->w) {
    cl_wait *w = r->w;
    r->w = NULL;
    cl_wait_wake(w, 0);
  }
}

static int rbox_gc(lua_State *L) {
  resolving *r = lua_touserdata(L, 1);
  for (size_t i = 0; i < r->n; i++)
    if (r->slots[i].r && r->f && !r->f->closed && r->f->dns) cl_fw_dns_cancel(r->f, &r->slots[i]);
  free(r->slots);
  r->slots = NULL;
  r->n = 0;
  return 0;
}

static void r_abort(cl_wait *w) {
  resolving *r = w->data;
  r->w = NULL;
}

/* Starts the resolution of every domain name of the plans (pushes a box) and returns the
 * number of names. */
static int resolve_plans(lua_State *L, fw *f, fw_plan **plans, const char **ids, size_t nplans) {
  resolving *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  r->f = f;
  luaL_setmetatable(L, RBOX_MT);
  size_t total = 0;
  for (size_t i = 0; i < nplans; i++)
    for (size_t e = 0; e < plans[i]->nentries; e++) total += plans[i]->entries[e].nhosts;
  if (!total) return 0;
  if (!f->dns) luaL_error(L, "firewall: domain names need resolvers (none configured)");
  r->slots = calloc(total, sizeof *r->slots);
  if (!r->slots) cl_fw_oom(L);
  for (size_t i = 0; i < nplans; i++) {
    for (size_t e = 0; e < plans[i]->nentries; e++) {
      fw_entry *en = &plans[i]->entries[e];
      for (size_t h = 0; h < en->nhosts; h++) {
        struct slot *s = &r->slots[r->n];
        s->r = r;
        s->h = &en->hosts[h];
        s->vm = ids[i];
        if (cl_fw_dns_query(f, en->hosts[h].name, resolved_one, s) != 0) {
          snprintf(s->h->err, sizeof s->h->err, "cannot send the query");
          s->r = NULL;
        } else {
          r->left++;
        }
        r->n++;
      }
    }
  }
  return (int)total;
}

/* ------------------------------------------------------------------------------------------ */
/* attach / update                                                                            */

/* Stack of l_attach: 1 fw, 2 id, 3 spec, 4 plan box, 5 resolving box, 6 tbox, [7 wait] */
static int attach_done_k(lua_State *L, int status, lua_KContext ctx) {
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = cl_fw_resumed_txn(L, ctx, 6);
  const char *id = lua_tostring(L, 2);
  int update = lua_toboolean(L, lua_upvalueindex(1));
  int n = cl_fw_txn_result(L, f, t, update ? "update" : "attach", id);
  if (n == 1 && !f->closed) {
    lua_createtable(L, 0, 1);
    lua_getfield(L, 3, "iface");
    lua_setfield(L, -2, "iface");
    cl_audit_emit(L, update ? "fw.update" : "fw.attach", id, 0, lua_gettop(L));
    lua_pop(L, 1);
  }
  return n;
}

static int attach_build_k(lua_State *L, int status, lua_KContext ctx) {
  if (ctx) cl_wait_resumed(L, ctx);
  lua_settop(L, 5);
  fw *f = lua_touserdata(L, 1);
  if (f->closed) return cl_failf(L, ECANCELED, "firewall: attach: firewall closed");
  const char *id = lua_tostring(L, 2);
  int update = lua_toboolean(L, lua_upvalueindex(1));
  pbox *box = lua_touserdata(L, 4);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(id, key, base);
  fw_vm *old = cl_fw_find_key(f, key);
  /* Re-checked after the resolution wait: another task may have changed the registry. */
  if (!update && old) luaL_argerror(L, 2, lua_pushfstring(L, "vm '%s' is already attached", id));
  if (update && !old) luaL_argerror(L, 2, lua_pushfstring(L, "vm '%s' is not attached", id));
  fw_vm *other = cl_fw_find_iface(f, box->p->iface);
  if (other && other != old) {
    const char *msg =
        lua_pushfstring(L, "interface '%s' is used by vm '%s'", box->p->iface, other->id);
    cl_field_error(L, "iface", msg);
  }
  fw_txn *t = cl_fw_new_batch(L, f, update ? OP_UPDATE : OP_ATTACH);
  fw_vm *v = cl_fw_vm_new(id);
  if (!v) cl_fw_oom(L);
  cl_fw_ctx_add(L, t, v);
  v->plan = box->p;
  box->p = NULL;
  snprintf(v->iface, sizeof v->iface, "%s", v->plan->iface);
  v->gen = old ? old->gen + 1 : 0;
  if (cl_fw_vm_plan_sets(v) != 0) cl_fw_oom(L);
  cl_fw_finish_batch(L, f, t, cl_fw_build_attach(f, t, v, v->plan, update, old));
  return cl_fw_run_txn(L, f, 6, attach_done_k);
}

static int attach_common(lua_State *L) {
  fw *f = cl_fw_check(L);
  const char *id = cl_fw_check_id(L, 2);
  int update = lua_toboolean(L, lua_upvalueindex(1));
  lua_settop(L, 3);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(id, key, base);
  fw_vm *old = cl_fw_find_key(f, key);
  if (old && strcmp(old->id, id) != 0)
    luaL_argerror(L, 2,
                  lua_pushfstring(L, "vm id '%s' collides with '%s' (hash %s)", id, old->id, key));
  if (!update && old) luaL_argerror(L, 2, lua_pushfstring(L, "vm '%s' is already attached", id));
  if (update && !old) luaL_argerror(L, 2, lua_pushfstring(L, "vm '%s' is not attached", id));
  fw_plan *p = cl_fw_parse_spec(L, 3, f); /* pushes the plan box at 4 */
  fw_vm *other = cl_fw_find_iface(f, p->iface);
  if (other && other != old) {
    const char *msg = lua_pushfstring(L, "interface '%s' is used by vm '%s'", p->iface, other->id);
    cl_field_error(L, "iface", msg);
  }
  const char *ids[1] = {id};
  int names = resolve_plans(L, f, &p, ids, 1); /* box at 5 */
  resolving *r = lua_touserdata(L, 5);
  if (names == 0 || r->left == 0) return attach_build_k(L, LUA_OK, 0);
  cl_wait *w = cl_wait_push(L);
  w->external = 1;
  w->data = r;
  w->on_abort = r_abort;
  r->w = w;
  return cl_wait_suspend(L, w, attach_build_k, lua_gettop(L));
}

/* ------------------------------------------------------------------------------------------ */
/* attach_many: many VMs in one batch                                                          */

/* The kernel checks the whole jump graph of the table (loop detection) once per batch, which
 * costs in proportion to the VMs already there: attaching N VMs one batch each is O(N^2),
 * in one batch O(N). Restoring a fleet after a restart wants the latter. */

static int parse_spec_cf(lua_State *L) {
  fw *f = lua_touserdata(L, 1);
  cl_fw_parse_spec(L, 2, f); /* leaves the box on top */
  return 1;
}

/* stack: 1 fw, 2 specs, 3 ids (sorted list), 4 boxes (id -> plan box), 5 resolving, 6 tbox */
static int many_done_k(lua_State *L, int status, lua_KContext ctx) {
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = cl_fw_resumed_txn(L, ctx, 6);
  int n = cl_fw_txn_result(L, f, t, "attach_many", NULL);
  if (n == 1) {
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, 3);
    lua_setfield(L, -2, "vms");
    cl_audit_emit(L, "fw.attach", NULL, 0, lua_gettop(L));
    lua_pop(L, 1);
  }
  return n;
}

static int many_build_k(lua_State *L, int status, lua_KContext ctx) {
  if (ctx) cl_wait_resumed(L, ctx);
  lua_settop(L, 5);
  fw *f = lua_touserdata(L, 1);
  if (f->closed) return cl_failf(L, ECANCELED, "firewall: attach_many: firewall closed");
  fw_txn *t = cl_fw_new_batch(L, f, OP_ATTACH); /* 6 */
  lua_Integer n = (lua_Integer)lua_rawlen(L, 3);
  int err = 0;
  for (lua_Integer i = 1; i <= n && !err; i++) {
    lua_rawgeti(L, 3, i);
    const char *id = lua_tostring(L, -1);
    char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
    cl_fw_vm_names(id, key, base);
    if (cl_fw_find_key(f, key))
      luaL_error(L, "bad argument #1 to 'attach_many' (vm '%s' is already attached)", id);
    lua_rawget(L, 4);
    pbox *box = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (cl_fw_find_iface(f, box->p->iface))
      luaL_error(L, "vm '%s': bad field 'iface' (interface '%s' is used by vm '%s')", id,
                 box->p->iface, cl_fw_find_iface(f, box->p->iface)->id);
    lua_rawgeti(L, 3, i);
    fw_vm *v = cl_fw_vm_new(lua_tostring(L, -1));
    lua_pop(L, 1);
    if (!v) cl_fw_oom(L);
    cl_fw_ctx_add(L, t, v);
    v->plan = box->p;
    box->p = NULL;
    snprintf(v->iface, sizeof v->iface, "%s", v->plan->iface);
    if (cl_fw_vm_plan_sets(v) != 0) cl_fw_oom(L);
    err = cl_fw_build_attach(f, t, v, v->plan, 0, NULL);
  }
  cl_fw_finish_batch(L, f, t, err);
  return cl_fw_run_txn(L, f, 6, many_done_k);
}

static int l_attach_many(lua_State *L) {
  fw *f = cl_fw_check(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  lua_newtable(L); /* 3: sorted ids */
  lua_Integer n = 0;
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) luaL_argerror(L, 2, "table of vm id -> spec expected");
    lua_pushvalue(L, -1);
    lua_rawseti(L, 3, ++n);
  }
  lua_getglobal(L, "table");
  if (lua_type(L, -1) == LUA_TTABLE && lua_getfield(L, -1, "sort") == LUA_TFUNCTION) {
    lua_pushvalue(L, 3);
    lua_call(L, 1, 0);
  }
  lua_settop(L, 3);
  lua_newtable(L); /* 4: id -> plan box */
  lua_newtable(L); /* 5: iface -> id, within this batch */
  fw_plan **plans = lua_newuserdatauv(L, sizeof(void *) * (size_t)(n ? n : 1), 0);  /* 6 */
  const char **ids = lua_newuserdatauv(L, sizeof(void *) * (size_t)(n ? n : 1), 0); /* 7 */
  for (lua_Integer i = 1; i <= n; i++) {
    lua_settop(L, 7);
    lua_rawgeti(L, 3, i); /* 8: id */
    const char *id = cl_fw_check_id(L, 8);
    char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
    cl_fw_vm_names(id, key, base);
    fw_vm *old = cl_fw_find_key(f, key);
    if (old) luaL_error(L, "bad argument #1 to 'attach_many' (vm '%s' is already attached)", id);
    lua_pushcfunction(L, parse_spec_cf);
    lua_pushlightuserdata(L, f);
    lua_pushvalue(L, 8);
    lua_gettable(L, 2);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) luaL_error(L, "vm '%s': %s", id, lua_tostring(L, -1));
    pbox *box = lua_touserdata(L, -1);
    const char *iface = box->p->iface;
    fw_vm *other = cl_fw_find_iface(f, iface);
    if (other)
      luaL_error(L, "vm '%s': bad field 'iface' (interface '%s' is used by vm '%s')", id, iface,
                 other->id);
    if (lua_getfield(L, 5, iface) != LUA_TNIL)
      luaL_error(L, "vm '%s': bad field 'iface' (interface '%s' is used by vm '%s')", id, iface,
                 lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushvalue(L, 8);
    lua_setfield(L, 5, iface);
    plans[i - 1] = box->p;
    lua_pushvalue(L, 8);
    lua_pushvalue(L, -2);
    lua_rawset(L, 4); /* boxes[id] = box */
    lua_rawgeti(L, 3, i);
    ids[i - 1] = lua_tostring(L, -1); /* anchored by the ids list */
    lua_settop(L, 7);
  }
  lua_settop(L, 7);
  int names = resolve_plans(L, f, plans, ids, (size_t)n); /* 8 */
  resolving *r = lua_touserdata(L, 8);
  lua_replace(L, 5); /* 5: resolving */
  lua_settop(L, 5);
  if (names == 0 || r->left == 0) return many_build_k(L, LUA_OK, 0);
  cl_wait *w = cl_wait_push(L);
  w->external = 1;
  w->data = r;
  w->on_abort = r_abort;
  r->w = w;
  return cl_wait_suspend(L, w, many_build_k, lua_gettop(L));
}

static int detach_many_k(lua_State *L, int status, lua_KContext ctx) {
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = cl_fw_resumed_txn(L, ctx, 3);
  return cl_fw_txn_result(L, f, t, "detach_many", NULL);
}

static int l_detach_many(lua_State *L) {
  fw *f = cl_fw_check(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  fw_txn *t = cl_fw_new_batch(L, f, OP_DETACH); /* 3 */
  lua_Integer n = (lua_Integer)lua_rawlen(L, 2);
  int err = 0;
  for (lua_Integer i = 1; i <= n && !err; i++) {
    lua_rawgeti(L, 2, i);
    const char *id = cl_fw_check_id(L, lua_gettop(L));
    char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
    cl_fw_vm_names(id, key, base);
    fw_vm *v = cl_fw_find_key(f, key);
    if (!v || strcmp(v->id, id) != 0)
      return cl_failf(L, ENOENT, "firewall: detach_many '%s': not attached", id);
    fw_vm *k = cl_fw_vm_new(id);
    if (!k) cl_fw_oom(L);
    cl_fw_ctx_add(L, t, k);
    err = cl_fw_build_detach(f, t, v);
    lua_pop(L, 1);
  }
  cl_fw_finish_batch(L, f, t, err);
  return cl_fw_run_txn(L, f, 3, detach_many_k);
}

/* ------------------------------------------------------------------------------------------ */
/* detach / reconcile / destroy                                                               */

static int detach_k(lua_State *L, int status, lua_KContext ctx) {
  /* stack: 1 fw, 2 id, 3 tbox, [4 wait] */
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = cl_fw_resumed_txn(L, ctx, 3);
  return cl_fw_txn_result(L, f, t, "detach", lua_tostring(L, 2));
}

static int l_detach(lua_State *L) {
  fw *f = cl_fw_check(L);
  const char *id = cl_fw_check_id(L, 2);
  lua_settop(L, 2);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(id, key, base);
  fw_vm *v = cl_fw_find_key(f, key);
  if (!v || strcmp(v->id, id) != 0)
    return cl_failf(L, ENOENT, "firewall: detach '%s': not attached", id);
  fw_txn *t = cl_fw_new_batch(L, f, OP_DETACH);
  fw_vm *k = cl_fw_vm_new(id);
  if (!k) cl_fw_oom(L);
  cl_fw_ctx_add(L, t, k);
  cl_fw_finish_batch(L, f, t, cl_fw_build_detach(f, t, v));
  lua_createtable(L, 0, 1);
  lua_pushstring(L, v->iface);
  lua_setfield(L, -2, "iface");
  cl_audit_emit(L, "fw.detach", id, 0, lua_gettop(L));
  lua_pop(L, 1);
  return cl_fw_run_txn(L, f, 3, detach_k);
}

static int reconcile_done_k(lua_State *L, int status, lua_KContext ctx) {
  /* stack: 1 fw, 2 live, 3 removed ids, 4 tbox, [5 wait] */
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = cl_fw_resumed_txn(L, ctx, 4);
  int n = cl_fw_txn_result(L, f, t, "reconcile", NULL);
  if (n != 1) return n;
  lua_pushvalue(L, 3);
  return 1;
}

static int l_reconcile(lua_State *L) {
  fw *f = cl_fw_check(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  /* The live set: a list of ids, or a table whose keys are ids. */
  lua_newtable(L); /* 3: live lookup */
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    if (lua_type(L, -2) == LUA_TNUMBER) {
      if (lua_type(L, -1) != LUA_TSTRING) luaL_argerror(L, 2, "list of vm ids expected");
      lua_pushvalue(L, -1);
      lua_pushboolean(L, 1);
      lua_rawset(L, 3);
    } else if (lua_type(L, -2) == LUA_TSTRING) {
      lua_pushvalue(L, -2);
      lua_pushboolean(L, 1);
      lua_rawset(L, 3);
    }
    lua_pop(L, 1);
  }
  lua_replace(L, 2);
  lua_newtable(L);                              /* 3: removed ids */
  fw_txn *t = cl_fw_new_batch(L, f, OP_DETACH); /* 4 */
  int n = 0, err = 0;
  for (size_t b = 0; b < f->nbuckets && !err; b++) {
    for (fw_vm *v = f->bykey[b]; v && !err; v = v->next_key) {
      lua_pushstring(L, v->id);
      int live = lua_rawget(L, 2) != LUA_TNIL;
      lua_pop(L, 1);
      if (live) continue;
      fw_vm *k = cl_fw_vm_new(v->id);
      if (!k) cl_fw_oom(L);
      cl_fw_ctx_add(L, t, k);
      err = cl_fw_build_detach(f, t, v);
      lua_pushstring(L, v->id);
      lua_rawseti(L, 3, ++n);
    }
  }
  if (n == 0) {
    lua_settop(L, 3);
    return 1;
  }
  cl_fw_finish_batch(L, f, t, err);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, 3);
  lua_setfield(L, -2, "removed");
  cl_audit_emit(L, "fw.reconcile", NULL, 0, lua_gettop(L));
  lua_pop(L, 1);
  return cl_fw_run_txn(L, f, 4, reconcile_done_k);
}

static const luaL_Reg ops_methods[] = {
    {"detach", l_detach},
    {"reconcile", l_reconcile},
    {"attach_many", l_attach_many},
    {"detach_many", l_detach_many},
    {NULL, NULL},
};

void cl_fw_ops_register(lua_State *L, int methods) {
  methods = lua_absindex(L, methods);
  static const cl_class cls = {RBOX_MT, NULL, rbox_gc, NULL};
  cl_class_register(L, &cls);
  lua_pushvalue(L, methods);
  luaL_setfuncs(L, ops_methods, 0);
  lua_pushboolean(L, 0);
  lua_pushcclosure(L, attach_common, 1);
  lua_setfield(L, -2, "attach");
  lua_pushboolean(L, 1);
  lua_pushcclosure(L, attach_common, 1);
  lua_setfield(L, -2, "update");
  lua_pop(L, 1);
}
