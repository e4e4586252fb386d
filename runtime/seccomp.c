/*
 * clawlua.seccomp: seccomp-bpf filters built from Lua tables (and, through the Lua layer, from
 * OCI/Docker and Firecracker JSON profiles), compiled by libseccomp, installed in children the
 * runtime starts (proc.spawn and jail.spawn: last thing before exec), exported as raw BPF, as
 * libseccomp's PFC text and as the filter file Firecracker's --seccomp-filter reads; and a
 * supervisor that hands syscalls trapped by `notify` rules to a Lua function on the loop.
 *
 * A filter handle keeps its rules and the BPF compiled from them (compiled when the handle is
 * made, so every libseccomp complaint is an error at construction, never at spawn time).
 * Installation in the child is a raw seccomp(2) call on that program: async-signal-safe, no
 * allocation between clone and exec.
 */
#include "clawlua.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define FILTER_MT "clawlua.seccomp.filter"
#define PREP_MT   "clawlua.seccomp.prepared"
#define SUPER_MT  "clawlua.seccomp.supervisor"

#define MAX_RULES              16384
#define MAX_ARCH               4
#define MAX_PENDING_LIMIT      4096
#define DEFAULT_MAX_PENDING    64
#define DEFAULT_NOTIFY_TIMEOUT 5.0
#define HANDOFF_TIMEOUT_MS     10000
#define MAX_READ_STRING        4096
#define MAX_SOCKADDR           128

static const char SV_KEY = 'S'; /* registry: supervisor pointer -> userdata (weak) */

static __attribute__((noreturn)) void out_of_memory(lua_State *L) {
  luaL_error(L, "seccomp: out of memory");
  abort(); /* not reached */
}

/* ------------------------------------------------------------------------------------------ */
/* Names                                                                                      */

/* Syscalls newer than the libseccomp this was built against may not be known by name. Since
 * Linux 5.1 new syscalls share one number on every architecture but alpha; on x86_64 these are
 * the numbers. They are used for the native architecture only (libseccomp cannot translate a
 * number it does not know to another architecture), and reported for the others. */
static const struct {
  const char *name;
  int nr;
} extra_syscalls[] = {
    {"cachestat", 451},         {"fchmodat2", 452},        {"map_shadow_stack", 453},
    {"futex_wake", 454},        {"futex_wait", 455},       {"futex_requeue", 456},
    {"statmount", 457},         {"listmount", 458},        {"lsm_get_self_attr", 459},
    {"lsm_set_self_attr", 460}, {"lsm_list_modules", 461}, {"mseal", 462},
    {"setxattrat", 463},        {"getxattrat", 464},       {"listxattrat", 465},
    {"removexattrat", 466},     {"open_tree_attr", 467},   {"file_getattr", 468},
    {"file_setattr", 469},      {"uretprobe", 335},
};

static int extra_nr(const char *name) {
  if (seccomp_arch_native() != SCMP_ARCH_X86_64) return -1;
  for (size_t i = 0; i < CL_ARRAY_LEN(extra_syscalls); i++)
    if (strcmp(extra_syscalls[i].name, name) == 0) return extra_syscalls[i].nr;
  return -1;
}

static const char *extra_name(int nr) {
  for (size_t i = 0; i < CL_ARRAY_LEN(extra_syscalls); i++)
    if (extra_syscalls[i].nr == nr) return extra_syscalls[i].name;
  return NULL;
}

static uint32_t arch_token(const char *name) {
  if (strcmp(name, "native") == 0) return seccomp_arch_native();
  if (strcmp(name, "amd64") == 0 || strcmp(name, "SCMP_ARCH_X86_64") == 0) return SCMP_ARCH_X86_64;
  if (strcmp(name, "i386") == 0 || strcmp(name, "386") == 0 || strcmp(name, "SCMP_ARCH_X86") == 0)
    return SCMP_ARCH_X86;
  if (strcmp(name, "SCMP_ARCH_X32") == 0) return SCMP_ARCH_X32;
  if (strncmp(name, "SCMP_ARCH_", 10) == 0) {
    char low[32];
    size_t i = 0;
    for (const char *p = name + 10; *p && i < sizeof low - 1; p++)
      low[i++] = (char)(*p >= 'A' && *p <= 'Z' ? *p - 'A' + 'a' : *p);
    low[i] = 0;
    return seccomp_arch_resolve_name(low);
  }
  return seccomp_arch_resolve_name(name);
}

static const char *arch_name(uint32_t tok) {
  switch (tok) {
  case SCMP_ARCH_X86_64:
    return "x86_64";
  case SCMP_ARCH_X86:
    return "x86";
  case SCMP_ARCH_X32:
    return "x32";
  case SCMP_ARCH_AARCH64:
    return "aarch64";
  case SCMP_ARCH_ARM:
    return "arm";
  default:
    return "other";
  }
}

/* errno by number or name ("EACCES"). Returns -1 when unknown. */
static int errno_value(lua_State *L, int idx) {
  if (lua_isinteger(L, idx)) {
    lua_Integer n = lua_tointeger(L, idx);
    return n >= 0 && n <= 4095 ? (int)n : -1;
  }
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *s = lua_tostring(L, idx);
    for (int e = 1; e < 4096; e++) {
      const char *n = strerrorname_np(e);
      if (n && strcmp(n, s) == 0) return e;
    }
  }
  return -1;
}

/* Parses an action at idx. Accepts "allow", "kill_process" ("kill"), "kill_thread", "trap",
 * "log", "notify", "errno" (EPERM), "errno(N)", an integer N (errno N), {errno = N|"ENAME"},
 * {trace = N}. Raises naming `field`. */
static uint32_t parse_action(lua_State *L, int idx, const char *field) {
  idx = lua_absindex(L, idx);
  if (lua_isinteger(L, idx)) {
    int e = errno_value(L, idx);
    if (e < 0) cl_field_error(L, field, "errno 0..4095 expected");
    return SCMP_ACT_ERRNO((uint32_t)e);
  }
  if (lua_type(L, idx) == LUA_TSTRING) {
    const char *s = lua_tostring(L, idx);
    if (strcmp(s, "allow") == 0) return SCMP_ACT_ALLOW;
    if (strcmp(s, "kill_process") == 0 || strcmp(s, "kill") == 0) return SCMP_ACT_KILL_PROCESS;
    if (strcmp(s, "kill_thread") == 0) return SCMP_ACT_KILL_THREAD;
    if (strcmp(s, "trap") == 0) return SCMP_ACT_TRAP;
    if (strcmp(s, "log") == 0) return SCMP_ACT_LOG;
    if (strcmp(s, "notify") == 0) return SCMP_ACT_NOTIFY;
    if (strcmp(s, "errno") == 0 || strcmp(s, "deny") == 0) return SCMP_ACT_ERRNO(EPERM);
    if (strncmp(s, "errno(", 6) == 0) {
      char *end;
      long n = strtol(s + 6, &end, 10);
      if (end != s + 6 && strcmp(end, ")") == 0 && n >= 0 && n < 4096)
        return SCMP_ACT_ERRNO((uint32_t)n);
    }
    const char *msg = lua_pushfstring(L,
                                      "unknown action '%s' (allow, errno, errno(N), "
                                      "kill_process, kill_thread, trap, log, notify)",
                                      s);
    cl_field_error(L, field, msg);
  }
  if (lua_istable(L, idx)) {
    if (lua_getfield(L, idx, "errno") != LUA_TNIL) {
      int e = errno_value(L, -1);
      if (e < 0) cl_field_error(L, field, "errno: 0..4095 or a name like \"EACCES\" expected");
      lua_pop(L, 1);
      return SCMP_ACT_ERRNO((uint32_t)e);
    }
    lua_pop(L, 1);
    if (lua_getfield(L, idx, "trace") != LUA_TNIL) {
      lua_Integer t = lua_tointeger(L, -1);
      if (!lua_isinteger(L, -1) || t < 0 || t > 65535) cl_field_error(L, field, "trace: 0..65535");
      lua_pop(L, 1);
      return SCMP_ACT_TRACE((uint32_t)t);
    }
    lua_pop(L, 1);
    cl_field_error(L, field, "table action must be {errno = N} or {trace = N}");
  }
  cl_field_error(L, field, lua_pushfstring(L, "action expected, got %s", luaL_typename(L, idx)));
  return 0;
}

