/* Shared helpers: error results, option-table checks, argv vectors, signals, fd flags, byte
 * buffers. */
#include "clawlua.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void cl_push_errcode(lua_State *L, int err) {
  const char *name = err > 0 ? strerrorname_np(err) : NULL;
  if (name)
    lua_pushstring(L, name);
  else
    lua_pushinteger(L, err);
}

int cl_fail(lua_State *L, const char *what, int err) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", what, strerror(err));
  cl_push_errcode(L, err);
  return 3;
}

int cl_failf(lua_State *L, int code, const char *fmt, ...) {
  va_list ap;
  lua_pushnil(L);
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  cl_push_errcode(L, code);
  return 3;
}

static int call_lua_k(lua_State *L, int status, lua_KContext ctx) {
  CL_UNUSED(status);
  CL_UNUSED(ctx);
  return lua_gettop(L);
}

int cl_call_lua(lua_State *L, const char *module, const char *fn) {
  int nargs = lua_gettop(L);
  luaL_checkstack(L, 4, "clawlua");
  lua_getglobal(L, "require");
  lua_pushstring(L, module);
  lua_call(L, 1, 1);
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_insert(L, 1);
  /* The function may wait (yield): it finishes in the continuation. */
  lua_callk(L, nargs, LUA_MULTRET, 0, call_lua_k);
  return call_lua_k(L, LUA_OK, 0);
}

int cl_timed_out(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  lua_pushliteral(L, "ETIMEDOUT");
  return 3;
}

int cl_field_error(lua_State *L, const char *name, const char *msg) {
  luaL_error(L, "bad field '%s' (%s)", name, msg);
  __builtin_unreachable(); /* luaL_error does not return */
}

/* The one unknown-field checker: path NULL for a top-level options table (integer keys are its
 * positional part), else the nested table's path ("" for the whole of it, named `whole`). */
static void check_fields(lua_State *L, int idx, const char *path, const char *whole,
                         const char *const known[]) {
  idx = lua_absindex(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) {
      /* Integer keys are the positional part of argv-style tables; the caller checks them. */
      if (path) cl_field_error(L, *path ? path : whole, "string keys expected");
      if (lua_isinteger(L, -1)) continue;
      luaL_error(L, "bad field of type %s (string keys expected)", luaL_typename(L, -1));
    }
    const char *k = lua_tostring(L, -1);
    int ok = 0;
    for (const char *const *p = known; *p && !ok; p++) ok = strcmp(*p, k) == 0;
    if (ok) continue;
    if (!path || !*path) cl_field_error(L, k, "unknown field");
    char name[160];
    snprintf(name, sizeof name, "%s.%s", path, k);
    cl_field_error(L, name, "unknown field");
  }
}

void cl_check_fields(lua_State *L, int idx, const char *const known[]) {
  check_fields(L, idx, NULL, NULL, known);
}

void cl_check_fields_at(lua_State *L, int idx, const char *path, const char *whole,
                        const char *const known[]) {
  check_fields(L, idx, path, whole, known);
}

typedef struct nested_call {
  void (*fn)(lua_State *L, int idx, void *ud);
  void *ud;
} nested_call;

static int nested_trampoline(lua_State *L) {
  nested_call *nc = lua_touserdata(L, 2);
  lua_settop(L, 1);
  nc->fn(L, 1, nc->ud);
  return 0;
}

/* Rewrites the error message on top: "bad field 'x' (...)" becomes "bad field '<path>.x' (...)"
 * ("<path>[1]" for an index), anything else "bad field '<path>' (<message>)". */
static void prefix_error(lua_State *L, const char *path) {
  const char *msg = lua_tostring(L, -1);
  if (!msg) msg = "error object is not a string";
  static const char bad[] = "bad field '";
  if (strncmp(msg, bad, sizeof bad - 1) == 0) {
    const char *rest = msg + sizeof bad - 1;
    lua_pushfstring(L, "bad field '%s%s%s", path, rest[0] == '[' ? "" : ".", rest);
  } else {
    lua_pushfstring(L, "bad field '%s' (%s)", path, msg);
  }
  lua_replace(L, -2);
}

int cl_parse_nested(lua_State *L, int idx, const char *path,
                    void (*fn)(lua_State *L, int idx, void *ud), void *ud) {
  idx = lua_absindex(L, idx);
  nested_call nc = {fn, ud};
  luaL_checkstack(L, 4, "nested options");
  lua_pushcfunction(L, nested_trampoline);
  lua_pushvalue(L, idx);
  lua_pushlightuserdata(L, &nc);
  if (lua_pcall(L, 2, 0, 0) == LUA_OK) return 0;
  prefix_error(L, path);
  return 1;
}

