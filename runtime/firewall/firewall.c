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

enum { OP_BASE, OP_ATTACH, OP_UPDATE, OP_DETACH, OP_DESTROY, OP_REFRESH, OP_DUMP };

/* luaL_error does not return; saying so lets the analyzers follow the error paths. */
static __attribute__((noreturn)) void oom(lua_State *L) {
  luaL_error(L, "firewall: out of memory");
  __builtin_unreachable();
}

static fw *check_fw(lua_State *L) {
  fw *f = luaL_checkudata(L, 1, FW_MT);
  if (f->closed) luaL_error(L, "attempt to use a closed firewall");
  return f;
}

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

static fw_vm *find_iface(fw *f, const char *iface) {
  if (!f->nbuckets || !iface[0]) return NULL;
  for (fw_vm *v = f->byif[strhash(iface) & (f->nbuckets - 1)]; v; v = v->next_if)
    if (strcmp(v->iface, iface) == 0) return v;
  return NULL;
}

static int reg_insert(fw *f, fw_vm *v) {
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

static void reg_remove(fw *f, fw_vm *v) {
  fw_vm **p = &f->bykey[strhash(v->key) & (f->nbuckets - 1)];
  while (*p && *p != v) p = &(*p)->next_key;
  if (*p) *p = v->next_key;
  p = &f->byif[strhash(v->iface) & (f->nbuckets - 1)];
  while (*p && *p != v) p = &(*p)->next_if;
  if (*p) *p = v->next_if;
  f->nvms--;
}

static void refresh_stop_all(fw *f, fw_vm *v);

static void vm_free(fw *f, fw_vm *v) {
  if (!v) return;
  refresh_stop_all(f, v);
  free(v->id);
  for (size_t i = 0; i < v->nsets; i++) free(v->sets[i]);
  free(v->sets);
  cl_fw_plan_free(v->plan);
  free(v);
}

static fw_vm *vm_new(const char *id) {
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

static int vm_add_set(fw_vm *v, const char *name) {
  char **n = realloc(v->sets, (v->nsets + 1) * sizeof *n);
  if (!n) return ENOMEM;
  v->sets = n;
  if (!(v->sets[v->nsets] = strdup(name))) return ENOMEM;
  v->nsets++;
  return 0;
}

/* The names of the sets the plan creates (as ruleset.c names them). */
static int vm_plan_sets(fw_vm *v) {
  const fw_plan *p = v->plan;
  for (size_t i = 0; i < p->nentries; i++) {
    const fw_entry *e = &p->entries[i];
    for (int fam = 4; fam <= 6; fam += 2) {
      if (!cl_fw_entry_uses_set(e, fam)) continue;
      char name[FW_NAME_MAX];
      if (vm_add_set(v, cl_fw_set_name(v, v->gen, e, fam, name)) != 0) return ENOMEM;
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
/* Spec validation                                                                            */

typedef struct pbox {
  fw_plan *p;
} pbox;

static int pbox_gc(lua_State *L) {
  pbox *b = lua_touserdata(L, 1);
  cl_fw_plan_free(b->p);
  b->p = NULL;
  return 0;
}

static const char PBOX_MT[] = "clawlua.firewall.plan";

static __attribute__((noreturn, format(printf, 3, 4))) void bad(lua_State *L, const char *path,
                                                                const char *fmt, ...) {
  char msg[300];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  cl_field_error(L, path, msg);
}

/* Parses "a.b.c.d[/n]" or an IPv6 address with optional prefix. */
static int parse_cidr(const char *s, fw_addr *a, int allow_prefix) {
  char buf[64];
  size_t n = strlen(s);
  if (n == 0 || n >= sizeof buf) return 0;
  memcpy(buf, s, n + 1);
  char *slash = strchr(buf, '/');
  int plen = -1;
  if (slash) {
    if (!allow_prefix) return 0;
    *slash = 0;
    const char *d = slash + 1;
    if (!*d || strlen(d) > 3) return 0;
    plen = 0;
    for (; *d; d++) {
      if (!isdigit((unsigned char)*d)) return 0;
      plen = plen * 10 + (*d - '0');
    }
  }
  memset(a, 0, sizeof *a);
  if (inet_pton(AF_INET, buf, a->a) == 1) {
    a->fam = 4;
    if (plen < 0) plen = 32;
    if (plen > 32) return 0;
  } else if (inet_pton(AF_INET6, buf, a->a) == 1) {
    a->fam = 6;
    if (plen < 0) plen = 128;
    if (plen > 128) return 0;
  } else {
    return 0;
  }
  a->plen = (uint8_t)plen;
  return 1;
}

static int looks_like_address(const char *s) {
  for (; *s; s++)
    if (!isxdigit((unsigned char)*s) && *s != '.' && *s != ':' && *s != '/') return 0;
  return 1;
}

static int valid_hostname(const char *s) {
  size_t n = strlen(s), label = 0;
  if (n == 0 || n > 253) return 0;
  int alpha = 0;
  for (const char *p = s; *p; p++) {
    char c = *p;
    if (c == '.') {
      if (label == 0) return 0;
      label = 0;
      continue;
    }
    if (!(isalnum((unsigned char)c) || c == '-' || c == '_')) return 0;
    if (isalpha((unsigned char)c)) alpha = 1;
    if (++label > 63) return 0;
  }
  return alpha;
}

static const char *const ENTRY_FIELDS[] = {"cidr", "host", "proto", "port", NULL};
static const char *const DIR_FIELDS[] = {"policy", "allow", "deny", "rate", NULL};
static const char *const RATE_FIELDS[] = {"packets", "bytes", "burst", NULL};
static const char *const LOG_FIELDS[] = {"rate", "burst", NULL};
static const char *const SPEC_FIELDS[] = {"iface",   "mac", "ip",  "ip6", "egress",
                                          "ingress", "dns", "log", NULL};

/* Like cl_check_fields, naming the nested path of the table. */
static void check_fields(lua_State *L, int idx, const char *path, const char *const known[]) {
  idx = lua_absindex(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    int ok = 0;
    for (const char *const *p = known; k && *p; p++)
      if (strcmp(*p, k) == 0) ok = 1;
    if (!ok) {
      char name[160];
      if (k)
        snprintf(name, sizeof name, "%s%s%s", path, *path ? "." : "", k);
      else
        snprintf(name, sizeof name, "%s", *path ? path : "spec");
      cl_field_error(L, name, k ? "unknown field" : "string keys expected");
    }
  }
}

typedef struct addr_acc {
  size_t total;
} addr_acc;

static void push_addr(lua_State *L, const char *path, fw_addr **arr, size_t *n, const fw_addr *a,
                      addr_acc *acc) {
  if (++acc->total > FW_MAX_ADDRS) {
    bad(L, path, "more than %d addresses in the spec", FW_MAX_ADDRS);
  }
  fw_addr *na = realloc(*arr, (*n + 1) * sizeof *na);
  if (!na) oom(L);
  *arr = na;
  na[(*n)++] = *a;
}

static void add_host(lua_State *L, const char *path, fw_entry *e, const char *s, size_t *hosts) {
  if (!valid_hostname(s)) bad(L, path, "invalid host name '%s'", s);
  if (++*hosts > FW_MAX_HOSTS) bad(L, path, "more than %d domain names", FW_MAX_HOSTS);
  fw_host *h = realloc(e->hosts, (e->nhosts + 1) * sizeof *h);
  if (!h) oom(L);
  e->hosts = h;
  memset(&h[e->nhosts], 0, sizeof *h);
  if (!(h[e->nhosts].name = strdup(s))) oom(L);
  e->nhosts++;
}

/* cidr/host field: a string or a list of strings. */
static void read_addrs(lua_State *L, int idx, const char *path, fw_entry *e, int hosts_field,
                       addr_acc *acc, size_t *hosts) {
  idx = lua_absindex(L, idx);
  int n = 1, list = lua_type(L, idx) == LUA_TTABLE;
  if (list) {
    n = (int)lua_rawlen(L, idx);
    if (n == 0) bad(L, path, "empty list");
  } else if (lua_type(L, idx) != LUA_TSTRING) {
    bad(L, path, "string or list of strings expected, got %s", luaL_typename(L, idx));
  }
  for (int i = 1; i <= n; i++) {
    char ipath[160];
    if (list) {
      lua_rawgeti(L, idx, i);
      snprintf(ipath, sizeof ipath, "%s[%d]", path, i);
    } else {
      lua_pushvalue(L, idx);
      snprintf(ipath, sizeof ipath, "%s", path);
    }
    if (lua_type(L, -1) != LUA_TSTRING)
      bad(L, ipath, "string expected, got %s", luaL_typename(L, -1));
    const char *s = lua_tostring(L, -1);
    if (hosts_field) {
      add_host(L, ipath, e, s, hosts);
    } else {
      fw_addr a;
      if (!parse_cidr(s, &a, 1)) bad(L, ipath, "invalid CIDR '%s'", s);
      if (a.fam == 4 && a.plen == 32 && strcmp(s, FW_METADATA_ADDR) == 0) e->metadata = 1;
      if (a.fam == 4 && a.plen == 32 && strcmp(s, FW_METADATA_ADDR "/32") == 0) e->metadata = 1;
      push_addr(L, ipath, &e->addrs, &e->naddrs, &a, acc);
    }
    lua_pop(L, 1);
  }
}

static void read_port(lua_State *L, int idx, const char *path, fw_entry *e) {
  long a, b;
  if (lua_type(L, idx) == LUA_TNUMBER) {
    if (!lua_isinteger(L, idx)) bad(L, path, "port %s is not an integer", lua_tostring(L, idx));
    a = b = (long)lua_tointeger(L, idx);
    if (a < 1 || a > 65535) bad(L, path, "port %s out of range 1-65535", lua_tostring(L, idx));
  } else if (lua_type(L, idx) == LUA_TSTRING) {
    const char *s = lua_tostring(L, idx);
    char *end;
    a = strtol(s, &end, 10);
    b = a;
    if (end != s && *end == '-') {
      const char *s2 = end + 1;
      b = strtol(s2, &end, 10);
      if (end == s2) a = -1;
    }
    if (end == s || *end || a < 1 || b > 65535 || a > b)
      bad(L, path, "invalid port or range '%s' (1-65535, low-high)", s);
  } else {
    bad(L, path, "integer or \"low-high\" string expected, got %s", luaL_typename(L, idx));
  }
  e->pfrom = (uint16_t)a;
  e->pto = (uint16_t)b;
}

static fw_entry *new_entry(lua_State *L, fw_plan *p) {
  fw_entry *n = realloc(p->entries, (p->nentries + 1) * sizeof *n);
  if (!n) oom(L);
  p->entries = n;
  fw_entry *e = &n[p->nentries++];
  memset(e, 0, sizeof *e);
  return e;
}

static void read_entry(lua_State *L, int idx, const char *path, fw_plan *p, int dir, int action,
                       int index, addr_acc *acc, size_t *hosts) {
  fw_entry *e = new_entry(L, p);
  e->dir = (uint8_t)dir;
  e->action = (uint8_t)action;
  e->index = index;
  snprintf(e->label, sizeof e->label, "%s.%s[%d]", dir == FW_EGRESS ? "egress" : "ingress",
           action == FW_ALLOW ? "allow" : "deny", index);
  idx = lua_absindex(L, idx);
  char fpath[200];
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *s = lua_tostring(L, idx);
    if (looks_like_address(s))
      read_addrs(L, idx, path, e, 0, acc, hosts);
    else
      read_addrs(L, idx, path, e, 1, acc, hosts);
    return;
  }
  if (lua_type(L, idx) != LUA_TTABLE)
    bad(L, path, "table or string expected, got %s", luaL_typename(L, idx));
  check_fields(L, idx, path, ENTRY_FIELDS);
  if (lua_getfield(L, idx, "cidr") != LUA_TNIL) {
    snprintf(fpath, sizeof fpath, "%s.cidr", path);
    read_addrs(L, -1, fpath, e, 0, acc, hosts);
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "host") != LUA_TNIL) {
    snprintf(fpath, sizeof fpath, "%s.host", path);
    read_addrs(L, -1, fpath, e, 1, acc, hosts);
  }
  lua_pop(L, 1);
  e->any = e->naddrs == 0 && e->nhosts == 0;
  if (lua_getfield(L, idx, "proto") != LUA_TNIL) {
    snprintf(fpath, sizeof fpath, "%s.proto", path);
    if (lua_type(L, -1) != LUA_TSTRING)
      bad(L, fpath, "string expected, got %s", luaL_typename(L, -1));
    const char *s = lua_tostring(L, -1);
    if (strcmp(s, "tcp") == 0)
      e->proto = FW_P_TCP;
    else if (strcmp(s, "udp") == 0)
      e->proto = FW_P_UDP;
    else if (strcmp(s, "icmp") == 0)
      e->proto = FW_P_ICMP;
    else if (strcmp(s, "any") == 0)
      e->proto = 0;
    else
      bad(L, fpath, "unknown protocol '%s' (tcp, udp, icmp or any)", s);
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "port") != LUA_TNIL) {
    snprintf(fpath, sizeof fpath, "%s.port", path);
    if (e->proto == FW_P_ICMP) bad(L, fpath, "a port needs proto tcp, udp or any");
    read_port(L, -1, fpath, e);
  }
  lua_pop(L, 1);
  if (e->any) e->metadata = 0;
}

static void read_list(lua_State *L, int idx, const char *path, fw_plan *p, int dir, int action,
                      addr_acc *acc, size_t *hosts) {
  if (lua_type(L, idx) != LUA_TTABLE) bad(L, path, "list expected, got %s", luaL_typename(L, idx));
  idx = lua_absindex(L, idx);
  lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) { /* only a sequence: a string key is a mistake */
    lua_pop(L, 1);
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 || lua_tointeger(L, -1) > n) {
      lua_pop(L, 1);
      bad(L, path, "list expected (found a non-sequence key)");
    }
  }
  if (n > FW_MAX_ENTRIES) bad(L, path, "more than %d entries", FW_MAX_ENTRIES);
  for (lua_Integer i = 1; i <= n; i++) {
    char ipath[160];
    snprintf(ipath, sizeof ipath, "%s[%d]", path, (int)i);
    lua_rawgeti(L, idx, i);
    read_entry(L, -1, ipath, p, dir, action, (int)i, acc, hosts);
    lua_pop(L, 1);
  }
}