static void push_action(lua_State *L, uint32_t a) {
  switch (a & SECCOMP_RET_ACTION_FULL) {
  case SCMP_ACT_ALLOW:
    lua_pushliteral(L, "allow");
    return;
  case SCMP_ACT_KILL_PROCESS:
    lua_pushliteral(L, "kill_process");
    return;
  case SCMP_ACT_KILL_THREAD:
    lua_pushliteral(L, "kill_thread");
    return;
  case SCMP_ACT_TRAP:
    lua_pushliteral(L, "trap");
    return;
  case SCMP_ACT_LOG:
    lua_pushliteral(L, "log");
    return;
  case SCMP_ACT_NOTIFY:
    lua_pushliteral(L, "notify");
    return;
  case SECCOMP_RET_ERRNO:
    lua_pushfstring(L, "errno(%d)", (int)(a & SECCOMP_RET_DATA));
    return;
  case SECCOMP_RET_TRACE:
    lua_pushfstring(L, "trace(%d)", (int)(a & SECCOMP_RET_DATA));
    return;
  default:
    lua_pushliteral(L, "?");
    return;
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Filters                                                                                    */

typedef struct rule {
  char name[48];
  uint32_t action;
  int extra; /* >= 0: number from extra_syscalls (native architecture only) */
  unsigned nargs;
  struct scmp_arg_cmp args[6];
} rule;

typedef struct filter {
  uint32_t def;
  uint32_t arches[MAX_ARCH];
  int narch;
  int optimize;
  int log;
  int notify; /* some rule notifies */
  int strict; /* unknown syscall names raise (else reported) */
  rule *rules;
  size_t nrules, cap;
  size_t redundant; /* rules whose action is the default: nothing to add */
  struct sock_filter *bpf;
  size_t ninsn;
  double notify_timeout;
  int max_pending;
  int closed;
} filter;

static filter *check_filter(lua_State *L, int i) {
  filter *f = luaL_checkudata(L, i, FILTER_MT);
  if (f->closed) luaL_error(L, "attempt to use a closed seccomp filter");
  return f;
}

static void filter_free(filter *f) {
  free(f->rules);
  free(f->bpf);
  f->rules = NULL;
  f->bpf = NULL;
  f->nrules = f->cap = f->ninsn = 0;
}

static int filter_gc(lua_State *L) {
  filter *f = lua_touserdata(L, 1);
  if (!f->closed) {
    f->closed = 1;
    filter_free(f);
  }
  return 0;
}

/* Adds every rule to ctx. Rules with an extra number go in only when `extras` (the context
 * holds just the native architecture). Returns 0 or a negative errno, with the rule index. */
static int add_rules(const filter *f, scmp_filter_ctx ctx, int extras, size_t *bad) {
  for (size_t i = 0; i < f->nrules; i++) {
    const rule *r = &f->rules[i];
    int nr;
    if (r->extra >= 0) {
      if (!extras) continue;
      nr = r->extra;
    } else {
      nr = seccomp_syscall_resolve_name(r->name);
    }
    int rc = seccomp_rule_add_array(ctx, r->action, nr, r->nargs, r->args);
    if (rc < 0) {
      *bad = i;
      return rc;
    }
  }
  return 0;
}

static scmp_filter_ctx new_ctx(const filter *f, const uint32_t *arches, int narch) {
  scmp_filter_ctx ctx = seccomp_init(f->def);
  if (!ctx) return NULL;
  uint32_t native = seccomp_arch_native();
  int keep_native = 0;
  for (int i = 0; i < narch; i++) keep_native |= arches[i] == native;
  for (int i = 0; i < narch; i++)
    if (arches[i] != native && seccomp_arch_add(ctx, arches[i]) < 0) goto fail;
  if (!keep_native && seccomp_arch_remove(ctx, native) < 0) goto fail;
  /* We set no_new_privs ourselves, before the filter, in the child. */
  if (seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) < 0) goto fail;
  if (seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, (uint32_t)f->optimize) < 0) goto fail;
  if (f->log && seccomp_attr_set(ctx, SCMP_FLTATR_CTL_LOG, 1) < 0) goto fail;
  return ctx;
fail:
  seccomp_release(ctx);
  return NULL;
}

/* Builds the libseccomp context for f. Rules that use clawlua's own syscall numbers need a
 * native-only context (libseccomp translates numbers between architectures by name), merged
 * with one for the other architectures. */
static scmp_filter_ctx build_ctx(const filter *f, char *err, size_t errlen) {
  int has_extra = 0;
  for (size_t i = 0; i < f->nrules; i++) has_extra |= f->rules[i].extra >= 0;
  uint32_t native = seccomp_arch_native();
  uint32_t others[MAX_ARCH];
  int nothers = 0, with_native = 0;
  for (int i = 0; i < f->narch; i++) {
    if (f->arches[i] == native)
      with_native = 1;
    else
      others[nothers++] = f->arches[i];
  }
  size_t bad = 0;
  int rc;
  if (!has_extra || !with_native || nothers == 0) {
    scmp_filter_ctx ctx = new_ctx(f, f->arches, f->narch);
    if (!ctx) {
      snprintf(err, errlen, "libseccomp: cannot set up the filter");
      return NULL;
    }
    rc = add_rules(f, ctx, has_extra && with_native, &bad);
    if (rc < 0) goto rule_fail_one;
    return ctx;
  rule_fail_one:
    seccomp_release(ctx);
    goto rule_fail;
  }
  scmp_filter_ctx a = new_ctx(f, &native, 1), b = new_ctx(f, others, nothers);
  if (!a || !b) {
    if (a) seccomp_release(a);
    if (b) seccomp_release(b);
    snprintf(err, errlen, "libseccomp: cannot set up the filter");
    return NULL;
  }
  rc = add_rules(f, a, 1, &bad);
  if (rc == 0) rc = add_rules(f, b, 0, &bad);
  if (rc == 0)
    rc = seccomp_merge(a, b);
  else
    seccomp_release(b);
  if (rc < 0) {
    seccomp_release(a);
    if (rc != -EEXIST) goto rule_fail; /* merge failures report below as well */
    goto rule_fail;
  }
  return a;
rule_fail:
  snprintf(err, errlen, "rule %d (%s): libseccomp rejected it: %s", (int)bad + 1,
           bad < f->nrules ? f->rules[bad].name : "?", strerror(-rc));
  return NULL;
}

/* Runs an export function into a memfd and returns its bytes (malloc'd). */
static char *export_mem(scmp_filter_ctx ctx, int (*fn)(const scmp_filter_ctx, int), size_t *len) {
  int fd = memfd_create("clawlua-seccomp", MFD_CLOEXEC);
  if (fd < 0) return NULL;
  char *buf = NULL;
  if (fn(ctx, fd) == 0) {
    off_t n = lseek(fd, 0, SEEK_END);
    if (n >= 0 && (buf = malloc((size_t)n + 1))) {
      ssize_t got = pread(fd, buf, (size_t)n, 0);
      if (got != n) {
        free(buf);
        buf = NULL;
      } else {
        buf[n] = 0;
        *len = (size_t)n;
      }
    }
  }
  close(fd);
  return buf;
}

static int compile(filter *f, char *err, size_t errlen) {
  scmp_filter_ctx ctx = build_ctx(f, err, errlen);
  if (!ctx) return EINVAL;
  size_t len = 0;
  char *bpf = export_mem(ctx, seccomp_export_bpf, &len);
  seccomp_release(ctx);
  if (!bpf) {
    snprintf(err, errlen, "libseccomp: cannot export the filter: %s", strerror(errno));
    return EIO;
  }
  if (len % sizeof(struct sock_filter) != 0 || len / sizeof(struct sock_filter) > BPF_MAXINSNS) {
    free(bpf);
    snprintf(err, errlen, "the filter compiles to %d BPF instructions; the kernel takes at most %d",
             (int)(len / sizeof(struct sock_filter)), BPF_MAXINSNS);
    return E2BIG;
  }
  free(f->bpf);
  f->bpf = (struct sock_filter *)bpf;
  f->ninsn = len / sizeof(struct sock_filter);
  return 0;
}

/* Is name a syscall on at least one of f's architectures? Sets *extra for clawlua's table. */
static int known_syscall(const filter *f, const char *name, int *extra) {
  *extra = -1;
  for (int i = 0; i < f->narch; i++)
    if (seccomp_syscall_resolve_name_arch(f->arches[i], name) >= 0) return 1;
  if (seccomp_syscall_resolve_name(name) != __NR_SCMP_ERROR) {
    /* Known to libseccomp but not on these architectures (e.g. "chown32" on x86_64 alone). */
    return 0;
  }
  int native = 0;
  for (int i = 0; i < f->narch; i++) native |= f->arches[i] == seccomp_arch_native();
  int nr = extra_nr(name);
  if (nr >= 0 && native) {
    *extra = nr;
    return 1;
  }
  return 0;
}