static int get_field(lua_State *L, int idx, const char *name) {
  if (idx == 0 || lua_type(L, idx) != LUA_TTABLE) {
    lua_pushnil(L);
    return LUA_TNIL;
  }
  return lua_getfield(L, idx, name);
}

static void type_error(lua_State *L, const char *name, const char *want) {
  const char *got = luaL_typename(L, -1); /* the offending field value is on top */
  const char *msg = lua_pushfstring(L, "%s expected, got %s", want, got);
  cl_field_error(L, name, msg);
}

const char *cl_opt_string(lua_State *L, int idx, const char *name, const char *def) {
  int t = get_field(L, idx, name);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return def;
  }
  if (t != LUA_TSTRING) type_error(L, name, "string");
  /* The string stays valid while the option table holds it. */
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1);
  return s;
}

lua_Integer cl_opt_integer(lua_State *L, int idx, const char *name, lua_Integer def) {
  int t = get_field(L, idx, name);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return def;
  }
  int ok = 0;
  lua_Integer v = 0;
  if (t == LUA_TNUMBER) v = lua_tointegerx(L, -1, &ok);
  if (!ok) type_error(L, name, "integer");
  lua_pop(L, 1);
  return v;
}

lua_Number cl_opt_number(lua_State *L, int idx, const char *name, lua_Number def) {
  int t = get_field(L, idx, name);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return def;
  }
  if (t != LUA_TNUMBER) type_error(L, name, "number");
  lua_Number v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

int cl_opt_boolean(lua_State *L, int idx, const char *name, int def) {
  int t = get_field(L, idx, name);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return def;
  }
  if (t != LUA_TBOOLEAN) type_error(L, name, "boolean");
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

char **cl_check_argv(lua_State *L, int idx, const char *what, int allow_empty) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) != LUA_TTABLE) {
    const char *msg = lua_pushfstring(L, "table expected, got %s", luaL_typename(L, idx));
    cl_field_error(L, what, msg);
  }
  lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
  if (n == 0 && !allow_empty) cl_field_error(L, what, "empty");
  if (n > 65536) cl_field_error(L, what, "more than 65536 entries");
  char **v = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 1);
  lua_createtable(L, (int)n, 0); /* keeps the strings alive with the vector */
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_rawgeti(L, idx, i) != LUA_TSTRING) {
      const char *msg =
          lua_pushfstring(L, "entry %d is %s, string expected", (int)i, luaL_typename(L, -1));
      cl_field_error(L, what, msg);
    }
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len) {
      const char *msg = lua_pushfstring(L, "entry %d contains a NUL byte", (int)i);
      cl_field_error(L, what, msg);
    }
    v[i - 1] = (char *)s;
    lua_rawseti(L, -2, i);
  }
  v[n] = NULL;
  lua_setiuservalue(L, -2, 1);
  return v;
}

static const struct {
  const char *name;
  int sig;
} signals[] = {
    {"HUP", SIGHUP},       {"INT", SIGINT},   {"QUIT", SIGQUIT},   {"ILL", SIGILL},
    {"TRAP", SIGTRAP},     {"ABRT", SIGABRT}, {"BUS", SIGBUS},     {"FPE", SIGFPE},
    {"KILL", SIGKILL},     {"USR1", SIGUSR1}, {"SEGV", SIGSEGV},   {"USR2", SIGUSR2},
    {"PIPE", SIGPIPE},     {"ALRM", SIGALRM}, {"TERM", SIGTERM},   {"CHLD", SIGCHLD},
    {"CONT", SIGCONT},     {"STOP", SIGSTOP}, {"TSTP", SIGTSTP},   {"TTIN", SIGTTIN},
    {"TTOU", SIGTTOU},     {"URG", SIGURG},   {"XCPU", SIGXCPU},   {"XFSZ", SIGXFSZ},
    {"VTALRM", SIGVTALRM}, {"PROF", SIGPROF}, {"WINCH", SIGWINCH}, {"IO", SIGIO},
    {"PWR", SIGPWR},       {"SYS", SIGSYS},
};