static uint64_t read_count(lua_State *L, int idx, const char *field, const char *path) {
  uint64_t v = 0;
  if (lua_getfield(L, idx, field) != LUA_TNIL) {
    char fpath[200];
    snprintf(fpath, sizeof fpath, "%s.%s", path, field);
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1)
      bad(L, fpath, "positive integer expected, got %s", luaL_tolstring(L, -1, NULL));
    v = (uint64_t)lua_tointeger(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static void read_dir(lua_State *L, int idx, const char *name, fw_plan *p, int dir, addr_acc *acc,
                     size_t *hosts) {
  p->accept[dir] = 0;
  if (lua_getfield(L, idx, name) == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  int t = lua_gettop(L);
  if (lua_type(L, t) != LUA_TTABLE) bad(L, name, "table expected, got %s", luaL_typename(L, t));
  check_fields(L, t, name, DIR_FIELDS);
  char path[64];
  if (lua_getfield(L, t, "policy") != LUA_TNIL) {
    snprintf(path, sizeof path, "%s.policy", name);
    const char *s = lua_tostring(L, -1);
    if (lua_type(L, -1) != LUA_TSTRING || (strcmp(s, "drop") != 0 && strcmp(s, "accept") != 0))
      bad(L, path, "\"drop\" or \"accept\" expected, got '%s'", luaL_tolstring(L, -1, NULL));
    p->accept[dir] = strcmp(s, "accept") == 0;
  }
  lua_settop(L, t);
  if (lua_getfield(L, t, "deny") != LUA_TNIL) {
    snprintf(path, sizeof path, "%s.deny", name);
    read_list(L, -1, path, p, dir, FW_DENY, acc, hosts);
  }
  lua_settop(L, t);
  if (lua_getfield(L, t, "allow") != LUA_TNIL) {
    snprintf(path, sizeof path, "%s.allow", name);
    read_list(L, -1, path, p, dir, FW_ALLOW, acc, hosts);
  }
  lua_settop(L, t);
  if (lua_getfield(L, t, "rate") != LUA_TNIL) {
    snprintf(path, sizeof path, "%s.rate", name);
    if (lua_type(L, -1) != LUA_TTABLE) bad(L, path, "table expected, got %s", luaL_typename(L, -1));
    check_fields(L, -1, path, RATE_FIELDS);
    p->rate[dir].packets = read_count(L, lua_gettop(L), "packets", path);
    p->rate[dir].bytes = read_count(L, lua_gettop(L), "bytes", path);
    p->rate[dir].burst = read_count(L, lua_gettop(L), "burst", path);
    if (!p->rate[dir].packets && !p->rate[dir].bytes)
      bad(L, path, "needs packets or bytes (per second)");
  }
  lua_settop(L, t - 1);
}

static void valid_iface(lua_State *L, const char *s) {
  size_t n = strlen(s);
  if (n == 0) bad(L, "iface", "empty interface name");
  if (n >= IFNAMSIZ) {
    char msg[200];
    snprintf(msg, sizeof msg, "interface name '%s' longer than %d bytes", s, IFNAMSIZ - 1);
    cl_field_error(L, "iface", msg);
  }
  if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
    bad(L, "iface", "invalid interface name '%s'", s);
  for (const char *c = s; *c; c++)
    if (*c == '/' || *c == ':' || isspace((unsigned char)*c) || !isprint((unsigned char)*c))
      bad(L, "iface", "invalid interface name '%s'", s);
}

static int hexval(char c) {
  return c >= '0' && c <= '9'   ? c - '0'
         : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                : -1;
}

/* aa:bb:cc:dd:ee:ff, exactly. */
static int parse_mac(const char *s, uint8_t *mac) {
  if (strlen(s) != 17) return 0;
  for (int i = 0; i < 6; i++) {
    int hi = hexval(s[3 * i]), lo = hexval(s[3 * i + 1]);
    if (hi < 0 || lo < 0 || (i < 5 && s[3 * i + 2] != ':')) return 0;
    mac[i] = (uint8_t)(hi << 4 | lo);
  }
  return 1;
}

/* Validates the spec at idx into a plan, held by a box pushed on the stack (freed by the GC
 * if anything raises). */
static fw_plan *parse_spec(lua_State *L, int idx, fw *f) {
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  pbox *box = lua_newuserdatauv(L, sizeof *box, 0);
  box->p = NULL;
  luaL_setmetatable(L, PBOX_MT);
  fw_plan *p = box->p = calloc(1, sizeof *p);
  if (!p) oom(L);
  check_fields(L, idx, "", SPEC_FIELDS);

  if (lua_getfield(L, idx, "iface") != LUA_TSTRING)
    bad(L, "iface", "string expected, got %s", luaL_typename(L, -1));
  valid_iface(L, lua_tostring(L, -1));
  snprintf(p->iface, sizeof p->iface, "%s", lua_tostring(L, -1));
  lua_pop(L, 1);

  if (lua_getfield(L, idx, "mac") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING || !parse_mac(lua_tostring(L, -1), p->mac))
      bad(L, "mac", "invalid MAC address '%s' (aa:bb:cc:dd:ee:ff)", luaL_tolstring(L, -1, NULL));
    p->has_mac = 1;
  }
  lua_settop(L, idx + 1);
  if (lua_getfield(L, idx, "ip") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING || !parse_cidr(lua_tostring(L, -1), &p->ip4, 0) ||
        p->ip4.fam != 4)
      bad(L, "ip", "invalid IPv4 address '%s'", luaL_tolstring(L, -1, NULL));
    p->has4 = 1;
  }
  lua_settop(L, idx + 1);
  if (lua_getfield(L, idx, "ip6") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING || !parse_cidr(lua_tostring(L, -1), &p->ip6, 0) ||
        p->ip6.fam != 6)
      bad(L, "ip6", "invalid IPv6 address '%s'", luaL_tolstring(L, -1, NULL));
    p->has6 = 1;
  }
  lua_settop(L, idx + 1);
  if (!p->has4 && !p->has6) bad(L, "ip", "the VM needs an address (ip and/or ip6)");

  addr_acc acc = {0};
  size_t hosts = 0;
  if (lua_getfield(L, idx, "dns") != LUA_TNIL) {
    fw_entry *e = new_entry(L, p);
    e->dir = FW_EGRESS;
    e->action = FW_DNS;
    e->proto = FW_P_TCP | FW_P_UDP;
    e->pfrom = e->pto = 53;
    snprintf(e->label, sizeof e->label, "egress.dns");
    read_addrs(L, -1, "dns", e, 0, &acc, &hosts);
    for (size_t i = 0; i < e->naddrs; i++)
      if (e->addrs[i].plen != (e->addrs[i].fam == 4 ? 32 : 128))
        bad(L, "dns", "resolvers are addresses, not networks");
  }
  lua_settop(L, idx + 1);
  read_dir(L, idx, "egress", p, FW_EGRESS, &acc, &hosts);
  read_dir(L, idx, "ingress", p, FW_INGRESS, &acc, &hosts);

  int lt = lua_getfield(L, idx, "log");
  if (lt == LUA_TBOOLEAN) {
    p->log = lua_toboolean(L, -1);
  } else if (lt == LUA_TTABLE) {
    check_fields(L, -1, "log", LOG_FIELDS);
    p->log = 1;
    p->log_rate = (uint32_t)read_count(L, lua_gettop(L), "rate", "log");
    p->log_burst = (uint32_t)read_count(L, lua_gettop(L), "burst", "log");
  } else if (lt != LUA_TNIL) {
    bad(L, "log", "boolean or table expected, got %s", luaL_typename(L, -1));
  }
  if (p->log && f->log_group < 0) bad(L, "log", "the firewall was opened without log_group");
  lua_settop(L, idx + 1);
  return p;
}