/* Appends the argument conditions of table idx to r. */
static void parse_args(lua_State *L, int idx, rule *r, const char *where) {
  idx = lua_absindex(L, idx);
  if (!lua_istable(L, idx))
    cl_field_error(L, lua_pushfstring(L, "%s.args", where), "table expected");
  lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
  if (n > 6) cl_field_error(L, lua_pushfstring(L, "%s.args", where), "at most 6 conditions");
  for (lua_Integer i = 1; i <= n; i++) {
    const char *fname = lua_pushfstring(L, "%s.args[%I]", where, i);
    int fi = lua_gettop(L);
    if (lua_rawgeti(L, idx, i) != LUA_TTABLE) cl_field_error(L, fname, "table expected");
    int c = lua_gettop(L);
    int positional = lua_rawlen(L, c) > 0;
    lua_Integer index;
    const char *op;
    int ok;
    if (positional) {
      lua_rawgeti(L, c, 1);
      lua_rawgeti(L, c, 2);
      lua_rawgeti(L, c, 3);
      lua_rawgeti(L, c, 4);
    } else {
      static const char *const fields[] = {"index", "op", "value", "mask", "value_two", NULL};
      cl_check_fields(L, c, fields);
      lua_getfield(L, c, "index");
      lua_getfield(L, c, "op");
      lua_getfield(L, c, "value");
      lua_getfield(L, c, "mask");
    }
    /* stack: index, op, a, b */
    index = lua_tointegerx(L, c + 1, &ok);
    if (!ok || index < 0 || index > 5)
      cl_field_error(L, fname,
                     lua_pushfstring(L, "argument index 0..5 expected, got %s",
                                     luaL_tolstring(L, c + 1, NULL)));
    op = lua_tostring(L, c + 2);
    if (!op) op = "==";
    enum scmp_compare cmp;
    if (!strcmp(op, "==") || !strcmp(op, "eq"))
      cmp = SCMP_CMP_EQ;
    else if (!strcmp(op, "!=") || !strcmp(op, "~=") || !strcmp(op, "ne"))
      cmp = SCMP_CMP_NE;
    else if (!strcmp(op, "<") || !strcmp(op, "lt"))
      cmp = SCMP_CMP_LT;
    else if (!strcmp(op, "<=") || !strcmp(op, "le"))
      cmp = SCMP_CMP_LE;
    else if (!strcmp(op, ">") || !strcmp(op, "gt"))
      cmp = SCMP_CMP_GT;
    else if (!strcmp(op, ">=") || !strcmp(op, "ge"))
      cmp = SCMP_CMP_GE;
    else if (!strcmp(op, "&==") || !strcmp(op, "masked_eq"))
      cmp = SCMP_CMP_MASKED_EQ;
    else
      cl_field_error(L, fname,
                     lua_pushfstring(L, "unknown op '%s' (==, !=, <, <=, >, >=, &==)", op));
    /* Values are 64-bit: negative Lua integers are their two's complement. */
    lua_Integer a, b = 0;
    if (positional) {
      a = lua_tointegerx(L, c + 3, &ok);
      if (!ok) cl_field_error(L, fname, "integer value expected");
      if (cmp == SCMP_CMP_MASKED_EQ) {
        b = lua_tointegerx(L, c + 4, &ok);
        if (!ok) cl_field_error(L, fname, "&== takes {index, \"&==\", mask, value}");
      }
    } else if (cmp == SCMP_CMP_MASKED_EQ) {
      a = lua_tointegerx(L, c + 4, &ok); /* mask */
      if (!ok) cl_field_error(L, fname, "&== needs an integer mask");
      b = lua_tointegerx(L, c + 3, &ok);
      if (!ok && !lua_isnil(L, c + 3)) cl_field_error(L, fname, "integer value expected");
      if (!ok) b = 0;
    } else {
      a = lua_tointegerx(L, c + 3, &ok);
      if (!ok) cl_field_error(L, fname, "integer value expected");
    }
    for (unsigned k = 0; k < r->nargs; k++)
      if (r->args[k].arg == (unsigned)index)
        cl_field_error(L, fname,
                       lua_pushfstring(L,
                                       "argument %I compared twice in one rule "
                                       "(use two rules)",
                                       index));
    struct scmp_arg_cmp *ac = &r->args[r->nargs++];
    ac->arg = (unsigned)index;
    ac->op = cmp;
    ac->datum_a = (scmp_datum_t)a;
    ac->datum_b = (scmp_datum_t)b;
    lua_settop(L, fi - 1);
  }
}

static rule *push_rule(lua_State *L, filter *f) {
  if (f->nrules == f->cap) {
    if (f->cap >= MAX_RULES) luaL_error(L, "seccomp: more than %d rules", MAX_RULES);
    size_t nc = f->cap ? f->cap * 2 : 32;
    rule *nr = realloc(f->rules, nc * sizeof *nr);
    if (!nr) out_of_memory(L);
    f->rules = nr;
    f->cap = nc;
  }
  rule *r = &f->rules[f->nrules];
  memset(r, 0, sizeof *r);
  return r;
}

/* Adds the rule table at idx (rules[i]); unknown names go to the report list at `report`. */
static void add_rule(lua_State *L, filter *f, int idx, lua_Integer pos, int report) {
  static const char *const fields[] = {"syscall", "syscalls", "action", "args", "where", NULL};
  idx = lua_absindex(L, idx);
  int top = lua_gettop(L);
  if (!lua_istable(L, idx))
    cl_field_error(L, lua_pushfstring(L, "rules[%I]", pos), "table expected");
  /* The rule's name for errors, anchored at top + 1 for the whole function. */
  if (lua_getfield(L, idx, "where") != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushfstring(L, "rules[%I]", pos);
  }
  const char *where = lua_tostring(L, -1);
  cl_check_fields(L, idx, fields);
  uint32_t action = SCMP_ACT_ALLOW;
  if (lua_getfield(L, idx, "action") != LUA_TNIL) {
    int ai = lua_gettop(L);
    action = parse_action(L, ai, lua_pushfstring(L, "%s.action", where));
  }
  lua_settop(L, top + 1);
  rule proto;
  memset(&proto, 0, sizeof proto);
  proto.action = action;
  proto.extra = -1;
  if (lua_getfield(L, idx, "args") != LUA_TNIL) parse_args(L, -1, &proto, where);
  lua_settop(L, top + 1);
  /* Names: syscall = "x" or syscalls = {"x", "y"}. */
  int names = lua_gettop(L) + 1;
  lua_newtable(L);
  int count = 0;
  if (lua_getfield(L, idx, "syscall") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING)
      cl_field_error(L, lua_pushfstring(L, "%s.syscall", where), "string expected");
    lua_rawseti(L, names, ++count);
  } else {
    lua_pop(L, 1);
  }
  if (lua_getfield(L, idx, "syscalls") != LUA_TNIL) {
    if (!lua_istable(L, -1))
      cl_field_error(L, lua_pushfstring(L, "%s.syscalls", where), "list of names expected");
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
      if (lua_rawgeti(L, -1, i) != LUA_TSTRING)
        cl_field_error(L, lua_pushfstring(L, "%s.syscalls[%I]", where, i), "string expected");
      lua_rawseti(L, names, ++count);
    }
  }
  lua_pop(L, 1);
  if (count == 0) cl_field_error(L, where, "syscall name missing");
  if (action == SCMP_ACT_NOTIFY) f->notify = 1;
  for (int i = 1; i <= count; i++) {
    lua_rawgeti(L, names, i);
    const char *name = lua_tostring(L, -1);
    int extra;
    if (strlen(name) >= sizeof proto.name || !known_syscall(f, name, &extra)) {
      if (f->strict || report == 0) {
        const char *fld = count > 1 || lua_getfield(L, idx, "syscalls") != LUA_TNIL
                              ? lua_pushfstring(L, "%s.syscalls[%d]", where, i)
                              : lua_pushfstring(L, "%s.syscall", where);
        cl_field_error(L, fld,
                       lua_pushfstring(L,
                                       "unknown syscall '%s' on this filter's "
                                       "architectures",
                                       name));
      }
      lua_pushfstring(L, "%s (%s)", name, where);
      lua_rawseti(L, report, (lua_Integer)lua_rawlen(L, report) + 1);
      lua_pop(L, 1);
      continue;
    }
    if (action == f->def) { /* libseccomp refuses these; they change nothing */
      f->redundant++;
      lua_pop(L, 1);
      continue;
    }
    rule *r = push_rule(L, f);
    *r = proto;
    strcpy(r->name, name);
    r->extra = extra;
    f->nrules++;
    lua_pop(L, 1);
  }
  lua_settop(L, top);
}

