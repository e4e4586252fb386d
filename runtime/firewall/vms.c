/*
 * The VMs a firewall handle knows (attached by it or adopted from the kernel): the registry by
 * key and by interface, the sets each VM owns, and the DNS refresh timers that keep the sets
 * of its domain names current.
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
/* Registry                                                                                   */

static size_t strhash(const char *s) {
  size_t h = 5381;
  while (*s) h = h * 33 + (unsigned char)*s++;
  return h;
}

static int reg_grow(fw *f) {
  size_t n = f->nbuckets ? f->nbuckets * 2 : 64;
  fw_vm **k = calloc(n, sizeof(void *)), **i = calloc(n, sizeof(void *));
  if (!k || !i) {
    free(k);
    free(i);
    return ENOMEM;
  }
  for (size_t b = 0; b < f->nbuckets; b++) {
    for (fw_vm *v = f->bykey[b], *nx; v; v = nx) {
      nx = v->next_key;
      size_t h = strhash(v->key) & (n - 1);
      v->next_key = k[h];
      k[h] = v;
    }
    for (fw_vm *v = f->byif[b], *nx; v; v = nx) {
      nx = v->next_if;
      size_t h = strhash(v->iface) & (n - 1);
      v->next_if = i[h];
      i[h] = v;
    }
  }
  free(f->bykey);
  free(f->byif);
  f->bykey = k;
  f->byif = i;
  f->nbuckets = n;
  return 0;
}

fw_vm *cl_fw_find_key(fw *f, const char *key) {
  if (!f->nbuckets) return NULL;
  for (fw_vm *v = f->bykey[strhash(key) & (f->nbuckets - 1)]; v; v = v->next_key)
    if (strcmp(v->key, key) == 0) return v;
  return NULL;
}

const char *cl_fw_vm_id_of(fw *f, const char *key) {
  fw_vm *v = cl_fw_find_key(f, key);
  return v ? v->id : NULL;
}

fw_vm *cl_fw_find_iface(fw *f, const char *iface) {
  if (!f->nbuckets || !iface[0]) return NULL;
  for (fw_vm *v = f->byif[strhash(iface) & (f->nbuckets - 1)]; v; v = v->next_if)
    if (strcmp(v->iface, iface) == 0) return v;
  return NULL;
}

int cl_fw_reg_insert(fw *f, fw_vm *v) {
  if (f->nvms + 1 > f->nbuckets && reg_grow(f) != 0) return ENOMEM;
  size_t h = strhash(v->key) & (f->nbuckets - 1);
  v->next_key = f->bykey[h];
  f->bykey[h] = v;
  h = strhash(v->iface) & (f->nbuckets - 1);
  v->next_if = f->byif[h];
  f->byif[h] = v;
  f->nvms++;
  return 0;
}

void cl_fw_reg_remove(fw *f, fw_vm *v) {
  fw_vm **p = &f->bykey[strhash(v->key) & (f->nbuckets - 1)];
  while (*p && *p != v) p = &(*p)->next_key;
  if (*p) *p = v->next_key;
  p = &f->byif[strhash(v->iface) & (f->nbuckets - 1)];
  while (*p && *p != v) p = &(*p)->next_if;
  if (*p) *p = v->next_if;
  f->nvms--;
}

static void refresh_stop_all(fw *f, fw_vm *v);

void cl_fw_vm_free(fw *f, fw_vm *v) {
  if (!v) return;
  refresh_stop_all(f, v);
  free(v->id);
  for (size_t i = 0; i < v->nsets; i++) free(v->sets[i]);
  free(v->sets);
  cl_fw_plan_free(v->plan);
  free(v);
}

fw_vm *cl_fw_vm_new(const char *id) {
  fw_vm *v = calloc(1, sizeof *v);
  if (!v) return NULL;
  v->id = strdup(id);
  if (!v->id) {
    free(v);
    return NULL;
  }
  cl_fw_vm_names(id, v->key, v->base);
  return v;
}

