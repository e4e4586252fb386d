/*
 * Validation of a VM spec (the Lua table of fw:attach/fw:update) into a fw_plan, complete before
 * anything is sent: a bad field raises an error naming it ("bad field 'egress.allow[2].port'
 * (...)"). Also the check of VM ids.
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
/* Spec validation                                                                            */

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

typedef struct addr_acc {
  size_t total;
} addr_acc;

static void push_addr(lua_State *L, const char *path, fw_addr **arr, size_t *n, const fw_addr *a,
                      addr_acc *acc) {
  if (++acc->total > FW_MAX_ADDRS) {
    bad(L, path, "more than %d addresses in the spec", FW_MAX_ADDRS);
  }
  fw_addr *na = realloc(*arr, (*n + 1) * sizeof *na);
  if (!na) cl_fw_oom(L);
  *arr = na;
  na[(*n)++] = *a;
}

static void add_host(lua_State *L, const char *path, fw_entry *e, const char *s, size_t *hosts) {
  if (!valid_hostname(s)) bad(L, path, "invalid host name '%s'", s);
  if (++*hosts > FW_MAX_HOSTS) bad(L, path, "more than %d domain names", FW_MAX_HOSTS);
  fw_host *h = realloc(e->hosts, (e->nhosts + 1) * sizeof *h);
  if (!h) cl_fw_oom(L);
  e->hosts = h;
  memset(&h[e->nhosts], 0, sizeof *h);
  if (!(h[e->nhosts].name = strdup(s))) cl_fw_oom(L);
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
  if (!n) cl_fw_oom(L);
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
  cl_check_fields_at(L, idx, path, "spec", ENTRY_FIELDS);
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
  cl_check_fields_at(L, t, name, "spec", DIR_FIELDS);
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
    cl_check_fields_at(L, -1, path, "spec", RATE_FIELDS);
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

/* Validates the spec at idx into a plan, held by a box pushed on the stack (freed by the GC
 * if anything raises). */
fw_plan *cl_fw_parse_spec(lua_State *L, int idx, fw *f) {
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  pbox *box = lua_newuserdatauv(L, sizeof *box, 0);
  box->p = NULL;
  luaL_setmetatable(L, PBOX_MT);
  fw_plan *p = box->p = calloc(1, sizeof *p);
  if (!p) cl_fw_oom(L);
  cl_check_fields_at(L, idx, "", "spec", SPEC_FIELDS);

  if (lua_getfield(L, idx, "iface") != LUA_TSTRING)
    bad(L, "iface", "string expected, got %s", luaL_typename(L, -1));
  valid_iface(L, lua_tostring(L, -1));
  snprintf(p->iface, sizeof p->iface, "%s", lua_tostring(L, -1));
  lua_pop(L, 1);

  if (lua_getfield(L, idx, "mac") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING || !cl_parse_mac(lua_tostring(L, -1), p->mac))
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
    cl_check_fields_at(L, -1, "log", "spec", LOG_FIELDS);
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
const char *cl_fw_check_id(lua_State *L, int arg) {
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

void cl_fw_spec_register(lua_State *L) {
  static const cl_class cls = {PBOX_MT, NULL, pbox_gc, NULL};
  cl_class_register(L, &cls);
}