/* Lua: seccomp.filter{default=, rules={...}, arches={"native"}, optimize=1|2, log=false,
 * strict=true, handler=fn, notify_timeout=5, max_pending=64} -> filter */
static int l_filter(lua_State *L) {
  static const char *const fields[] = {"default", "rules",   "arches",         "optimize",    "log",
                                       "strict",  "handler", "notify_timeout", "max_pending", NULL};
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  cl_check_fields(L, 1, fields);
  filter *f = lua_newuserdatauv(L, sizeof *f, 2);
  memset(f, 0, sizeof *f);
  f->closed = 1;
  luaL_setmetatable(L, FILTER_MT);
  f->closed = 0;
  int fi = lua_gettop(L);
  lua_newtable(L); /* unknown-name report */
  int report = lua_gettop(L);

  f->def = SCMP_ACT_KILL_PROCESS;
  if (lua_getfield(L, 1, "default") != LUA_TNIL) f->def = parse_action(L, -1, "default");
  lua_pop(L, 1);
  if (f->def == SCMP_ACT_NOTIFY) cl_field_error(L, "default", "notify cannot be the default");
  f->strict = cl_opt_boolean(L, 1, "strict", 1);
  f->log = cl_opt_boolean(L, 1, "log", 0);
  lua_Integer opt = cl_opt_integer(L, 1, "optimize", 1);
  if (opt != 1 && opt != 2)
    cl_field_error(L, "optimize", "1 (priority) or 2 (binary tree) expected");
  f->optimize = (int)opt;
  f->notify_timeout = cl_opt_number(L, 1, "notify_timeout", DEFAULT_NOTIFY_TIMEOUT);
  if (!(f->notify_timeout > 0 && f->notify_timeout <= 3600))
    cl_field_error(L, "notify_timeout", "seconds in (0, 3600] expected");
  lua_Integer mp = cl_opt_integer(L, 1, "max_pending", DEFAULT_MAX_PENDING);
  if (mp < 1 || mp > MAX_PENDING_LIMIT)
    cl_field_error(L, "max_pending", lua_pushfstring(L, "1..%d expected", MAX_PENDING_LIMIT));
  f->max_pending = (int)mp;

  if (lua_getfield(L, 1, "arches") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "arches", "list of architecture names expected");
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    if (n < 1 || n > MAX_ARCH) cl_field_error(L, "arches", "1 to 4 architectures expected");
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      const char *a = lua_tostring(L, -1);
      uint32_t tok = a ? arch_token(a) : 0;
      if (!tok)
        cl_field_error(L, lua_pushfstring(L, "arches[%I]", i),
                       lua_pushfstring(L, "unknown architecture '%s'", a ? a : "?"));
      for (int k = 0; k < f->narch; k++)
        if (f->arches[k] == tok) tok = 0;
      if (tok) f->arches[f->narch++] = tok;
      lua_pop(L, 1);
    }
  } else {
    f->arches[f->narch++] = seccomp_arch_native();
  }
  lua_pop(L, 1);

  if (lua_getfield(L, 1, "rules") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "rules", "list of rules expected");
    int rt = lua_gettop(L);
    lua_Integer n = (lua_Integer)lua_rawlen(L, rt);
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, rt, i);
      add_rule(L, f, -1, i, report);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);

  if (lua_getfield(L, 1, "handler") != LUA_TNIL) {
    if (!lua_isfunction(L, -1)) cl_field_error(L, "handler", "function expected");
    lua_setiuservalue(L, fi, 1);
  } else {
    lua_pop(L, 1);
    if (f->notify) cl_field_error(L, "handler", "a filter with notify rules needs a handler");
  }
  char err[256];
  int e = compile(f, err, sizeof err);
  if (e) return luaL_error(L, "seccomp: %s", err);
  lua_pushvalue(L, report);
  lua_setiuservalue(L, fi, 2);
  lua_settop(L, fi);
  return 1;
}

/* Lua: f:bpf() -> string of struct sock_filter (8 bytes each, host byte order) */
static int l_bpf(lua_State *L) {
  filter *f = check_filter(L, 1);
  lua_pushlstring(L, (const char *)f->bpf, f->ninsn * sizeof(struct sock_filter));
  return 1;
}

/* Lua: f:pfc() -> libseccomp's pseudo filter code, for review */
static int l_pfc(lua_State *L) {
  filter *f = check_filter(L, 1);
  char err[256];
  scmp_filter_ctx ctx = build_ctx(f, err, sizeof err);
  if (!ctx) return cl_failf(L, EINVAL, "seccomp: %s", err);
  size_t len = 0;
  char *s = export_mem(ctx, seccomp_export_pfc, &len);
  seccomp_release(ctx);
  if (!s) return cl_fail(L, "seccomp: pfc", errno ? errno : EIO);
  lua_pushlstring(L, s, len);
  free(s);
  return 1;
}

/* Lua: f:info() -> {instructions=, rules=, redundant=, arches={...}, default=, optimize=, log=,
 * notify=, unknown={"name (where)", ...}} */
static int l_info(lua_State *L) {
  filter *f = check_filter(L, 1);
  lua_createtable(L, 0, 9);
  lua_pushinteger(L, (lua_Integer)f->ninsn);
  lua_setfield(L, -2, "instructions");
  lua_pushinteger(L, (lua_Integer)f->nrules);
  lua_setfield(L, -2, "rules");
  lua_pushinteger(L, (lua_Integer)f->redundant);
  lua_setfield(L, -2, "redundant");
  lua_createtable(L, f->narch, 0);
  for (int i = 0; i < f->narch; i++) {
    lua_pushstring(L, arch_name(f->arches[i]));
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "arches");
  push_action(L, f->def);
  lua_setfield(L, -2, "default");
  lua_pushinteger(L, f->optimize);
  lua_setfield(L, -2, "optimize");
  lua_pushboolean(L, f->log);
  lua_setfield(L, -2, "log");
  lua_pushboolean(L, f->notify);
  lua_setfield(L, -2, "notify");
  lua_getiuservalue(L, 1, 2);
  lua_setfield(L, -2, "unknown");
  lua_createtable(L, (int)f->nrules, 0);
  for (size_t i = 0; i < f->nrules; i++) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, f->rules[i].name);
    lua_setfield(L, -2, "syscall");
    push_action(L, f->rules[i].action);
    lua_setfield(L, -2, "action");
    lua_pushinteger(L, f->rules[i].nargs);
    lua_setfield(L, -2, "conditions");
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "rule_list");
  return 1;
}

static int l_filter_close(lua_State *L) {
  luaL_checkudata(L, 1, FILTER_MT);
  filter_gc(L);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_filter_tostring(lua_State *L) {
  filter *f = luaL_checkudata(L, 1, FILTER_MT);
  if (f->closed)
    lua_pushliteral(L, "clawlua.seccomp.filter (closed)");
  else
    lua_pushfstring(L, "clawlua.seccomp.filter (%d rules, %d instructions)", (int)f->nrules,
                    (int)f->ninsn);
  return 1;
}

/* Lua: seccomp.firecracker_file{vmm=f1, api=f2, vcpu=f3} -> bytes of the file Firecracker's
 * --seccomp-filter takes (bincode: u64 LE count, then per thread u64 length + name, u64 count +
 * 8-byte instructions; the format of Firecracker v1.0 to v1.14). Threads are written in name
 * order, so the output is deterministic. */
int cl_seccomp_firecracker_file(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_newtable(L); /* sorted names */
  int n = 0;
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    if (lua_type(L, -2) != LUA_TSTRING) luaL_error(L, "bad thread name (string keys expected)");
    check_filter(L, -1);
    lua_pop(L, 1);
    lua_pushvalue(L, -1);
    lua_rawseti(L, 2, ++n);
  }
  lua_getglobal(L, "table");
  lua_getfield(L, -1, "sort");
  lua_pushvalue(L, 2);
  lua_call(L, 1, 0);
  lua_pop(L, 1);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  uint64_t cnt = (uint64_t)n;
  unsigned char le[8];
#define PUT_U64(v)                                                                                 \
  do {                                                                                             \
    uint64_t v_ = (v);                                                                             \
    for (int k_ = 0; k_ < 8; k_++) le[k_] = (unsigned char)(v_ >> (8 * k_));                       \
    luaL_addlstring(&b, (const char *)le, 8);                                                      \
  } while (0)
  PUT_U64(cnt);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    size_t nl;
    const char *name = lua_tolstring(L, -1, &nl);
    lua_pop(L, 1);
    PUT_U64(nl);
    luaL_addlstring(&b, name, nl);
    lua_rawgeti(L, 2, i);
    lua_gettable(L, 1);
    filter *f = lua_touserdata(L, -1);
    lua_pop(L, 1);
    PUT_U64(f->ninsn);
    for (size_t k = 0; k < f->ninsn; k++) {
      const struct sock_filter *s = &f->bpf[k];
      unsigned char ins[8] = {(unsigned char)(s->code & 0xff),
                              (unsigned char)(s->code >> 8),
                              s->jt,
                              s->jf,
                              (unsigned char)(s->k & 0xff),
                              (unsigned char)((s->k >> 8) & 0xff),
                              (unsigned char)((s->k >> 16) & 0xff),
                              (unsigned char)(s->k >> 24)};
      luaL_addlstring(&b, (const char *)ins, 8);
    }
  }
