/*
 * clawlua.firewall: per-VM nftables isolation, driven over netlink from the loop.
 *
 *   local fw = firewall.open { table = "clawlua", netns = nil, log_group = nil, on_drop = fn,
 *                              resolvers = { "10.0.0.53" }, min_ttl = 5, max_ttl = 86400 }
 *   fw:attach("vm-1", { iface = "tap0", ip = "10.0.0.2", ip6 = "fd00::2",
 *                       mac = "02:00:00:00:00:01", dns = { "10.0.0.1" },
 *                       egress = { policy = "drop", allow = { ... }, deny = { ... },
 *                                  rate = { packets = 1000 } },
 *                       ingress = { ... }, log = true })
 *   fw:update(id, spec)  fw:detach(id)  fw:list()  fw:counters(id)  fw:reconcile(live_ids)
 *   fw:resolve(name)  fw:stats()  fw:close()  fw:destroy()
 *
 * Specs are validated completely before anything is sent: a bad field raises an error naming
 * it, and the kernel is not touched. Each change is one batch (netlink.c); the registry of
 * VMs (what this handle knows is in the kernel) changes only when the kernel accepted it.
 * Opening adopts what an earlier runtime left in the table, so `reconcile` can clean up after
 * a crash.
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
/* counters, list                                                                             */

typedef struct counters_acc {
  lua_State *L;
  int tidx;
} counters_acc;

static int comment_cb(const struct nftnl_udata *attr, void *data) {
  const char **out = data;
  if (nftnl_udata_type(attr) == NFTNL_UDATA_RULE_COMMENT) *out = nftnl_udata_get(attr);
  return 0;
}

static int counter_expr_cb(struct nftnl_expr *e, void *data) {
  uint64_t *pb = data;
  if (strcmp(nftnl_expr_get_str(e, NFTNL_EXPR_NAME), "counter") == 0) {
    pb[0] += nftnl_expr_get_u64(e, NFTNL_EXPR_CTR_PACKETS);
    pb[1] += nftnl_expr_get_u64(e, NFTNL_EXPR_CTR_BYTES);
    pb[2] = 1;
  }
  return 0;
}

static int rule_cb(const struct nlmsghdr *nlh, void *arg) {
  counters_acc *a = arg;
  struct nftnl_rule *r = nftnl_rule_alloc();
  if (!r) return -ENOMEM;
  if (nftnl_rule_nlmsg_parse(nlh, r) < 0) {
    nftnl_rule_free(r);
    return 0;
  }
  const char *label = NULL;
  uint32_t ulen = 0;
  const void *ud = nftnl_rule_get_data(r, NFTNL_RULE_USERDATA, &ulen);
  if (ud) nftnl_udata_parse(ud, ulen, comment_cb, &label);
  uint64_t pb[3] = {0, 0, 0};
  nftnl_expr_foreach(r, counter_expr_cb, pb);
  if (label && pb[2]) {
    lua_State *L = a->L;
    if (lua_getfield(L, a->tidx, label) != LUA_TTABLE) {
      lua_pop(L, 1);
      lua_createtable(L, 0, 2);
      lua_pushinteger(L, 0);
      lua_setfield(L, -2, "packets");
      lua_pushinteger(L, 0);
      lua_setfield(L, -2, "bytes");
      lua_pushvalue(L, -1);
      lua_setfield(L, a->tidx, label);
    }
    lua_getfield(L, -1, "packets");
    lua_Integer p = lua_tointeger(L, -1) + (lua_Integer)pb[0];
    lua_pop(L, 1);
    lua_pushinteger(L, p);
    lua_setfield(L, -2, "packets");
    lua_getfield(L, -1, "bytes");
    lua_Integer by = lua_tointeger(L, -1) + (lua_Integer)pb[1];
    lua_pop(L, 1);
    lua_pushinteger(L, by);
    lua_setfield(L, -2, "bytes");
    lua_pop(L, 1);
  }
  nftnl_rule_free(r);
  return 0;
}

