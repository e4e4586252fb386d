/*
 * The rules of a seccomp filter read from Lua: architectures, actions ({errno=}, "notify",
 * ...), syscall names (with those newer than libseccomp) and argument comparisons, each checked
 * with the path of its field; and the way back (a rule or an action as a Lua table).
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

int cl_seccomp_extra_nr(const char *name) {
  if (seccomp_arch_native() != SCMP_ARCH_X86_64) return -1;
  for (size_t i = 0; i < CL_ARRAY_LEN(extra_syscalls); i++)
    if (strcmp(extra_syscalls[i].name, name) == 0) return extra_syscalls[i].nr;
  return -1;
}

const char *cl_seccomp_extra_name(int nr) {
  for (size_t i = 0; i < CL_ARRAY_LEN(extra_syscalls); i++)
    if (extra_syscalls[i].nr == nr) return extra_syscalls[i].name;
  return NULL;
}

uint32_t cl_seccomp_arch_token(const char *name) {
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

const char *cl_seccomp_arch_name(uint32_t tok) {
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
int cl_seccomp_errno_value(lua_State *L, int idx) {
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
uint32_t cl_seccomp_parse_action(lua_State *L, int idx, const char *field) {
  idx = lua_absindex(L, idx);
  if (lua_isinteger(L, idx)) {
    int e = cl_seccomp_errno_value(L, idx);
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
      int e = cl_seccomp_errno_value(L, -1);
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

void cl_seccomp_push_action(lua_State *L, uint32_t a) {
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

/* Is name a syscall on at least one of f's architectures? Sets *extra for clawlua's table. */
int cl_seccomp_known_syscall(const filter *f, const char *name, int *extra) {
  *extra = -1;
  for (int i = 0; i < f->narch; i++)
    if (seccomp_syscall_resolve_name_arch(f->arches[i], name) >= 0) return 1;
  if (seccomp_syscall_resolve_name(name) != __NR_SCMP_ERROR) {
    /* Known to libseccomp but not on these architectures (e.g. "chown32" on x86_64 alone). */
    return 0;
  }
  int native = 0;
  for (int i = 0; i < f->narch; i++) native |= f->arches[i] == seccomp_arch_native();
  int nr = cl_seccomp_extra_nr(name);
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

rule *cl_seccomp_push_rule(lua_State *L, filter *f) {
  if (f->nrules == f->cap) {
    if (f->cap >= MAX_RULES) luaL_error(L, "seccomp: more than %d rules", MAX_RULES);
    size_t nc = f->cap ? f->cap * 2 : 32;
    rule *nr = realloc(f->rules, nc * sizeof *nr);
    if (!nr) cl_seccomp_oom(L);
    f->rules = nr;
    f->cap = nc;
  }
  rule *r = &f->rules[f->nrules];
  memset(r, 0, sizeof *r);
  return r;
}

/* Adds the rule table at idx (rules[i]); unknown names go to the report list at `report`. */
void cl_seccomp_add_rule(lua_State *L, filter *f, int idx, lua_Integer pos, int report) {
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
    action = cl_seccomp_parse_action(L, ai, lua_pushfstring(L, "%s.action", where));
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
    if (strlen(name) >= sizeof proto.name || !cl_seccomp_known_syscall(f, name, &extra)) {
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
    rule *r = cl_seccomp_push_rule(L, f);
    *r = proto;
    strcpy(r->name, name);
    r->extra = extra;
    r->src = (unsigned)pos;
    f->nrules++;
    lua_pop(L, 1);
  }
  lua_settop(L, top);
}