#undef PUT_U64
  luaL_pushresult(&b);
  return 1;
}

/* Lua: seccomp.resolve(name | number, [arch]) -> number | name | nil */
static int l_resolve(lua_State *L) {
  uint32_t arch = seccomp_arch_native();
  if (!lua_isnoneornil(L, 2)) {
    arch = arch_token(luaL_checkstring(L, 2));
    if (!arch) return luaL_argerror(L, 2, "unknown architecture");
  }
  if (lua_type(L, 1) == LUA_TNUMBER) {
    char *n = seccomp_syscall_resolve_num_arch(arch, (int)luaL_checkinteger(L, 1));
    if (n) {
      lua_pushstring(L, n);
      free(n);
      return 1;
    }
    const char *x = arch == SCMP_ARCH_X86_64 ? extra_name((int)lua_tointeger(L, 1)) : NULL;
    if (!x) return 0;
    lua_pushstring(L, x);
    return 1;
  }
  const char *name = luaL_checkstring(L, 1);
  int nr = seccomp_syscall_resolve_name_arch(arch, name);
  if (nr < 0 && arch == SCMP_ARCH_X86_64) nr = extra_nr(name);
  if (nr < 0) return 0;
  lua_pushinteger(L, nr);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Installing in a child                                                                      */

struct cl_seccomp_prog {
  struct sock_fprog prog;
  unsigned int flags;
  int notify;
  int sock[2];     /* notify: the child hands the listener over sock[1] */
  int listener;    /* parent: the listener, once received */
  int carry_valid; /* a notification received during the hand-off that belongs to the program */
  struct seccomp_notif carry;
  double timeout;
  int max_pending;
  struct sock_filter insns[];
};

static int prep_gc(lua_State *L) {
  cl_seccomp_prog *p = lua_touserdata(L, 1);
  for (int i = 0; i < 2; i++)
    if (p->sock[i] >= 0) close(p->sock[i]), p->sock[i] = -1;
  if (p->listener >= 0) close(p->listener), p->listener = -1;
  return 0;
}

cl_seccomp_prog *cl_seccomp_prepare(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  filter *f = luaL_testudata(L, idx, FILTER_MT);
  if (!f) cl_field_error(L, "seccomp", "seccomp filter expected");
  if (f->closed) cl_field_error(L, "seccomp", "closed seccomp filter");
  cl_seccomp_prog *p = lua_newuserdatauv(L, sizeof *p + f->ninsn * sizeof(struct sock_filter), 1);
  memset(p, 0, sizeof *p);
  p->sock[0] = p->sock[1] = p->listener = -1;
  luaL_setmetatable(L, PREP_MT);
  memcpy(p->insns, f->bpf, f->ninsn * sizeof(struct sock_filter));
  p->prog.len = (unsigned short)f->ninsn;
  p->prog.filter = p->insns;
  p->notify = f->notify;
  p->timeout = f->notify_timeout;
  p->max_pending = f->max_pending;
  if (f->log) p->flags |= SECCOMP_FILTER_FLAG_LOG;
  if (f->notify) {
    p->flags |= SECCOMP_FILTER_FLAG_NEW_LISTENER;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, p->sock) < 0)
      luaL_error(L, "seccomp: socketpair: %s", strerror(errno));
    lua_getiuservalue(L, idx, 1);
    lua_setiuservalue(L, -2, 1);
  }
  return p;
}

int cl_seccomp_prog_notifies(const cl_seccomp_prog *p) {
  return p->notify;
}

/* In the child, last before exec: async-signal-safe. */
int cl_seccomp_child_install(cl_seccomp_prog *p, const char **stage) {
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
    *stage = "prctl(no_new_privs)";
    return errno;
  }
  long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, p->flags, &p->prog);
  if (fd < 0) {
    *stage = "seccomp";
    return errno;
  }
  if (p->notify) {
    /* From here on every syscall goes through the filter: the hand-off and the exec are the
     * only ones left before the program runs. */
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    char one = 1;
    struct iovec iov = {&one, 1};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    int lfd = (int)fd;
    memcpy(CMSG_DATA(cm), &lfd, sizeof lfd);
    if (sendmsg(p->sock[1], &mh, MSG_NOSIGNAL) < 0) {
      *stage = "seccomp listener hand-off (sendmsg)";
      return errno;
    }
  }
  return 0;
}

static int recv_fd(int sock) {
  char cbuf[CMSG_SPACE(sizeof(int))];
  char one;
  struct iovec iov = {&one, 1};
  struct msghdr mh;
  memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf;
  mh.msg_controllen = sizeof cbuf;
  ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  if (n <= 0) return -1;
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  if (!cm || cm->cmsg_type != SCM_RIGHTS) return -1;
  int fd;
  memcpy(&fd, CMSG_DATA(cm), sizeof fd);
  return fd;
}

static int errfd_ready(int errfd) {
  struct pollfd pf = {errfd, POLLIN, 0};
  return poll(&pf, 1, 0) > 0;
}

/*
 * Parent, in place of cl_spawn's wait for exec when the filter notifies: receives the listener
 * and answers the notifications raised by the runtime's own code between the filter and exec
 * (the hand-off, execve) with "continue". A notification is the runtime's while the child has
 * not exec'd: the child is single-threaded and blocked in it, so exec cannot have happened; one
 * read after the exec is visible belongs to the program and is kept for the supervisor.
 */