/* stack: 1 fw, 2 id, 3 result, 4 acc, 5 step, 6 tbox, [7 wait] */
static int counters_k(lua_State *L, int status, lua_KContext ctx) {
  fw *f = lua_touserdata(L, 1);
  if (ctx) {
    fw_txn *t = cl_fw_resumed_txn(L, ctx, 6);
    lua_settop(L, 6);
    if (t->err || f->closed) return cl_fw_txn_result(L, f, t, "counters", lua_tostring(L, 2));
  }
  if (f->closed) return cl_failf(L, ECANCELED, "firewall: counters: firewall closed");
  int step = (int)lua_tointeger(L, 5);
  lua_settop(L, 5);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(lua_tostring(L, 2), key, base);
  static const char sfx[] = {'s', 'o', 'i', 'a'};
  if (step >= 4) {
    lua_pushvalue(L, 3);
    return 1;
  }
  lua_pushinteger(L, step + 1);
  lua_replace(L, 5);
  char chain[FW_NAME_MAX + 8];
  snprintf(chain, sizeof chain, "%s_%c", base, sfx[step]);
  fw_txn *t = cl_fw_txn_new(1);
  if (!t) cl_fw_oom(L);
  cl_fw_push_tbox(L, t);
  if (cl_fw_dump_request(f, t, NFT_MSG_GETRULE, sfx[step] == 'a' ? NFPROTO_ARP : NFPROTO_INET,
                         chain, NULL) != 0)
    cl_fw_oom(L);
  counters_acc *acc = lua_touserdata(L, 4);
  acc->L = L;
  acc->tidx = 3;
  t->on_msg = rule_cb;
  t->arg = acc;
  return cl_fw_run_txn(L, f, 6, counters_k);
}

static int l_counters(lua_State *L) {
  fw *f = cl_fw_check(L);
  const char *id = cl_fw_check_id(L, 2);
  lua_settop(L, 2);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(id, key, base);
  fw_vm *v = cl_fw_find_key(f, key);
  if (!v || strcmp(v->id, id) != 0)
    return cl_failf(L, ENOENT, "firewall: counters '%s': not attached", id);
  lua_newtable(L);                               /* 3 */
  lua_newuserdatauv(L, sizeof(counters_acc), 0); /* 4 */
  lua_pushinteger(L, 0);                         /* 5 */
  return counters_k(L, LUA_OK, 0);
}

static int cmp_vm(const void *a, const void *b) {
  return strcmp((*(fw_vm *const *)a)->id, (*(fw_vm *const *)b)->id);
}