int cl_fw_vm_add_set(fw_vm *v, const char *name) {
  char **n = realloc(v->sets, (v->nsets + 1) * sizeof *n);
  if (!n) return ENOMEM;
  v->sets = n;
  if (!(v->sets[v->nsets] = strdup(name))) return ENOMEM;
  v->nsets++;
  return 0;
}

/* The names of the sets the plan creates (as ruleset.c names them). */
int cl_fw_vm_plan_sets(fw_vm *v) {
  const fw_plan *p = v->plan;
  for (size_t i = 0; i < p->nentries; i++) {
    const fw_entry *e = &p->entries[i];
    for (int fam = 4; fam <= 6; fam += 2) {
      if (!cl_fw_entry_uses_set(e, fam)) continue;
      char name[FW_NAME_MAX];
      if (cl_fw_vm_add_set(v, cl_fw_set_name(v, v->gen, e, fam, name)) != 0) return ENOMEM;
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Audit                                                                                      */

void cl_fw_emit(fw *f, const char *kind, const char *vm, int detail) {
  if (f->L) cl_audit_emit(f->L, kind, vm, 0, detail);
}

/* ------------------------------------------------------------------------------------------ */
/* DNS refresh of domain names                                                                */

typedef struct fw_refresh {
  struct fw_refresh *next;
  fw *f;
  char key[FW_HASH_HEX + 1];
  size_t entry, host;
  cl_timer timer;
  int querying;
} fw_refresh;

static void refresh_stop_all(fw *f, fw_vm *v) {
  while (v->refresh) {
    fw_refresh *r = v->refresh;
    v->refresh = r->next;
    cl_timer_stop(&r->timer);
    if (r->querying && f->dns) cl_fw_dns_cancel(f, r);
    free(r);
  }
}

static double clamp_ttl(fw *f, uint32_t ttl, int failed) {
  double t = failed ? 5.0 : (double)ttl;
  if (t < f->min_ttl) t = f->min_ttl;
  if (t > f->max_ttl) t = f->max_ttl;
  return t;
}

void cl_fw_push_addr_list(lua_State *L, const fw_addr *a, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    char s[INET6_ADDRSTRLEN];
    inet_ntop(a[i].fam == 4 ? AF_INET : AF_INET6, a[i].a, s, sizeof s);
    lua_pushstring(L, s);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

void cl_fw_emit_resolve(fw *f, const char *vm, const char *name, const fw_addr *a, size_t n,
                        uint32_t ttl, const char *err, int changed) {
  lua_State *L = f->L;
  if (!L) return;
  lua_createtable(L, 0, 5);
  lua_pushstring(L, name);
  lua_setfield(L, -2, "host");
  cl_fw_push_addr_list(L, a, n);
  lua_setfield(L, -2, "addrs");
  lua_pushinteger(L, ttl);
  lua_setfield(L, -2, "ttl");
  if (err) {
    lua_pushstring(L, err);
    lua_setfield(L, -2, "error");
  }
  lua_pushboolean(L, changed);
  lua_setfield(L, -2, "changed");
  cl_fw_emit(f, "fw.resolve", vm, lua_gettop(L));
  lua_pop(L, 1);
}

static int same_addrs(const fw_addr *a, size_t na, const fw_addr *b, size_t nb) {
  if (na != nb) return 0;
  for (size_t i = 0; i < na; i++) {
    int found = 0;
    for (size_t j = 0; j < nb && !found; j++) found = memcmp(&a[i], &b[j], sizeof *a) == 0;
    if (!found) return 0;
  }
  return 1;
}

int cl_fw_set_host_addrs(fw_host *h, const fw_addr *a, size_t n, uint32_t ttl) {
  fw_addr *c = NULL;
  if (n > FW_MAX_RESOLVED) n = FW_MAX_RESOLVED;
  if (n) {
    c = malloc(n * sizeof *c);
    if (!c) return ENOMEM;
    memcpy(c, a, n * sizeof *c);
  }
  free(h->addrs);
  h->addrs = c;
  h->naddrs = n;
  h->ttl = ttl;
  h->resolved = 1;
  h->err[0] = 0;
  return 0;
}

static void refresh_fire(cl_timer *t);

static void refresh_txn_done(fw *f, fw_txn *t) {
  if (t->err) {
    lua_State *L = f->L;
    if (!L) return;
    lua_createtable(L, 0, 1);
    lua_pushstring(L, t->errmsg);
    lua_setfield(L, -2, "error");
    cl_fw_emit(f, "fw.error", t->nids ? t->ids[0] : NULL, lua_gettop(L));
    lua_pop(L, 1);
  }
}

static void refresh_answer(fw *f, void *arg, const char *name, const fw_addr *addrs, size_t n,
                           uint32_t ttl, const char *err) {
  fw_refresh *r = arg;
  r->querying = 0;
  fw_vm *v = cl_fw_find_key(f, r->key);
  if (!v || !v->plan || r->entry >= v->plan->nentries) return;
  fw_entry *e = &v->plan->entries[r->entry];
  fw_host *h = &e->hosts[r->host];
  int changed = 0;
  if (err) {
    snprintf(h->err, sizeof h->err, "%s", err);
  } else {
    size_t keep = n > FW_MAX_RESOLVED ? FW_MAX_RESOLVED : n;
    changed = !same_addrs(h->addrs, h->naddrs, addrs, keep);
    if (changed) {
      /* Keep the old list if the batch cannot be built or is refused. */
      fw_addr *old = h->addrs;
      size_t oldn = h->naddrs;
      h->addrs = NULL;
      h->naddrs = 0;
      if (cl_fw_set_host_addrs(h, addrs, keep, ttl) == 0) {
        fw_txn *t = cl_fw_txn_new(0);
        int e2 = t ? cl_fw_txn_begin(f, t) : ENOMEM;
        if (!e2) e2 = cl_fw_build_set_refresh(f, t, v, r->entry);
        if (!e2) e2 = cl_fw_txn_finish(f, t);
        if (e2) {
          cl_fw_txn_free(t);
          free(h->addrs);
          h->addrs = old;
          h->naddrs = oldn;
          changed = 0;
        } else {
          free(old);
          t->orphan = 1;
          t->on_done = refresh_txn_done;
          cl_fw_submit(f, t);
        }
      } else {
        h->addrs = old;
        h->naddrs = oldn;
      }
    } else {
      h->ttl = ttl;
    }
  }
  cl_fw_emit_resolve(f, v->id, name, h->addrs, h->naddrs, err ? 0 : ttl, err, changed);
  cl_timer_start(f->loop, &r->timer, cl_now_ns() + (uint64_t)(clamp_ttl(f, ttl, err != NULL) * 1e9),
                 refresh_fire);
}

static void refresh_fire(cl_timer *t) {
  fw_refresh *r = (fw_refresh *)((char *)t - offsetof(fw_refresh, timer));
  fw *f = r->f;
  fw_vm *v = cl_fw_find_key(f, r->key);
  if (!v || !v->plan || !f->dns) return;
  if (cl_fw_dns_query(f, v->plan->entries[r->entry].hosts[r->host].name, refresh_answer, r) == 0)
    r->querying = 1;
  else
    cl_timer_start(f->loop, &r->timer, cl_now_ns() + 5000000000ull, refresh_fire);
}

/* Arms the refresh timers of a VM that was just attached or updated. */
void cl_fw_refresh_start(fw *f, fw_vm *v) {
  if (!v->plan || !f->dns) return;
  for (size_t i = 0; i < v->plan->nentries; i++) {
    fw_entry *e = &v->plan->entries[i];
    for (size_t h = 0; h < e->nhosts; h++) {
      fw_refresh *r = calloc(1, sizeof *r);
      if (!r) continue;
      r->f = f;
      memcpy(r->key, v->key, sizeof r->key);
      r->entry = i;
      r->host = h;
      r->next = v->refresh;
      v->refresh = r;
      double ttl = clamp_ttl(f, e->hosts[h].ttl, !e->hosts[h].resolved);
      cl_timer_start(f->loop, &r->timer, cl_now_ns() + (uint64_t)(ttl * 1e9), refresh_fire);
    }
  }
}