ssize_t cl_seccomp_exec_wait(void *arg, pid_t pid, int errfd, void *buf, size_t len) {
  cl_seccomp_prog *p = arg;
  if (p->sock[1] >= 0) {
    close(p->sock[1]);
    p->sock[1] = -1;
  }
  uint64_t deadline = cl_now_ns() + (uint64_t)HANDOFF_TIMEOUT_MS * 1000000u;
  for (;;) {
    struct pollfd pf[3] = {{errfd, POLLIN, 0}, {p->sock[0], POLLIN, 0}, {p->listener, POLLIN, 0}};
    uint64_t now = cl_now_ns();
    if (now >= deadline) {
      kill(pid, SIGKILL);
      return -ETIMEDOUT;
    }
    int n = poll(pf, 3, (int)((deadline - now) / 1000000u) + 1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (pf[0].revents) {
      /* Exec'd (or failed): the listener was sent before, so it is in the socket already. */
      if (p->listener < 0 && p->sock[0] >= 0) {
        p->listener = recv_fd(p->sock[0]);
        if (p->listener >= 0) cl_set_nonblock(p->listener, 1);
      }
      ssize_t r;
      do r = read(errfd, buf, len);
      while (r < 0 && errno == EINTR);
      if (r > 0) kill(pid, SIGKILL);   /* failed before exec: it may be stuck in a notified exit */
      if (r == 0 && p->listener < 0) { /* exec'd without handing over: cannot supervise */
        kill(pid, SIGKILL);
        return -EPROTO;
      }
      return r < 0 ? -errno : r;
    }
    if (pf[1].revents && p->listener < 0) {
      p->listener = recv_fd(p->sock[0]);
      close(p->sock[0]);
      p->sock[0] = -1;
      if (p->listener < 0) {
        kill(pid, SIGKILL);
        return -EPROTO;
      }
      cl_set_nonblock(p->listener, 1);
      continue;
    }
    if (p->listener >= 0 && (pf[2].revents & POLLIN)) {
      struct seccomp_notif req;
      memset(&req, 0, sizeof req);
      if (ioctl(p->listener, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) continue;
      if (errfd_ready(errfd)) { /* the program's: for the supervisor */
        p->carry = req;
        p->carry_valid = 1;
        continue;
      }
      struct seccomp_notif_resp resp;
      memset(&resp, 0, sizeof resp);
      resp.id = req.id;
      resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
      ioctl(p->listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Supervisor: notified syscalls to a Lua handler                                             */

typedef struct supervisor supervisor;

typedef struct pending {
  supervisor *sv;
  uint64_t id;
  uint64_t gen; /* bumped whenever the slot is answered, so a late handler cannot reuse it */
  int busy;
  int task_ref; /* registry ref to the handler task */
  pid_t pid;
  char syscall[48];
  double started;
  cl_timer timer;
} pending;

struct supervisor {
  lua_State *L; /* main thread */
  cl_loop *loop;
  int fd;
  cl_watch watch;
  int closed;
  int finalizing; /* collected: no Lua (audit, registry) from here on */
  double timeout;
  int max_pending, npending;
  pid_t pid;
  char sandbox[128];
  lua_Integer received, allowed, denied, timeouts, errors, overloaded, stale;
  pending *slots;
};

static void respond(supervisor *sv, uint64_t id, int allow, int err) {
  struct seccomp_notif_resp resp;
  memset(&resp, 0, sizeof resp);
  resp.id = id;
  if (allow)
    resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  else
    resp.error = -err;
  if (sv->fd >= 0) ioctl(sv->fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
}

static void audit_decision(supervisor *sv, pending *pd, const char *decision, int err,
                           const char *reason) {
  lua_State *L = sv->L;
  int top = lua_gettop(L);
  lua_createtable(L, 0, 6);
  lua_pushstring(L, pd->syscall);
  lua_setfield(L, -2, "syscall");
  lua_pushstring(L, decision);
  lua_setfield(L, -2, "decision");
  if (err) {
    lua_pushinteger(L, err);
    lua_setfield(L, -2, "errno");
  }
  if (reason) {
    lua_pushstring(L, reason);
    lua_setfield(L, -2, "reason");
  }
  /* Whole microseconds: an integer is cheaper to record than a float. */
  lua_pushinteger(L, (lua_Integer)((cl_now() - pd->started) * 1e6 + 0.5));
  lua_setfield(L, -2, "latency_us");
  const char *sb = sv->sandbox[0] ? sv->sandbox : NULL;
  cl_audit_emit(L, "seccomp.notify", sb, pd->pid, lua_gettop(L));
  if (!strcmp(decision, "deny")) cl_audit_emit(L, "seccomp.deny", sb, pd->pid, lua_gettop(L));
  lua_settop(L, top);
}

static void slot_finish(pending *pd) {
  supervisor *sv = pd->sv;
  cl_timer_stop(&pd->timer);
  if (pd->task_ref != LUA_NOREF && !sv->finalizing) {
    luaL_unref(sv->L, LUA_REGISTRYINDEX, pd->task_ref);
    pd->task_ref = LUA_NOREF;
  }
  pd->busy = 0;
  pd->gen++;
  sv->npending--;
}

/* Answers slot pd once. */
static void decide(pending *pd, int allow, int err, const char *reason) {
  supervisor *sv = pd->sv;
  respond(sv, pd->id, allow, err);
  if (allow)
    sv->allowed++;
  else
    sv->denied++;
  if (!sv->finalizing) audit_decision(sv, pd, allow ? "allow" : "deny", allow ? 0 : err, reason);
  slot_finish(pd);
}

static void on_slot_timeout(cl_timer *t) {
  pending *pd = (pending *)((char *)t - offsetof(pending, timer));
  supervisor *sv = pd->sv;
  if (!pd->busy) return;
  sv->timeouts++;
  int ref = pd->task_ref;
  pd->task_ref = LUA_NOREF;
  decide(pd, 0, EPERM, "timeout");
  if (ref != LUA_NOREF) { /* stop the handler: its answer no longer counts */
    lua_State *L = sv->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    if (lua_getfield(L, -1, "cancel") == LUA_TFUNCTION) {
      lua_pushvalue(L, -2);
      if (lua_pcall(L, 1, 0, 0) != LUA_OK) lua_pop(L, 1);
    } else {
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
}

/* Reads a NUL-terminated string from the target's memory (bounded). Pushes it or nil. */
static void push_remote_string(lua_State *L, pid_t pid, uint64_t addr) {
  if (!addr) {
    lua_pushnil(L);
    return;
  }
  char buf[MAX_READ_STRING];
  size_t got = 0;
  while (got < sizeof buf) {
    /* Never cross a page boundary in one read: the next page may be unmapped. */
    uint64_t a = addr + got;
    size_t chunk = 4096 - (size_t)(a & 4095);
    if (chunk > sizeof buf - got) chunk = sizeof buf - got;
    struct iovec local = {buf + got, chunk};
    /* NOLINTNEXTLINE(performance-no-int-to-ptr) */
    struct iovec remote = {(void *)(uintptr_t)a, chunk};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n <= 0) {
      char path[64];
      snprintf(path, sizeof path, "/proc/%d/mem", (int)pid);
      int mfd = open(path, O_RDONLY | O_CLOEXEC);
      n = mfd >= 0 ? pread(mfd, buf + got, chunk, (off_t)a) : -1;
      if (mfd >= 0) close(mfd);
      if (n <= 0) break;
    }
    void *nul = memchr(buf + got, 0, (size_t)n);
    if (nul) {
      lua_pushlstring(L, buf, (size_t)((char *)nul - buf));
      return;
    }
    got += (size_t)n;
  }
  if (got == 0)
    lua_pushnil(L);
  else
    lua_pushlstring(L, buf, got); /* cut at the bound */
}

static void push_sockaddr(lua_State *L, pid_t pid, uint64_t addr, uint64_t len) {
  unsigned char buf[MAX_SOCKADDR];
  if (!addr || len < sizeof(sa_family_t)) {
    lua_pushnil(L);
    return;
  }
  if (len > sizeof buf) len = sizeof buf;
  struct iovec local = {buf, (size_t)len};
  /* NOLINTNEXTLINE(performance-no-int-to-ptr) */
  struct iovec remote = {(void *)(uintptr_t)addr, (size_t)len};
  ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (n < (ssize_t)sizeof(sa_family_t)) {
    lua_pushnil(L);
    return;
  }
  sa_family_t fam;
  memcpy(&fam, buf, sizeof fam);
  lua_createtable(L, 0, 3);
  char text[INET6_ADDRSTRLEN];
  if (fam == AF_INET && n >= (ssize_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in sin;
    memcpy(&sin, buf, sizeof sin);
    lua_pushliteral(L, "inet");
    lua_setfield(L, -2, "family");
    inet_ntop(AF_INET, &sin.sin_addr, text, sizeof text);
    lua_pushstring(L, text);
    lua_setfield(L, -2, "address");
    lua_pushinteger(L, ntohs(sin.sin_port));
    lua_setfield(L, -2, "port");
  } else if (fam == AF_INET6 && n >= (ssize_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 s6;
    memcpy(&s6, buf, sizeof s6);
    lua_pushliteral(L, "inet6");
    lua_setfield(L, -2, "family");
    inet_ntop(AF_INET6, &s6.sin6_addr, text, sizeof text);
    lua_pushstring(L, text);
    lua_setfield(L, -2, "address");
    lua_pushinteger(L, ntohs(s6.sin6_port));
    lua_setfield(L, -2, "port");
  } else if (fam == AF_UNIX) {
    lua_pushliteral(L, "unix");
    lua_setfield(L, -2, "family");
    size_t off = offsetof(struct sockaddr_un, sun_path);
    if ((size_t)n > off) {
      const char *p = (const char *)buf + off;
      size_t pl = (size_t)n - off;
      if (p[0] == 0) { /* abstract: shown with a leading '@' */
        lua_pushliteral(L, "@");
        lua_pushlstring(L, p + 1, pl - 1);
        lua_concat(L, 2);
      } else {
        lua_pushlstring(L, p, strnlen(p, pl));
      }
      lua_setfield(L, -2, "path");
    }
  } else {
    lua_pushinteger(L, fam);
    lua_setfield(L, -2, "family");
  }
}

/* Which arguments are paths or socket addresses, by syscall name. */
typedef struct arg_kind {
  const char *name;
  signed char path1, path2, sa, salen;
} arg_kind;
static const arg_kind arg_kinds[] = {
    {"open", 0, -1, -1, -1},       {"openat", 1, -1, -1, -1},     {"openat2", 1, -1, -1, -1},
    {"creat", 0, -1, -1, -1},      {"stat", 0, -1, -1, -1},       {"lstat", 0, -1, -1, -1},
    {"newfstatat", 1, -1, -1, -1}, {"statx", 1, -1, -1, -1},      {"access", 0, -1, -1, -1},
    {"faccessat", 1, -1, -1, -1},  {"faccessat2", 1, -1, -1, -1}, {"execve", 0, -1, -1, -1},
    {"execveat", 1, -1, -1, -1},   {"mkdir", 0, -1, -1, -1},      {"mkdirat", 1, -1, -1, -1},
    {"rmdir", 0, -1, -1, -1},      {"unlink", 0, -1, -1, -1},     {"unlinkat", 1, -1, -1, -1},
    {"rename", 0, 1, -1, -1},      {"renameat", 1, 3, -1, -1},    {"renameat2", 1, 3, -1, -1},
    {"link", 0, 1, -1, -1},        {"linkat", 1, 3, -1, -1},      {"symlink", 0, 1, -1, -1},
    {"symlinkat", 0, 2, -1, -1},   {"readlink", 0, -1, -1, -1},   {"readlinkat", 1, -1, -1, -1},
    {"chmod", 0, -1, -1, -1},      {"fchmodat", 1, -1, -1, -1},   {"chown", 0, -1, -1, -1},
    {"lchown", 0, -1, -1, -1},     {"fchownat", 1, -1, -1, -1},   {"truncate", 0, -1, -1, -1},
    {"chdir", 0, -1, -1, -1},      {"chroot", 0, -1, -1, -1},     {"mount", 0, 1, -1, -1},
    {"umount2", 0, -1, -1, -1},    {"utimensat", 1, -1, -1, -1},  {"mknod", 0, -1, -1, -1},
    {"mknodat", 1, -1, -1, -1},    {"statfs", 0, -1, -1, -1},     {"pivot_root", 0, 1, -1, -1},
    {"connect", -1, -1, 1, 2},     {"bind", -1, -1, 1, 2},        {"sendto", -1, -1, 4, 5},
};

/* Syscall names and argument kinds by number, resolved once per number (libseccomp's lookup
 * allocates and scans a table: too slow for every notification). */
typedef struct syscall_info {
  char name[40];
  signed char kind; /* index in arg_kinds, -1: no path or address arguments */
  unsigned char known;
} syscall_info;

#define SYSCALL_CACHE 1024

static const syscall_info *syscall_of(uint32_t arch, int nr) {
  static syscall_info cache[2][SYSCALL_CACHE];
  static syscall_info other;
  int a = arch == AUDIT_ARCH_X86_64 ? 0 : arch == AUDIT_ARCH_I386 ? 1 : -1;
  syscall_info *si = a >= 0 && nr >= 0 && nr < SYSCALL_CACHE ? &cache[a][nr] : &other;
  if (si->known && si != &other) return si;
  char *name = seccomp_syscall_resolve_num_arch(arch, nr);
  const char *x = !name && arch == AUDIT_ARCH_X86_64 ? extra_name(nr) : NULL;
  snprintf(si->name, sizeof si->name, "%s", name ? name : x ? x : "?");
  free(name);
  si->kind = -1;
  for (size_t k = 0; k < CL_ARRAY_LEN(arg_kinds); k++)
    if (strcmp(arg_kinds[k].name, si->name) == 0) si->kind = (signed char)k;
  si->known = 1;
  return si;
}

/* Adds the path and socket address arguments the target passed; returns whether it read any. */
static int push_remote_args(lua_State *L, int ev, const arg_kind *ak, struct seccomp_notif *req) {
  if (ak->path1 >= 0) {
    push_remote_string(L, (pid_t)req->pid, req->data.args[ak->path1]);
    lua_setfield(L, ev, "path");
  }
  if (ak->path2 >= 0) {
    push_remote_string(L, (pid_t)req->pid, req->data.args[ak->path2]);
    lua_setfield(L, ev, "path2");
  }
  if (ak->sa >= 0) {
    push_sockaddr(L, (pid_t)req->pid, req->data.args[ak->sa], req->data.args[ak->salen]);
    lua_setfield(L, ev, "sockaddr");
  }
  return 1;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
  return 1;
}

/* Continuation of handler_task: the handler returned (status LUA_OK/LUA_YIELD) or failed. */
static int handler_task_k(lua_State *L, int status, lua_KContext ctx) {
  CL_UNUSED(ctx);
  supervisor *sv = luaL_checkudata(L, 1, SUPER_MT);
  int slot = (int)lua_tointeger(L, 2);
  uint64_t gen = (uint64_t)lua_tointeger(L, 3);
  int ok = status == LUA_OK || status == LUA_YIELD;
  if (sv->closed || slot >= sv->max_pending) return 0;
  pending *pd = &sv->slots[slot];
  if (!pd->busy || pd->gen != gen) return 0; /* answered already (timeout): nothing to say */
  if (!ok) {
    sv->errors++;
    fprintf(stderr, "clawlua: seccomp notify handler failed: %s\n", lua_tostring(L, -1));
    char reason[200];
    const char *msg = lua_tostring(L, -1);
    snprintf(reason, sizeof reason, "handler error: %s", msg ? msg : "?");
    char *nl = strchr(reason, '\n');
    if (nl) *nl = 0;
    decide(pd, 0, EPERM, reason);
    return 0;
  }
  int t = lua_type(L, -1);
  if (t == LUA_TSTRING && strcmp(lua_tostring(L, -1), "allow") == 0) {
    decide(pd, 1, 0, NULL);
  } else if (t == LUA_TSTRING && strcmp(lua_tostring(L, -1), "deny") == 0) {
    decide(pd, 0, EPERM, "handler");
  } else if (lua_isinteger(L, -1) && lua_tointeger(L, -1) > 0 && lua_tointeger(L, -1) < 4096) {
    decide(pd, 0, (int)lua_tointeger(L, -1), "handler");
  } else {
    sv->errors++;
    fprintf(stderr,
            "clawlua: seccomp notify handler returned %s; \"allow\", \"deny\" or an "
            "errno expected: denied\n",
            luaL_typename(L, -1));
    decide(pd, 0, EPERM, "bad handler result");
  }
  return 0;
}

/* Runs as a task: calls the handler with the event (it may wait: the call yields) and answers
 * unless the answer is late. Arguments: supervisor, slot, generation, handler, event. */
static int handler_task(lua_State *L) {
  lua_settop(L, 5);
  lua_pushcfunction(L, traceback);
  lua_pushvalue(L, 4);
  lua_pushvalue(L, 5);
  int st = lua_pcallk(L, 1, 1, 6, 0, handler_task_k);
  return handler_task_k(L, st, 0);
}

static void handle_notification(supervisor *sv, struct seccomp_notif *req, int handler_idx,
                                int sv_idx) {
  lua_State *L = sv->L;
  sv->received++;
  int slot = -1;
  for (int i = 0; i < sv->max_pending; i++)
    if (!sv->slots[i].busy) {
      slot = i;
      break;
    }
  const syscall_info *si = syscall_of(req->data.arch, req->data.nr);
  const char *sname = si->name;
  if (slot < 0) { /* bounded: beyond max_pending in flight, deny at once */
    sv->overloaded++;
    sv->denied++;
    respond(sv, req->id, 0, EPERM);
    pending tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.pid = (pid_t)req->pid;
    tmp.started = cl_now();
    snprintf(tmp.syscall, sizeof tmp.syscall, "%s", sname);
    audit_decision(sv, &tmp, "deny", EPERM, "overload");
    return;
  }
  int top = lua_gettop(L);
  lua_createtable(L, 0, 10);
  int ev = lua_gettop(L);
  lua_pushinteger(L, req->pid);
  lua_setfield(L, ev, "pid");
  lua_pushstring(L, sname);
  lua_setfield(L, ev, "syscall");
  lua_pushinteger(L, req->data.nr);
  lua_setfield(L, ev, "nr");
  lua_pushstring(L, req->data.arch == AUDIT_ARCH_X86_64 ? "x86_64"
                    : req->data.arch == AUDIT_ARCH_I386 ? "x86"
                                                        : "other");
  lua_setfield(L, ev, "arch");
  lua_pushinteger(L, (lua_Integer)req->id);
  lua_setfield(L, ev, "id");
  lua_createtable(L, 6, 0);
  for (int i = 0; i < 6; i++) {
    lua_pushinteger(L, (lua_Integer)req->data.args[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, ev, "args");
  if (si->kind >= 0 && push_remote_args(L, ev, &arg_kinds[si->kind], req)) {
    /* What we read is only meaningful if the target is still in this syscall: the pid could
     * have been recycled, or the call interrupted, while we read. (Without such reads the
     * answer itself is refused for a stale id: no check needed.) */
    uint64_t id = req->id;
    if (ioctl(sv->fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) < 0) {
      sv->stale++;
      lua_settop(L, top);
      return;
    }
  }
  pending *pd = &sv->slots[slot];
  pd->busy = 1;
  pd->id = req->id;
  pd->pid = (pid_t)req->pid;
  pd->started = cl_now();
  pd->task_ref = LUA_NOREF;
  snprintf(pd->syscall, sizeof pd->syscall, "%s", sname);
  sv->npending++;
  cl_timer_start(sv->loop, &pd->timer, cl_deadline(sv->timeout), on_slot_timeout);
  lua_pushcfunction(L, handler_task);
  lua_pushvalue(L, sv_idx);
  lua_pushinteger(L, slot);
  lua_pushinteger(L, (lua_Integer)pd->gen);
  lua_pushvalue(L, handler_idx);
  lua_pushvalue(L, ev);
  cl_task_spawn(L, 5);
  pd->task_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_settop(L, top);
}

static void supervisor_stop(supervisor *sv) {
  if (sv->closed) return;
  sv->closed = 1;
  /* Deny what is still waiting, so no target stays blocked on a supervisor that is gone. */
  for (int i = 0; sv->slots && i < sv->max_pending; i++)
    if (sv->slots[i].busy) decide(&sv->slots[i], 0, EPERM, "supervisor closed");
  cl_watch_stop(&sv->watch);
  if (sv->fd >= 0) close(sv->fd);
  sv->fd = -1;
  free(sv->slots);
  sv->slots = NULL;
}

static void push_supervisor(lua_State *L, supervisor *sv) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SV_KEY); /* weak table: pointer -> userdata */
  lua_rawgetp(L, -1, sv);
  lua_remove(L, -2);
}

static void on_notify_fd(cl_watch *w, uint32_t events) {
  supervisor *sv = w->data;
  lua_State *L = sv->L;
  int top = lua_gettop(L);
  push_supervisor(L, sv);
  int svi = lua_gettop(L);
  if (lua_isnil(L, svi)) {
    lua_settop(L, top);
    return;
  }
  lua_getiuservalue(L, svi, 1);
  int hi = lua_gettop(L);
  if (events & EPOLLIN) {
    /* One per readiness report: epoll is level-triggered, and readable means a notification
     * was waiting, so RECV cannot block (one that vanished since, its target killed, gives
     * ENOENT). */
    struct seccomp_notif req;
    memset(&req, 0, sizeof req);
    if (ioctl(sv->fd, SECCOMP_IOCTL_NOTIF_RECV, &req) == 0) handle_notification(sv, &req, hi, svi);
  }
  if ((events & (EPOLLHUP | EPOLLERR)) && !(events & EPOLLIN)) {
    /* Every process using the filter is gone. */
    cl_watch_stop(&sv->watch);
  }
  lua_settop(L, top);
}

static supervisor *check_supervisor(lua_State *L, int i) {
  return luaL_checkudata(L, i, SUPER_MT);
}

static int supervisor_gc(lua_State *L) {
  supervisor *sv = lua_touserdata(L, 1);
  sv->finalizing = 1;
  supervisor_stop(sv);
  return 0;
}

void cl_seccomp_supervise(lua_State *L, int prep_idx, pid_t pid, const char *sandbox) {
  prep_idx = lua_absindex(L, prep_idx);
  cl_seccomp_prog *p = luaL_checkudata(L, prep_idx, PREP_MT);
  supervisor *sv = lua_newuserdatauv(L, sizeof *sv, 1);
  memset(sv, 0, sizeof *sv);
  sv->fd = -1;
  sv->closed = 1;
  luaL_setmetatable(L, SUPER_MT);
  int svi = lua_gettop(L);
  lua_getiuservalue(L, prep_idx, 1);
  lua_setiuservalue(L, svi, 1);
  sv->slots = calloc((size_t)p->max_pending, sizeof *sv->slots);
  if (!sv->slots) out_of_memory(L);
  sv->closed = 0;
  lua_State *main;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main = lua_tothread(L, -1);
  lua_pop(L, 1);
  sv->L = main;
  sv->loop = cl_loop_get(L);
  sv->timeout = p->timeout;
  sv->max_pending = p->max_pending;
  sv->pid = pid;
  if (sandbox) snprintf(sv->sandbox, sizeof sv->sandbox, "%s", sandbox);
  for (int i = 0; i < sv->max_pending; i++) {
    sv->slots[i].sv = sv;
    sv->slots[i].task_ref = LUA_NOREF;
  }
  sv->fd = p->listener;
  p->listener = -1;
  /* A weak back-reference from the registry, for callbacks that start from the raw pointer. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SV_KEY);
  lua_pushvalue(L, svi);
  lua_rawsetp(L, -2, sv);
  lua_pop(L, 1);
  if (sv->fd >= 0) {
    if (cl_watch_start(sv->loop, &sv->watch, sv->fd, EPOLLIN, on_notify_fd) != 0)
      luaL_error(L, "seccomp: cannot watch the notify fd: %s", strerror(errno));
    sv->watch.data = sv;
    if (p->carry_valid) {
      p->carry_valid = 0;
      lua_getiuservalue(L, svi, 1);
      handle_notification(sv, &p->carry, lua_gettop(L), svi);
      lua_pop(L, 1);
    }
  }
}

/* Lua: supervisor:stats() -> {received, allowed, denied, timeouts, errors, overloaded, stale,
 * pending, active} */
static int l_sv_stats(lua_State *L) {
  supervisor *sv = check_supervisor(L, 1);
  lua_createtable(L, 0, 9);
  lua_Integer v[] = {sv->received, sv->allowed,    sv->denied, sv->timeouts,
                     sv->errors,   sv->overloaded, sv->stale,  sv->npending};
  const char *n[] = {"received", "allowed",    "denied", "timeouts",
                     "errors",   "overloaded", "stale",  "pending"};
  for (size_t i = 0; i < CL_ARRAY_LEN(v); i++) {
    lua_pushinteger(L, v[i]);
    lua_setfield(L, -2, n[i]);
  }
  lua_pushboolean(L, !sv->closed && sv->watch.active);
  lua_setfield(L, -2, "active");
  return 1;
}

static int l_sv_close(lua_State *L) {
  supervisor_stop(check_supervisor(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}

static int l_sv_fd(lua_State *L) {
  supervisor *sv = check_supervisor(L, 1);
  lua_pushinteger(L, sv->fd);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */

static const luaL_Reg filter_methods[] = {
    {"bpf", l_bpf}, {"pfc", l_pfc}, {"info", l_info}, {"close", l_filter_close}, {NULL, NULL},
};

static const luaL_Reg sv_methods[] = {
    {"stats", l_sv_stats},
    {"close", l_sv_close},
    {"fd", l_sv_fd},
    {NULL, NULL},
};

/* Lua: seccomp.load_oci(src, opts), seccomp.load_firecracker(src, opts): profile loaders written
 * in Lua (lua/clawlua/seccomp_profiles.lua). */
static int l_load_oci(lua_State *L) {
  return cl_call_lua(L, "clawlua.seccomp_profiles", "oci");
}
static int l_load_firecracker(lua_State *L) {
  return cl_call_lua(L, "clawlua.seccomp_profiles", "firecracker");
}

static const luaL_Reg funcs[] = {
    {"filter", l_filter},     {"firecracker_file", cl_seccomp_firecracker_file},
    {"load_oci", l_load_oci}, {"load_firecracker", l_load_firecracker},
    {"resolve", l_resolve},   {NULL, NULL},
};

int luaopen_clawlua_seccomp(lua_State *L) {
  if (cl_entry_redirect(L, "seccomp")) return 1;
  luaL_newmetatable(L, FILTER_MT);
  luaL_newlib(L, filter_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, filter_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, filter_gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, l_filter_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  luaL_newmetatable(L, PREP_MT);
  lua_pushcfunction(L, prep_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, SUPER_MT);
  luaL_newlib(L, sv_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, supervisor_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_sv_close);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 1);
  /* supervisor pointer -> userdata, weak values */
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "v");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &SV_KEY);
  luaL_newlib(L, funcs);
  lua_pushinteger(L, (lua_Integer)seccomp_api_get());
  lua_setfield(L, -2, "api_level");
  const struct scmp_version *v = seccomp_version();
  lua_pushfstring(L, "%d.%d.%d", (int)v->major, (int)v->minor, (int)v->micro);
  lua_setfield(L, -2, "libseccomp_version");
  lua_pushstring(L, arch_name(seccomp_arch_native()));
  lua_setfield(L, -2, "native_arch");
  /* Whether this kernel (or emulator: valgrind has no seccomp) takes filters with notify. */
  uint32_t act = SECCOMP_RET_USER_NOTIF;
  lua_pushboolean(L, syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, &act) == 0 &&
                         seccomp_api_get() >= 6);
  lua_setfield(L, -2, "available");
  return 1;
}