static int l_list(lua_State *L) {
  fw *f = cl_fw_check(L);
  fw_vm **all = lua_newuserdatauv(L, (f->nvms ? f->nvms : 1) * sizeof(void *), 0);
  size_t nall = 0;
  for (size_t b = 0; b < f->nbuckets; b++)
    for (fw_vm *v = f->bykey[b]; v; v = v->next_key) all[nall++] = v;
  qsort(all, nall, sizeof(void *), cmp_vm); /* sorted by id, so that output is stable */
  lua_createtable(L, (int)f->nvms, 0);
  int n = 0;
  for (size_t k = 0; k < nall; k++) {
    {
      fw_vm *v = all[k];
      lua_createtable(L, 0, 6);
      lua_pushstring(L, v->id);
      lua_setfield(L, -2, "id");
      lua_pushstring(L, v->iface);
      lua_setfield(L, -2, "iface");
      lua_pushstring(L, v->base);
      lua_setfield(L, -2, "chain");
      lua_pushinteger(L, (lua_Integer)v->nsets);
      lua_setfield(L, -2, "sets");
      lua_pushboolean(L, v->plan == NULL);
      lua_setfield(L, -2, "adopted");
      if (v->plan) {
        lua_newtable(L);
        int nh = 0;
        for (size_t i = 0; i < v->plan->nentries; i++) {
          fw_entry *e = &v->plan->entries[i];
          for (size_t h = 0; h < e->nhosts; h++) {
            lua_createtable(L, 0, 4);
            lua_pushstring(L, e->hosts[h].name);
            lua_setfield(L, -2, "host");
            cl_fw_push_addr_list(L, e->hosts[h].addrs, e->hosts[h].naddrs);
            lua_setfield(L, -2, "addrs");
            lua_pushinteger(L, e->hosts[h].ttl);
            lua_setfield(L, -2, "ttl");
            if (e->hosts[h].err[0]) {
              lua_pushstring(L, e->hosts[h].err);
              lua_setfield(L, -2, "error");
            }
            lua_rawseti(L, -2, ++nh);
          }
        }
        lua_setfield(L, -2, "hosts");
      }
      lua_rawseti(L, -2, ++n);
    }
  }
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* open: the base ruleset, then adoption of what the kernel holds                             */

typedef struct adopt {
  fw *f;
  int err;
} adopt;

static fw_vm *find_base(fw *f, const char *name) {
  /* name is vm_<prefix>_<hash>[_...]: the hash is the 20 hex digits after the prefix. */
  const char *p = name;
  if (strncmp(p, "vm_", 3) != 0) return NULL;
  for (const char *u = strchr(p + 3, '_'); u; u = strchr(u + 1, '_')) {
    if (strlen(u + 1) >= FW_HASH_HEX) {
      char key[FW_HASH_HEX + 1];
      memcpy(key, u + 1, FW_HASH_HEX);
      key[FW_HASH_HEX] = 0;
      fw_vm *v = cl_fw_find_key(f, key);
      if (v && strncmp(v->base, name, strlen(v->base)) == 0) return v;
    }
  }
  return NULL;
}

static int chain_comment_cb(const struct nftnl_udata *attr, void *data) {
  const char **out = data;
  if (nftnl_udata_type(attr) == NFTNL_UDATA_CHAIN_COMMENT) *out = nftnl_udata_get(attr);
  return 0;
}

static int adopt_chain_cb(const struct nlmsghdr *nlh, void *arg) {
  adopt *a = arg;
  struct nftnl_chain *c = nftnl_chain_alloc();
  if (!c) return -ENOMEM;
  if (nftnl_chain_nlmsg_parse(nlh, c) == 0) {
    const char *name = nftnl_chain_get_str(c, NFTNL_CHAIN_NAME);
    size_t n = name ? strlen(name) : 0;
    uint32_t ulen = 0;
    const void *ud = nftnl_chain_get_data(c, NFTNL_CHAIN_USERDATA, &ulen);
    const char *id = NULL;
    if (ud) nftnl_udata_parse(ud, ulen, chain_comment_cb, &id);
    if (n > 2 && strcmp(name + n - 2, "_o") == 0 && id) {
      fw_vm *v = cl_fw_vm_new(id);
      /* Only chains whose name is what the id gives are ours. */
      if (v && strncmp(name, v->base, n - 2) == 0 && strlen(v->base) == n - 2 &&
          !cl_fw_find_key(a->f, v->key)) {
        if (cl_fw_reg_insert(a->f, v) != 0) cl_fw_vm_free(a->f, v);
      } else {
        cl_fw_vm_free(a->f, v);
      }
    }
  }
  nftnl_chain_free(c);
  return 0;
}

static int adopt_set_cb(const struct nlmsghdr *nlh, void *arg) {
  adopt *a = arg;
  struct nftnl_set *s = nftnl_set_alloc();
  if (!s) return -ENOMEM;
  if (nftnl_set_nlmsg_parse(nlh, s) == 0) {
    const char *name = nftnl_set_get_str(s, NFTNL_SET_NAME);
    fw_vm *v = name ? find_base(a->f, name) : NULL;
    if (v) {
      cl_fw_vm_add_set(v, name);
      const char *g = strstr(name + strlen(v->base), "_g");
      if (g) {
        unsigned gen = (unsigned)strtoul(g + 2, NULL, 10);
        if (gen > v->gen) v->gen = gen;
      }
    }
  }
  nftnl_set_free(s);
  return 0;
}

static int elem_cb(struct nftnl_set_elem *e, void *arg) {
  adopt *a = arg;
  uint32_t klen = 0;
  const char *key = nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY, &klen);
  const char *chain = nftnl_set_elem_get_str(e, NFTNL_SET_ELEM_CHAIN);
  if (!key || !chain) return 0;
  fw_vm *v = find_base(a->f, chain);
  if (v && !v->iface[0]) {
    char ifn[IFNAMSIZ] = {0};
    memcpy(ifn, key, klen < IFNAMSIZ - 1 ? klen : IFNAMSIZ - 1);
    /* re-key the interface index */
    cl_fw_reg_remove(a->f, v);
    snprintf(v->iface, sizeof v->iface, "%s", ifn);
    cl_fw_reg_insert(a->f, v);
  }
  return 0;
}

