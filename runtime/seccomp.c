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
#include "seccomp_int.h"

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

void cl_seccomp_oom(lua_State *L) {
  luaL_error(L, "seccomp: out of memory");
  abort(); /* not reached */
}

filter *cl_seccomp_check_filter(lua_State *L, int i) {
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

/* A context for the given architectures; NULL on failure, with *bad_arch set to the one
 * libseccomp refused (mixed endianness, say), else 0. */
static scmp_filter_ctx new_ctx(const filter *f, const uint32_t *arches, int narch,
                               uint32_t *bad_arch) {
  *bad_arch = 0;
  scmp_filter_ctx ctx = seccomp_init(f->def);
  if (!ctx) return NULL;
  uint32_t native = seccomp_arch_native();
  int keep_native = 0;
  for (int i = 0; i < narch; i++) keep_native |= arches[i] == native;
  for (int i = 0; i < narch; i++)
    if (arches[i] != native && seccomp_arch_add(ctx, arches[i]) < 0) {
      *bad_arch = arches[i];
      goto fail;
    }
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

/* The message for a context that could not be made: which of f's architectures was refused. */
static void ctx_error(const filter *f, uint32_t bad_arch, char *err, size_t errlen) {
  for (int i = 0; bad_arch && i < f->narch; i++)
    if (f->arches[i] == bad_arch) {
      snprintf(err, errlen,
               "bad field 'arches[%d]' (libseccomp cannot combine it with the filter's other "
               "architectures)",
               i + 1);
      return;
    }
  snprintf(err, errlen, "libseccomp: cannot set up the filter");
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
    uint32_t bad_arch;
    scmp_filter_ctx ctx = new_ctx(f, f->arches, f->narch, &bad_arch);
    if (!ctx) {
      ctx_error(f, bad_arch, err, errlen);
      return NULL;
    }
    rc = add_rules(f, ctx, has_extra && with_native, &bad);
    if (rc < 0) goto rule_fail_one;
    return ctx;
  rule_fail_one:
    seccomp_release(ctx);
    goto rule_fail;
  }
  uint32_t bad_a, bad_b;
  scmp_filter_ctx a = new_ctx(f, &native, 1, &bad_a), b = new_ctx(f, others, nothers, &bad_b);
  if (!a || !b) {
    if (a) seccomp_release(a);
    if (b) seccomp_release(b);
    ctx_error(f, bad_a ? bad_a : bad_b, err, errlen);
    return NULL;
  }
  rc = add_rules(f, a, 1, &bad);
  if (rc == 0) rc = add_rules(f, b, 0, &bad);
  if (rc < 0) {
    seccomp_release(a);
    seccomp_release(b);
    goto rule_fail;
  }
  rc = seccomp_merge(a, b);
  if (rc < 0) {
    seccomp_release(a);
    snprintf(err, errlen,
             "libseccomp cannot merge the rules of the native architecture with the others': %s",
             strerror(-rc));
    return NULL;
  }
  return a;
rule_fail:
  /* EEXIST: libseccomp keeps one action per syscall and argument test */
  snprintf(err, errlen, "rules[%u] (%s): libseccomp rejected it: %s%s", f->rules[bad].src,
           f->rules[bad].name, strerror(-rc),
           rc == -EEXIST ? " (an earlier rule has the same syscall and argument tests with "
                           "another action)"
                         : "");
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

/* The index + 1 of r's first test other than == and masked == that comes before a test of a later
 * argument, or 0. */
static unsigned branching_test(const rule *r) {
  unsigned last = 0;
  for (unsigned k = 0; k < r->nargs; k++)
    if (r->args[k].arg > last) last = r->args[k].arg;
  for (unsigned k = 0; k < r->nargs; k++)
    if (r->args[k].op != SCMP_CMP_EQ && r->args[k].op != SCMP_CMP_MASKED_EQ &&
        r->args[k].arg < last)
      return k + 1;
  return 0;
}

static int same_rule(const rule *a, const rule *b) {
  return a->action == b->action && a->nargs == b->nargs &&
         memcmp(a->args, b->args, a->nargs * sizeof a->args[0]) == 0;
}

static int by_name(const void *a, const void *b, void *rules) {
  const rule *x = (const rule *)rules + *(const size_t *)a;
  const rule *y = (const rule *)rules + *(const size_t *)b;
  int c = strcmp(x->name, y->name);
  if (c == 0) c = (x->extra > y->extra) - (x->extra < y->extra);
  return c;
}

/* by_name, then by position: the rules of one syscall in the order they were given */
static int by_name_pos(const void *a, const void *b, void *rules) {
  int c = by_name(a, b, rules);
  if (c == 0)
    c = (*(const size_t *)a > *(const size_t *)b) - (*(const size_t *)a < *(const size_t *)b);
  return c;
}

/* libseccomp (2.5.4, Debian 12's; newer releases not tried) turns a 64-bit argument
 * test other than == and masked == into two paths to the next argument's test, and merging another
 * rule for the same syscall into such a rule goes wrong (the shared node linked in twice, by our
 * reading of its db.c; not traced): the filter then allows calls that no rule allows (dup3 under
 * {a2 == 8, a0 != 7} and {a0 != 6, a3 == 8} runs for dup3(6, 100, 0, 8)), or the merge loops for
 * ever (found by fuzz_lua_seccomp_profiles). Such a pair is refused before libseccomp sees it; a
 * rule like that on its own, and copies of one rule, build correctly. Returns 0, or -1 with err
 * set. */
static int check_merges(const filter *f, char *err, size_t errlen) {
  size_t n = 0, *idx = NULL;
  for (size_t i = 0; i < f->nrules; i++) n += branching_test(&f->rules[i]) != 0;
  if (n == 0) return 0;
  if (!(idx = malloc(f->nrules * sizeof *idx))) {
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  for (size_t i = 0; i < f->nrules; i++) idx[i] = i;
  qsort_r(idx, f->nrules, sizeof *idx, by_name_pos, f->rules);
  int rc = 0;
  for (size_t g = 0; g < f->nrules && rc == 0;) {
    size_t e = g + 1;
    while (e < f->nrules && by_name(&idx[g], &idx[e], f->rules) == 0) e++;
    /* the syscall's first such rule, and the first of its rules that is not a copy of it */
    const rule *r = NULL, *o = NULL;
    unsigned k = 0;
    for (size_t i = g; i < e && !r; i++)
      if ((k = branching_test(&f->rules[idx[i]]))) r = &f->rules[idx[i]];
    for (size_t i = g; r && i < e && !o; i++)
      if (!same_rule(r, &f->rules[idx[i]])) o = &f->rules[idx[i]];
    if (o) {
      static const char *const ops[] = {"", "!=", "<", "<=", "==", ">=", ">", "&=="};
      const struct scmp_arg_cmp *t = &r->args[k - 1];
      snprintf(err, errlen,
               "rules[%u] (%s): its test 'a%u %s %llu' comes before a later argument's, and "
               "libseccomp merges another rule for the syscall (rules[%u]) into such a test "
               "wrongly (the filter can allow calls no rule allows, or never be built); keep "
               "it the syscall's only rule",
               r->src, r->name, t->arg, t->op < 8 ? ops[t->op] : "?",
               (unsigned long long)t->datum_a, o->src);
      rc = -1;
    }
    g = e;
  }
  free(idx);
  return rc;
}

static int compile(filter *f, char *err, size_t errlen) {
  if (check_merges(f, err, errlen)) return EINVAL;
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
  if (lua_getfield(L, 1, "default") != LUA_TNIL) f->def = cl_seccomp_parse_action(L, -1, "default");
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
      uint32_t tok = a ? cl_seccomp_arch_token(a) : 0;
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
      cl_seccomp_add_rule(L, f, -1, i, report);
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
  char err[512];
  int e = compile(f, err, sizeof err);
  if (e) return luaL_error(L, "seccomp: %s", err);
  lua_pushvalue(L, report);
  lua_setiuservalue(L, fi, 2);
  lua_settop(L, fi);
  return 1;
}

/* Lua: f:bpf() -> string of struct sock_filter (8 bytes each, host byte order) */
static int l_bpf(lua_State *L) {
  filter *f = cl_seccomp_check_filter(L, 1);
  lua_pushlstring(L, (const char *)f->bpf, f->ninsn * sizeof(struct sock_filter));
  return 1;
}

/* Lua: f:pfc() -> libseccomp's pseudo filter code, for review */
static int l_pfc(lua_State *L) {
  filter *f = cl_seccomp_check_filter(L, 1);
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
  filter *f = cl_seccomp_check_filter(L, 1);
  lua_createtable(L, 0, 9);
  lua_pushinteger(L, (lua_Integer)f->ninsn);
  lua_setfield(L, -2, "instructions");
  lua_pushinteger(L, (lua_Integer)f->nrules);
  lua_setfield(L, -2, "rules");
  lua_pushinteger(L, (lua_Integer)f->redundant);
  lua_setfield(L, -2, "redundant");
  lua_createtable(L, f->narch, 0);
  for (int i = 0; i < f->narch; i++) {
    lua_pushstring(L, cl_seccomp_arch_name(f->arches[i]));
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "arches");
  cl_seccomp_push_action(L, f->def);
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
    cl_seccomp_push_action(L, f->rules[i].action);
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
    cl_seccomp_check_filter(L, -1);
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
    arch = cl_seccomp_arch_token(luaL_checkstring(L, 2));
    if (!arch) return luaL_argerror(L, 2, "unknown architecture");
  }
  if (lua_type(L, 1) == LUA_TNUMBER) {
    char *n = seccomp_syscall_resolve_num_arch(arch, (int)luaL_checkinteger(L, 1));
    if (n) {
      lua_pushstring(L, n);
      free(n);
      return 1;
    }
    const char *x =
        arch == SCMP_ARCH_X86_64 ? cl_seccomp_extra_name((int)lua_tointeger(L, 1)) : NULL;
    if (!x) return 0;
    lua_pushstring(L, x);
    return 1;
  }
  const char *name = luaL_checkstring(L, 1);
  int nr = seccomp_syscall_resolve_name_arch(arch, name);
  if (nr < 0 && arch == SCMP_ARCH_X86_64) nr = cl_seccomp_extra_nr(name);
  if (nr < 0) return 0;
  lua_pushinteger(L, nr);
  return 1;
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

/* Lua: seccomp.load_oci(src, opts), seccomp.load_firecracker(src, opts): profile loaders written
 * in Lua (lua/clawlua/seccomp_profiles.lua). */
static int l_load_oci(lua_State *L) {
  return cl_call_lua(L, "clawlua.seccomp_profiles", "oci");
}

static int l_load_firecracker(lua_State *L) {
  return cl_call_lua(L, "clawlua.seccomp_profiles", "firecracker");
}

static const luaL_Reg filter_methods[] = {
    {"bpf", l_bpf}, {"pfc", l_pfc}, {"info", l_info}, {"close", l_filter_close}, {NULL, NULL},
};

static const luaL_Reg funcs[] = {
    {"filter", l_filter},     {"firecracker_file", cl_seccomp_firecracker_file},
    {"load_oci", l_load_oci}, {"load_firecracker", l_load_firecracker},
    {"resolve", l_resolve},   {NULL, NULL},
};

int luaopen_clawlua_seccomp(lua_State *L) {
  if (cl_entry_redirect(L, "seccomp")) return 1;
  static const luaL_Reg meta[] = {{"__tostring", l_filter_tostring}, {NULL, NULL}};
  static const cl_class cls = {FILTER_MT, filter_methods, filter_gc, meta};
  cl_class_register(L, &cls);
  cl_seccomp_open_supervisor(L);
  luaL_newlib(L, funcs);
  lua_pushinteger(L, (lua_Integer)seccomp_api_get());
  lua_setfield(L, -2, "api_level");
  const struct scmp_version *v = seccomp_version();
  lua_pushfstring(L, "%d.%d.%d", (int)v->major, (int)v->minor, (int)v->micro);
  lua_setfield(L, -2, "libseccomp_version");
  lua_pushstring(L, cl_seccomp_arch_name(seccomp_arch_native()));
  lua_setfield(L, -2, "native_arch");
  /* Whether this kernel (or emulator: valgrind has no seccomp) takes filters with notify. */
  uint32_t act = SECCOMP_RET_USER_NOTIF;
  lua_pushboolean(L, syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, &act) == 0 &&
                         seccomp_api_get() >= 6);
  lua_setfield(L, -2, "available");
  return 1;
}