/* VM ids: printable ASCII without spaces, 1..FW_ID_MAX bytes. */
static const char *check_id(lua_State *L, int arg) {
  size_t n;
  const char *id = luaL_checklstring(L, arg, &n);
  if (n == 0) luaL_argerror(L, arg, "empty vm id");
  if (n > FW_ID_MAX)
    luaL_argerror(L, arg, lua_pushfstring(L, "vm id longer than %d bytes", FW_ID_MAX));
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)id[i];
    if (c <= 0x20 || c >= 0x7f)
      luaL_argerror(
          L, arg,
          lua_pushfstring(L,
                          "invalid byte 0x%s at %d of vm id (printable "
                          "ASCII without spaces expected)",
                          (char[3]){"0123456789abcdef"[c >> 4], "0123456789abcdef"[c & 15], 0},
                          (int)i + 1));
  }
  return id;
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

static void push_addr_list(lua_State *L, const fw_addr *a, size_t n) {
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    char s[INET6_ADDRSTRLEN];
    inet_ntop(a[i].fam == 4 ? AF_INET : AF_INET6, a[i].a, s, sizeof s);
    lua_pushstring(L, s);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

static void emit_resolve(fw *f, const char *vm, const char *name, const fw_addr *a, size_t n,
                         uint32_t ttl, const char *err, int changed) {
  lua_State *L = f->L;
  if (!L) return;
  lua_createtable(L, 0, 5);
  lua_pushstring(L, name);
  lua_setfield(L, -2, "host");
  push_addr_list(L, a, n);
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

static int set_host_addrs(fw_host *h, const fw_addr *a, size_t n, uint32_t ttl) {
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
      if (set_host_addrs(h, addrs, keep, ttl) == 0) {
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
  emit_resolve(f, v->id, name, h->addrs, h->naddrs, err ? 0 : ttl, err, changed);
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
static void refresh_start(fw *f, fw_vm *v) {
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

/* ------------------------------------------------------------------------------------------ */
/* Operations: a transaction plus what to do with the registry once the kernel answered       */

typedef struct op_ctx {
  int kind;
  fw_vm **vms; /* attach: new VMs; update: the replacement; detach: keys in vms[i]->key */
  size_t n;
} op_ctx;

static void ctx_free(fw *f, op_ctx *c) {
  if (!c) return;
  for (size_t i = 0; i < c->n; i++) vm_free(f, c->vms[i]);
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
        if (reg_insert(f, v) == 0) {
          c->vms[i] = NULL;
          refresh_start(f, v);
        }
        break;
      case OP_UPDATE:
        if (old) {
          reg_remove(f, old);
          vm_free(f, old);
        }
        if (reg_insert(f, v) == 0) {
          c->vms[i] = NULL;
          refresh_start(f, v);
        }
        break;
      case OP_DETACH:
        if (old) {
          reg_remove(f, old);
          vm_free(f, old);
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
          vm_free(f, v);
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
typedef struct tbox {
  fw_txn *t;
} tbox;
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

static tbox *push_tbox(lua_State *L, fw_txn *t) {
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
static int run_txn(lua_State *L, fw *f, int bidx, lua_KFunction k) {
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
static fw_txn *resumed_txn(lua_State *L, lua_KContext ctx, int bidx) {
  if (ctx) cl_wait_resumed(L, ctx);
  tbox *b = lua_touserdata(L, bidx);
  return b->t;
}

static int txn_result(lua_State *L, fw *f, fw_txn *t, const char *op, const char *id) {
  if (f->closed && !t->done) return cl_failf(L, ECANCELED, "firewall: %s: firewall closed", op);
  if (t->err) {
    if (id) return cl_failf(L, t->err, "firewall: %s '%s': %s", op, id, t->errmsg);
    return cl_failf(L, t->err, "firewall: %s: %s", op, t->errmsg);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static fw_txn *new_batch(lua_State *L, fw *f, int kind) {
  fw_txn *t = cl_fw_txn_new(0);
  op_ctx *c = calloc(1, sizeof *c);
  if (!t || !c || cl_fw_txn_begin(f, t) != 0) {
    free(c);
    cl_fw_txn_free(t);
    oom(L);
  }
  c->kind = kind;
  t->ctx = c;
  t->on_done = op_done;
  push_tbox(L, t);
  return t;
}

static void ctx_add(lua_State *L, fw_txn *t, fw_vm *v) {
  op_ctx *c = t->ctx;
  fw_vm **n = realloc(c->vms, (c->n + 1) * sizeof(void *));
  if (!n) {
    vm_free(NULL, v);
    oom(L);
  }
  c->vms = n;
  c->vms[c->n++] = v;
}

static void finish_batch(lua_State *L, fw *f, fw_txn *t, int err) {
  if (!err) err = cl_fw_txn_finish(f, t);
  if (err) luaL_error(L, "firewall: cannot build the batch: %s", strerror(err));
}

/* ------------------------------------------------------------------------------------------ */
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
    set_host_addrs(s->h, addrs, n, ttl);
  emit_resolve(f, s->vm, name, s->h->addrs, s->h->naddrs, err ? 0 : ttl, err, 1);
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
  if (!r->slots) oom(L);
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
  fw_txn *t = resumed_txn(L, ctx, 6);
  const char *id = lua_tostring(L, 2);
  int update = lua_toboolean(L, lua_upvalueindex(1));
  int n = txn_result(L, f, t, update ? "update" : "attach", id);
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
  fw_vm *other = find_iface(f, box->p->iface);
  if (other && other != old) {
    const char *msg =
        lua_pushfstring(L, "interface '%s' is used by vm '%s'", box->p->iface, other->id);
    cl_field_error(L, "iface", msg);
  }
  fw_txn *t = new_batch(L, f, update ? OP_UPDATE : OP_ATTACH);
  fw_vm *v = vm_new(id);
  if (!v) oom(L);
  ctx_add(L, t, v);
  v->plan = box->p;
  box->p = NULL;
  snprintf(v->iface, sizeof v->iface, "%s", v->plan->iface);
  v->gen = old ? old->gen + 1 : 0;
  if (vm_plan_sets(v) != 0) oom(L);
  finish_batch(L, f, t, cl_fw_build_attach(f, t, v, v->plan, update, old));
  return run_txn(L, f, 6, attach_done_k);
}

static int attach_common(lua_State *L) {
  fw *f = check_fw(L);
  const char *id = check_id(L, 2);
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
  fw_plan *p = parse_spec(L, 3, f); /* pushes the plan box at 4 */
  fw_vm *other = find_iface(f, p->iface);
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
  parse_spec(L, 2, f); /* leaves the box on top */
  return 1;
}

/* stack: 1 fw, 2 specs, 3 ids (sorted list), 4 boxes (id -> plan box), 5 resolving, 6 tbox */
static int many_done_k(lua_State *L, int status, lua_KContext ctx) {
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = resumed_txn(L, ctx, 6);
  int n = txn_result(L, f, t, "attach_many", NULL);
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
  fw_txn *t = new_batch(L, f, OP_ATTACH); /* 6 */
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
    if (find_iface(f, box->p->iface))
      luaL_error(L, "vm '%s': bad field 'iface' (interface '%s' is used by vm '%s')", id,
                 box->p->iface, find_iface(f, box->p->iface)->id);
    lua_rawgeti(L, 3, i);
    fw_vm *v = vm_new(lua_tostring(L, -1));
    lua_pop(L, 1);
    if (!v) oom(L);
    ctx_add(L, t, v);
    v->plan = box->p;
    box->p = NULL;
    snprintf(v->iface, sizeof v->iface, "%s", v->plan->iface);
    if (vm_plan_sets(v) != 0) oom(L);
    err = cl_fw_build_attach(f, t, v, v->plan, 0, NULL);
  }
  finish_batch(L, f, t, err);
  return run_txn(L, f, 6, many_done_k);
}

static int l_attach_many(lua_State *L) {
  fw *f = check_fw(L);
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
    const char *id = check_id(L, 8);
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
    fw_vm *other = find_iface(f, iface);
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
  fw_txn *t = resumed_txn(L, ctx, 3);
  return txn_result(L, f, t, "detach_many", NULL);
}

static int l_detach_many(lua_State *L) {
  fw *f = check_fw(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  fw_txn *t = new_batch(L, f, OP_DETACH); /* 3 */
  lua_Integer n = (lua_Integer)lua_rawlen(L, 2);
  int err = 0;
  for (lua_Integer i = 1; i <= n && !err; i++) {
    lua_rawgeti(L, 2, i);
    const char *id = check_id(L, lua_gettop(L));
    char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
    cl_fw_vm_names(id, key, base);
    fw_vm *v = cl_fw_find_key(f, key);
    if (!v || strcmp(v->id, id) != 0)
      return cl_failf(L, ENOENT, "firewall: detach_many '%s': not attached", id);
    fw_vm *k = vm_new(id);
    if (!k) oom(L);
    ctx_add(L, t, k);
    err = cl_fw_build_detach(f, t, v);
    lua_pop(L, 1);
  }
  finish_batch(L, f, t, err);
  return run_txn(L, f, 3, detach_many_k);
}

/* ------------------------------------------------------------------------------------------ */
/* detach / reconcile / destroy                                                               */

static int detach_k(lua_State *L, int status, lua_KContext ctx) {
  /* stack: 1 fw, 2 id, 3 tbox, [4 wait] */
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = resumed_txn(L, ctx, 3);
  return txn_result(L, f, t, "detach", lua_tostring(L, 2));
}

static int l_detach(lua_State *L) {
  fw *f = check_fw(L);
  const char *id = check_id(L, 2);
  lua_settop(L, 2);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(id, key, base);
  fw_vm *v = cl_fw_find_key(f, key);
  if (!v || strcmp(v->id, id) != 0)
    return cl_failf(L, ENOENT, "firewall: detach '%s': not attached", id);
  fw_txn *t = new_batch(L, f, OP_DETACH);
  fw_vm *k = vm_new(id);
  if (!k) oom(L);
  ctx_add(L, t, k);
  finish_batch(L, f, t, cl_fw_build_detach(f, t, v));
  lua_createtable(L, 0, 1);
  lua_pushstring(L, v->iface);
  lua_setfield(L, -2, "iface");
  cl_audit_emit(L, "fw.detach", id, 0, lua_gettop(L));
  lua_pop(L, 1);
  return run_txn(L, f, 3, detach_k);
}

static int reconcile_done_k(lua_State *L, int status, lua_KContext ctx) {
  /* stack: 1 fw, 2 live, 3 removed ids, 4 tbox, [5 wait] */
  fw *f = lua_touserdata(L, 1);
  fw_txn *t = resumed_txn(L, ctx, 4);
  int n = txn_result(L, f, t, "reconcile", NULL);
  if (n != 1) return n;
  lua_pushvalue(L, 3);
  return 1;
}

static int l_reconcile(lua_State *L) {
  fw *f = check_fw(L);
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
  lua_newtable(L);                        /* 3: removed ids */
  fw_txn *t = new_batch(L, f, OP_DETACH); /* 4 */
  int n = 0, err = 0;
  for (size_t b = 0; b < f->nbuckets && !err; b++) {
    for (fw_vm *v = f->bykey[b]; v && !err; v = v->next_key) {
      lua_pushstring(L, v->id);
      int live = lua_rawget(L, 2) != LUA_TNIL;
      lua_pop(L, 1);
      if (live) continue;
      fw_vm *k = vm_new(v->id);
      if (!k) oom(L);
      ctx_add(L, t, k);
      err = cl_fw_build_detach(f, t, v);
      lua_pushstring(L, v->id);
      lua_rawseti(L, 3, ++n);
    }
  }
  if (n == 0) {
    lua_settop(L, 3);
    return 1;
  }
  finish_batch(L, f, t, err);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, 3);
  lua_setfield(L, -2, "removed");
  cl_audit_emit(L, "fw.reconcile", NULL, 0, lua_gettop(L));
  lua_pop(L, 1);
  return run_txn(L, f, 4, reconcile_done_k);
}

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
    fw_txn *t = resumed_txn(L, ctx, 6);
    lua_settop(L, 6);
    if (t->err || f->closed) return txn_result(L, f, t, "counters", lua_tostring(L, 2));
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
  if (!t) oom(L);
  push_tbox(L, t);
  if (cl_fw_dump_request(f, t, NFT_MSG_GETRULE, sfx[step] == 'a' ? NFPROTO_ARP : NFPROTO_INET,
                         chain, NULL) != 0)
    oom(L);
  counters_acc *acc = lua_touserdata(L, 4);
  acc->L = L;
  acc->tidx = 3;
  t->on_msg = rule_cb;
  t->arg = acc;
  return run_txn(L, f, 6, counters_k);
}

static int l_counters(lua_State *L) {
  fw *f = check_fw(L);
  const char *id = check_id(L, 2);
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
  fw *f = check_fw(L);
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
            push_addr_list(L, e->hosts[h].addrs, e->hosts[h].naddrs);
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
      fw_vm *v = vm_new(id);
      /* Only chains whose name is what the id gives are ours. */
      if (v && strncmp(name, v->base, n - 2) == 0 && strlen(v->base) == n - 2 &&
          !cl_fw_find_key(a->f, v->key)) {
        if (reg_insert(a->f, v) != 0) vm_free(a->f, v);
      } else {
        vm_free(a->f, v);
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
      vm_add_set(v, name);
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
    reg_remove(a->f, v);
    snprintf(v->iface, sizeof v->iface, "%s", ifn);
    reg_insert(a->f, v);
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
    fw_txn *t = resumed_txn(L, ctx, 5);
    lua_settop(L, 5);
    if (t->err || f->closed) {
      int n = txn_result(L, f, t, "open", NULL);
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
    if (!t) oom(L);
    push_tbox(L, t);
    err = cl_fw_txn_begin(f, t);
    if (!err) err = cl_fw_build_base(f, t);
    if (!err) err = cl_fw_txn_finish(f, t);
    break;
  case 1:
  case 2:
  case 3:
    t = cl_fw_txn_new(1);
    if (!t) oom(L);
    push_tbox(L, t);
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
  return run_txn(L, f, 5, open_k);
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
      vm_free(f, v);
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

static int fw_gc(lua_State *L) {
  fw *f = luaL_checkudata(L, 1, FW_MT);
  fw_release(L, f);
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
  fw_txn *t = resumed_txn(L, ctx, 2);
  int n = txn_result(L, f, t, "destroy", NULL);
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
  fw *f = check_fw(L);
  lua_settop(L, 1);
  fw_txn *t = new_batch(L, f, OP_DESTROY);
  finish_batch(L, f, t, cl_fw_build_delete_table(f, t));
  return run_txn(L, f, 2, destroy_k);
}

static int l_stats(lua_State *L) {
  fw *f = check_fw(L);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)f->nvms);
  lua_setfield(L, -2, "vms");
  lua_pushinteger(L, (lua_Integer)f->batches);
  lua_setfield(L, -2, "batches");
  lua_pushinteger(L, (lua_Integer)f->messages);
  lua_setfield(L, -2, "messages");
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
  const char *id = check_id(L, 1);
  char key[FW_HASH_HEX + 1], base[FW_BASE_MAX];
  cl_fw_vm_names(id, key, base);
  lua_pushstring(L, base);
  lua_pushstring(L, key);
  return 2;
}

int cl_fw_resolve(lua_State *L);

static const luaL_Reg fw_methods[] = {
    {"detach", l_detach},
    {"reconcile", l_reconcile},
    {"counters", l_counters},
    {"list", l_list},
    {"close", l_close},
    {"destroy", l_destroy},
    {"stats", l_stats},
    {"resolve", cl_fw_resolve},
    {"attach_many", l_attach_many},
    {"detach_many", l_detach_many},
    {NULL, NULL},
};

int luaopen_clawlua_firewall(lua_State *L) {
  if (cl_entry_redirect(L, "firewall")) return 1;
  luaL_newmetatable(L, PBOX_MT);
  lua_pushcfunction(L, pbox_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, TBOX_MT);
  lua_pushcfunction(L, tbox_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, RBOX_MT);
  lua_pushcfunction(L, rbox_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);

  luaL_newmetatable(L, FW_MT);
  lua_newtable(L);
  luaL_setfuncs(L, fw_methods, 0);
  lua_pushboolean(L, 0);
  lua_pushcclosure(L, attach_common, 1);
  lua_setfield(L, -2, "attach");
  lua_pushboolean(L, 1);
  lua_pushcclosure(L, attach_common, 1);
  lua_setfield(L, -2, "update");
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, fw_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, fw_gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);

  lua_newtable(L);
  lua_pushcfunction(L, l_open);
  lua_setfield(L, -2, "open");
  lua_pushcfunction(L, l_names);
  lua_setfield(L, -2, "names");
  lua_pushinteger(L, FW_ID_MAX);
  lua_setfield(L, -2, "max_id");
  return 1;
}