static int adopt_elem_cb(const struct nlmsghdr *nlh, void *arg) {
  struct nftnl_set *s = nftnl_set_alloc();
  if (!s) return -ENOMEM;
  if (nftnl_set_elems_nlmsg_parse(nlh, s) == 0) nftnl_set_elem_foreach(s, elem_cb, arg);
  nftnl_set_free(s);
  return 0;
}

static int fw_release(lua_State *L, fw *f);

/* stack: 1 opts, 2 fw, 3 adopt, 4 step, 5 tbox, [6 wait] */
static int open_k(lua_State *L, int status, lua_KContext ctx) {
  fw *f = lua_touserdata(L, 2);
  if (ctx) {
    fw_txn *t = cl_fw_resumed_txn(L, ctx, 5);
    lua_settop(L, 5);
    if (t->err || f->closed) {
      int n = cl_fw_txn_result(L, f, t, "open", NULL);
      fw_release(L, f);
      return n;
    }
  }
  int step = (int)lua_tointeger(L, 4);
  lua_settop(L, 4);
  lua_pushinteger(L, step + 1);
  lua_replace(L, 4);
  adopt *a = lua_touserdata(L, 3);
  a->f = f;
  fw_txn *t;
  int err = 0;
  switch (step) {
  case 0:
    t = cl_fw_txn_new(0);
    if (!t) cl_fw_oom(L);
    cl_fw_push_tbox(L, t);
    err = cl_fw_txn_begin(f, t);
    if (!err) err = cl_fw_build_base(f, t);
    if (!err) err = cl_fw_txn_finish(f, t);
    break;
  case 1:
  case 2:
  case 3:
    t = cl_fw_txn_new(1);
    if (!t) cl_fw_oom(L);
    cl_fw_push_tbox(L, t);
    t->arg = a;
    if (step == 1) {
      err = cl_fw_dump_request(f, t, NFT_MSG_GETCHAIN, NFPROTO_INET, NULL, NULL);
      t->on_msg = adopt_chain_cb;
    } else if (step == 2) {
      err = cl_fw_dump_request(f, t, NFT_MSG_GETSET, NFPROTO_INET, NULL, NULL);
      t->on_msg = adopt_set_cb;
    } else {
      err = cl_fw_dump_request(f, t, NFT_MSG_GETSETELEM, NFPROTO_INET, NULL, "egress");
      t->on_msg = adopt_elem_cb;
    }
    break;
  default:
    lua_createtable(L, 0, 2);
    lua_pushstring(L, f->table);
    lua_setfield(L, -2, "table");
    lua_pushinteger(L, (lua_Integer)f->nvms);
    lua_setfield(L, -2, "adopted");
    cl_audit_emit(L, "fw.open", NULL, 0, lua_gettop(L));
    lua_pop(L, 1);
    lua_pushvalue(L, 2);
    return 1;
  }
  if (err) {
    fw_release(L, f);
    return cl_fail(L, "firewall: open", err);
  }
  return cl_fw_run_txn(L, f, 5, open_k);
}

static const char *const OPEN_FIELDS[] = {"table",   "netns",       "log_group",
                                          "on_drop", "resolvers",   "min_ttl",
                                          "max_ttl", "dns_timeout", NULL};