int cl_signal_number(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Integer n = lua_tointeger(L, idx);
    return (n > 0 && n < NSIG) ? (int)n : -1;
  }
  const char *s = lua_tostring(L, idx);
  if (!s) return -1;
  if (strncasecmp(s, "SIG", 3) == 0) s += 3;
  for (size_t i = 0; i < CL_ARRAY_LEN(signals); i++)
    if (strcasecmp(signals[i].name, s) == 0) return signals[i].sig;
  return -1;
}

const char *cl_signal_name(int sig) {
  static const char *const full[] = {
      [SIGHUP] = "SIGHUP",       [SIGINT] = "SIGINT",   [SIGQUIT] = "SIGQUIT",
      [SIGILL] = "SIGILL",       [SIGTRAP] = "SIGTRAP", [SIGABRT] = "SIGABRT",
      [SIGBUS] = "SIGBUS",       [SIGFPE] = "SIGFPE",   [SIGKILL] = "SIGKILL",
      [SIGUSR1] = "SIGUSR1",     [SIGSEGV] = "SIGSEGV", [SIGUSR2] = "SIGUSR2",
      [SIGPIPE] = "SIGPIPE",     [SIGALRM] = "SIGALRM", [SIGTERM] = "SIGTERM",
      [SIGCHLD] = "SIGCHLD",     [SIGCONT] = "SIGCONT", [SIGSTOP] = "SIGSTOP",
      [SIGTSTP] = "SIGTSTP",     [SIGTTIN] = "SIGTTIN", [SIGTTOU] = "SIGTTOU",
      [SIGURG] = "SIGURG",       [SIGXCPU] = "SIGXCPU", [SIGXFSZ] = "SIGXFSZ",
      [SIGVTALRM] = "SIGVTALRM", [SIGPROF] = "SIGPROF", [SIGWINCH] = "SIGWINCH",
      [SIGIO] = "SIGIO",         [SIGPWR] = "SIGPWR",   [SIGSYS] = "SIGSYS",
  };
  if (sig > 0 && (size_t)sig < CL_ARRAY_LEN(full) && full[sig]) return full[sig];
  return "SIG?";
}

int cl_set_cloexec(int fd) {
  int fl = fcntl(fd, F_GETFD);
  if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) < 0) return errno;
  return 0;
}

int cl_set_nonblock(int fd, int on) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return errno;
  int nfl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  if (nfl != fl && fcntl(fd, F_SETFL, nfl) < 0) return errno;
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Byte buffers                                                                               */

int cl_buf_reserve(cl_buf *b, size_t more) {
  if (b->n + more <= b->cap) return 1;
  size_t cap = b->cap ? b->cap : 512;
  while (cap < b->n + more) cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p) return 0;
  b->p = p;
  b->cap = cap;
  return 1;
}

int cl_buf_add(cl_buf *b, const void *p, size_t n) {
  if (!cl_buf_reserve(b, n)) return 0;
  memcpy(b->p + b->n, p, n);
  b->n += n;
  return 1;
}

void cl_buf_free(cl_buf *b) {
  free(b->p);
  b->p = NULL;
  b->n = b->cap = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* MAC addresses                                                                              */

static int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

int cl_parse_mac(const char *s, uint8_t mac[6]) {
  if (!s || strlen(s) != 17) return 0;
  for (int i = 0; i < 6; i++) {
    int hi = hex_digit(s[3 * i]), lo = hex_digit(s[3 * i + 1]);
    if (hi < 0 || lo < 0 || (i < 5 && s[3 * i + 2] != ':')) return 0;
    mac[i] = (uint8_t)(hi << 4 | lo);
  }
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Classes of handles                                                                         */

void cl_class_register(lua_State *L, const cl_class *c) {
  if (!luaL_newmetatable(L, c->name)) { /* sets __name */
    lua_pop(L, 1);
    return;
  }
  if (c->methods) {
    lua_newtable(L);
    luaL_setfuncs(L, c->methods, 0);
    lua_setfield(L, -2, "__index");
  }
  if (c->close) {
    lua_pushcfunction(L, c->close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, c->close);
    lua_setfield(L, -2, "__close");
  }
  if (c->meta) luaL_setfuncs(L, c->meta, 0);
  lua_pop(L, 1);
}

void *cl_check_open(lua_State *L, int idx, const char *mt, size_t closed_offset, const char *what) {
  char *h = luaL_checkudata(L, idx, mt);
  int closed;
  memcpy(&closed, h + closed_offset, sizeof closed);
  if (closed) luaL_error(L, "attempt to use a closed %s", what);
  return h;
}