static int l_open(lua_State *L) {
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    lua_newtable(L);
  }
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  cl_check_fields(L, 1, OPEN_FIELDS);
  const char *table = cl_opt_string(L, 1, "table", "clawlua");
  size_t tl = strlen(table);
  if (tl == 0 || tl > 32) cl_field_error(L, "table", "1 to 32 bytes expected");
  for (const char *c = table; *c; c++)
    if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-')
      cl_field_error(L, "table", lua_pushfstring(L, "invalid table name '%s'", table));
  const char *netns = cl_opt_string(L, 1, "netns", NULL);
  lua_Integer group = cl_opt_integer(L, 1, "log_group", -1);
  if (group < -1 || group > 65535)
    cl_field_error(L, "log_group", lua_pushfstring(L, "%I out of range 0-65535", group));
  lua_getfield(L, 1, "on_drop");
  if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
    cl_field_error(L, "on_drop", "function expected");
  if (!lua_isnil(L, -1) && group < 0) cl_field_error(L, "on_drop", "needs log_group");
  lua_pop(L, 1);
  double min_ttl = cl_opt_number(L, 1, "min_ttl", 5);
  double max_ttl = cl_opt_number(L, 1, "max_ttl", 86400);
  double dns_timeout = cl_opt_number(L, 1, "dns_timeout", 2);
  if (min_ttl < 0.1 || max_ttl < min_ttl) cl_field_error(L, "min_ttl", "0.1 <= min_ttl <= max_ttl");
  if (dns_timeout <= 0) cl_field_error(L, "dns_timeout", "positive number expected");
  int rt = lua_getfield(L, 1, "resolvers");
  if (rt != LUA_TNIL && rt != LUA_TTABLE) cl_field_error(L, "resolvers", "list expected");
  lua_pop(L, 1);
  char path[256];
  if (netns) {
    if (!*netns || strlen(netns) > 200) cl_field_error(L, "netns", "1 to 200 bytes expected");
    if (strchr(netns, '/'))
      snprintf(path, sizeof path, "%s", netns);
    else
      snprintf(path, sizeof path, "/run/netns/%s", netns);
  }

  fw *f = lua_newuserdatauv(L, sizeof *f, 1); /* 2 */
  memset(f, 0, sizeof *f);
  f->closed = 1;
  f->nl_fd = -1;
  f->vm_id_of = cl_fw_vm_id_of;
  f->log_group = -1;
  luaL_setmetatable(L, FW_MT);
  lua_getfield(L, 1, "on_drop");
  lua_setiuservalue(L, 2, 1);
  f->loop = cl_loop_get(L);
  snprintf(f->table, sizeof f->table, "%s", table);
  if (netns) snprintf(f->netns, sizeof f->netns, "%s", path);
  f->min_ttl = min_ttl;
  f->max_ttl = max_ttl;
  f->dns_timeout = dns_timeout;

  int fds[4], types[4] = {NETLINK_NETFILTER, NETLINK_NETFILTER, -AF_INET, -AF_INET6};
  char err[256];
  int e = cl_fw_open_sockets(netns ? path : NULL, fds, types, 4, err, sizeof err);
  if (e) return cl_failf(L, e, "firewall: open: %s", err);
  f->closed = 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  f->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  e = cl_fw_nl_setup(f, fds[0], err, sizeof err);
  if (e) {
    for (int i = 1; i < 4; i++)
      if (fds[i] >= 0) close(fds[i]);
    if (f->nl_fd < 0) close(fds[0]);
    fw_release(L, f);
    return cl_failf(L, e, "firewall: open: %s", err);
  }
  if (group >= 0) {
    e = cl_fw_nflog_start(f, fds[1], (int)group, err, sizeof err);
    fds[1] = -1;
    if (e) {
      for (int i = 2; i < 4; i++)
        if (fds[i] >= 0) close(fds[i]);
      fw_release(L, f);
      return cl_failf(L, e, "firewall: open: %s", err);
    }
    f->log_group = (int)group;
    cl_fw_nflog_set_callback(f, L, 2);
  } else {
    close(fds[1]);
  }
  lua_getfield(L, 1, "resolvers");
  e = cl_fw_dns_start(f, fds + 2, L, lua_gettop(L), err, sizeof err);
  lua_pop(L, 1);
  if (e) {
    fw_release(L, f);
    return cl_failf(L, e, "firewall: open: %s", err);
  }
  lua_settop(L, 2);
  lua_newuserdatauv(L, sizeof(adopt), 0); /* 3 */
  lua_pushinteger(L, 0);                  /* 4 */
  return open_k(L, LUA_OK, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* close / destroy / gc                                                                       */

static int fw_release(lua_State *L, fw *f) {
  if (f->closed) return 0;
  f->closed = 1; /* first: everything woken below sees a closed firewall */
  cl_fw_abort_all(f);
  cl_fw_nflog_stop(f);
  for (size_t b = 0; b < f->nbuckets; b++) {
    fw_vm *v = f->bykey[b];
    f->bykey[b] = NULL;
    while (v) {
      fw_vm *next = v->next_key;
      cl_fw_vm_free(f, v);
      v = next;
    }
  }
  f->nvms = 0;
  cl_fw_dns_stop(f);
  free(f->bykey);
  free(f->byif);
  f->bykey = f->byif = NULL;
  f->nbuckets = f->nvms = 0;
  if (f->nl_fd >= 0) {
    cl_watch_stop(&f->nl_watch);
    close(f->nl_fd);
    f->nl_fd = -1;
  }
  free(f->rbuf);
  f->rbuf = NULL;
  f->L = NULL;
  return 0;
}

static int l_close(lua_State *L) {
  fw *f = luaL_checkudata(L, 1, FW_MT);
  fw_release(L, f);
  lua_pushboolean(L, 1);
  return 1;
}

static int destroy_k(lua_State *L, int status, lua_KContext ctx) {
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = cl_fw_resumed_txn(L, ctx, 2);
  int n = cl_fw_txn_result(L, f, t, "destroy", NULL);
  if (n == 1) {
    lua_createtable(L, 0, 1);
    lua_pushstring(L, f->table);
    lua_setfield(L, -2, "table");
    cl_audit_emit(L, "fw.destroy", NULL, 0, lua_gettop(L));
    lua_pop(L, 1);
    fw_release(L, f);
  }
  return n;
}

static int l_destroy(lua_State *L) {
  fw *f = cl_fw_check(L);
  lua_settop(L, 1);
  fw_txn *t = cl_fw_new_batch(L, f, OP_DESTROY);
  cl_fw_finish_batch(L, f, t, cl_fw_build_delete_table(f, t));
  return cl_fw_run_txn(L, f, 2, destroy_k);
}

static int l_stats(lua_State *L) {
  fw *f = cl_fw_check(L);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)f->nvms);
  lua_setfield(L, -2, "vms");
  lua_pushinteger(L, (lua_Integer)f->batches);
  lua_setfield(L, -2, "batches");
  lua_pushinteger(L, (lua_Integer)f->messages);
  lua_setfield(L, -2, "messages");
  lua_pushinteger(L, (lua_Integer)f->overruns);
  lua_setfield(L, -2, "overruns");
  lua_pushstring(L, f->table);
  lua_setfield(L, -2, "table");
  cl_fw_nflog_stats(f, L);
  return 1;
}

static int l_tostring(lua_State *L) {
  fw *f = luaL_checkudata(L, 1, FW_MT);
  if (f->closed)
    lua_pushliteral(L, "clawlua.firewall (closed)");
  else
    lua_pushfstring(L, "clawlua.firewall (table %s, %I vms)", f->table, (lua_Integer)f->nvms);
  return 1;
}

/* firewall.names(id) -> key, base chain name: what the kernel objects of a VM are called. */
static int l_names(lua_State *L) {
  const char *id = cl_fw_check_id(L, 1);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(id, key, base);
  lua_pushstring(L, base);
  lua_pushstring(L, key);
  return 2;
}

int cl_fw_resolve(lua_State *L);

static const luaL_Reg fw_methods[] = {
    {"counters", l_counters},
    {"list", l_list},
    {"close", l_close},
    {"destroy", l_destroy},
    {"stats", l_stats},
    {"resolve", cl_fw_resolve},
    {NULL, NULL},
};

int luaopen_clawlua_firewall(lua_State *L) {
  if (cl_entry_redirect(L, "firewall")) return 1;
  cl_fw_spec_register(L);
  cl_fw_txn_register(L);

  static const luaL_Reg fw_meta[] = {{"__tostring", l_tostring}, {NULL, NULL}};
  static const cl_class cls = {FW_MT, fw_methods, l_close, fw_meta};
  cl_class_register(L, &cls);
  luaL_getmetatable(L, FW_MT);
  lua_getfield(L, -1, "__index");
  cl_fw_ops_register(L, -1);
  lua_pop(L, 2);

  lua_newtable(L);
  lua_pushcfunction(L, l_open);
  lua_setfield(L, -2, "open");
  lua_pushcfunction(L, l_names);
  lua_setfield(L, -2, "names");
  lua_pushinteger(L, FW_ID_MAX);
  lua_setfield(L, -2, "max_id");
  return 1;
}
