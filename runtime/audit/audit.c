/*
 * clawlua.audit, the Lua binding: the module table (audit.emit, events, query, wait,
 * configure, stats, the pid table, and the constructors of sinks, readers, the verifier and the
 * kernel source from the files below). The ring itself is ring.c; the layers are described in
 * audit_int.h.
 */
#include "audit_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define AUDIT_MT      "clawlua.audit"
#define MIN_EVENT_CAP AUDIT_MIN_EVENT_CAP
#define MAX_EVENT_CAP AUDIT_MAX_EVENT_CAP
#define MAX_CAPACITY  (1 << 24)
#define KIND_MAX      AUDIT_KIND_MAX

int cl_entry_redirect(lua_State *L, const char *name);

static int valid_kind(const char *k) {
  size_t n = strlen(k);
  if (n == 0 || n > KIND_MAX || k[0] == '.' || k[n - 1] == '.') return 0;
  for (const char *p = k; *p; p++) {
    char c = *p;
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.'))
      return 0;
    if (c == '.' && p[1] == '.') return 0;
  }
  return 1;
}

/* Lua: audit.emit(kind, [fields]) -> seq. fields.sandbox (or .vm) and fields.pid are the
 * event's attribution; everything else is its detail. */
static int l_emit(lua_State *L) {
  audit *a = lua_touserdata(L, lua_upvalueindex(1));
  const char *kind = luaL_checkstring(L, 1);
  if (kind != a->valid_kind) { /* the last kind found valid, anchored in the ring's user value */
    if (!valid_kind(kind))
      return luaL_argerror(L, 1, "event kind like 'vm.start' expected (a-z 0-9 _ - and dots)");
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, lua_upvalueindex(1), 1);
    a->valid_kind = kind;
  }
  const char *sandbox = NULL;
  lua_Integer pid = 0;
  int detail = 0;
  static const char *const lifted[] = {"sandbox", "vm", "pid", NULL};
  const char *const *skip = NULL;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    /* The keys are upvalues: lua_getfield would intern its C string on every call. Raw
     * lookups, as the detail is read raw (a miss in lua_gettable looks for __index). */
    lua_pushvalue(L, lua_upvalueindex(2));
    int has_sb = lua_rawget(L, 2) != LUA_TNIL;
    if (!has_sb) {
      lua_pop(L, 1);
      lua_pushvalue(L, lua_upvalueindex(3));
      has_sb = lua_rawget(L, 2) != LUA_TNIL;
    }
    if (has_sb) {
      if (lua_type(L, -1) != LUA_TSTRING) cl_field_error(L, "sandbox", "string expected");
      sandbox = lua_tostring(L, -1); /* anchored at index 3 */
    }
    lua_pushvalue(L, lua_upvalueindex(4));
    int has_pid = lua_rawget(L, 2) != LUA_TNIL;
    if (has_pid) {
      int ok;
      pid = lua_tointegerx(L, -1, &ok);
      if (!ok) cl_field_error(L, "pid", "integer expected");
    }
    lua_pop(L, 1);
    detail = 2;
    if (has_sb || has_pid) skip = lifted; /* the detail is the table without them */
  }
  uint64_t seq = audit_emit(L, a, kind, sandbox, (pid_t)pid, detail, skip);
  lua_pushinteger(L, (lua_Integer)seq); /* 0: dropped (emitted from inside an emit) */
  return 1;
}

static void read_filter(lua_State *L, int idx, afilter *f) {
  audit_read_filter(L, idx, f, NULL);
}

/* Pushes an array of matching events (decoded), oldest first; with a limit, the newest n. */
static int push_matches(lua_State *L, audit *a, const afilter *f) {
  lua_newtable(L);
  size_t start = 0;
  if (f->limit > 0) { /* find where the newest `limit` matches begin */
    lua_Integer found = 0;
    start = a->count;
    for (size_t i = a->count; i > 0 && found < f->limit; i--) {
      if (audit_slot_matches(f, &a->ring[(a->head + i - 1) % a->capacity])) {
        found++;
        start = i - 1;
      }
    }
  }
  lua_Integer n = 0;
  for (size_t i = start; i < a->count; i++) {
    const slot *s = &a->ring[(a->head + i) % a->capacity];
    if (!s->len || !audit_slot_matches(f, s)) continue;
    if (!cl_json_decode(L, s->rec, s->len)) { /* cannot happen: we wrote it */
      lua_pop(L, 2);
      continue;
    }
    lua_rawseti(L, -2, ++n);
  }
  return 1;
}

/* Lua: audit.events{kind=, sandbox=|vm=, pid=, since=, until=, after_seq=, limit=} -> array */
static int l_events(lua_State *L) {
  afilter f;
  read_filter(L, 1, &f);
  return push_matches(L, audit_get(L), &f);
}

static int query_iter(lua_State *L) {
  lua_Integer i = lua_tointeger(L, lua_upvalueindex(2)) + 1;
  lua_pushinteger(L, i);
  lua_replace(L, lua_upvalueindex(2));
  lua_rawgeti(L, lua_upvalueindex(1), i);
  return 1;
}

/* Lua: for ev in audit.query{...} do ... end (a snapshot taken at the call) */
static int l_query(lua_State *L) {
  l_events(L);
  lua_pushinteger(L, 0);
  lua_pushcclosure(L, query_iter, 2);
  return 1;
}

static int wait_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  audit *a = audit_get(L);
  lua_Integer after = lua_tointeger(L, 1);
  if ((lua_Integer)a->seq > after) {
    lua_pushinteger(L, (lua_Integer)a->seq);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  cl_waitq_add(&a->waiters, w);
  return cl_wait_suspend(L, w, wait_k, ctx);
}

/* Lua: audit.wait(after_seq, [timeout]) -> newest seq once an event after after_seq exists */
static int l_wait(lua_State *L) {
  audit *a = audit_get(L);
  lua_Integer after = luaL_checkinteger(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 2);
  if ((lua_Integer)a->seq > after) {
    lua_pushinteger(L, (lua_Integer)a->seq);
    return 1;
  }
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  cl_waitq_add(&a->waiters, w);
  return cl_wait_suspend(L, w, wait_k, lua_gettop(L));
}

/* Lua: audit.configure{capacity=, event_cap=} -> true */
static int l_configure(lua_State *L) {
  static const char *const fields[] = {"capacity", "event_cap", NULL};
  audit *a = audit_get(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  cl_check_fields(L, 1, fields);
  lua_Integer cap = cl_opt_integer(L, 1, "capacity", (lua_Integer)a->capacity);
  lua_Integer ecap = cl_opt_integer(L, 1, "event_cap", (lua_Integer)a->event_cap);
  if (cap < 1 || cap > MAX_CAPACITY) cl_field_error(L, "capacity", "must be 1..16777216");
  if (ecap < MIN_EVENT_CAP || ecap > MAX_EVENT_CAP)
    cl_field_error(L, "event_cap", "must be 256..1048576 bytes");
  audit_set_event_cap(a, (size_t)ecap);
  if ((size_t)cap != a->capacity && audit_resize(a, (size_t)cap) != 0)
    return cl_fail(L, "audit.configure", ENOMEM);
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: audit.stats() */
static int l_stats(lua_State *L) {
  audit *a = audit_get(L);
  lua_createtable(L, 0, 14);
  lua_pushinteger(L, (lua_Integer)a->capacity);
  lua_setfield(L, -2, "capacity");
  lua_pushinteger(L, (lua_Integer)a->count);
  lua_setfield(L, -2, "count");
  lua_pushinteger(L, (lua_Integer)a->evicted);
  lua_setfield(L, -2, "dropped");
  lua_pushinteger(L, (lua_Integer)a->seq);
  lua_setfield(L, -2, "last_seq");
  lua_pushinteger(L, a->count ? (lua_Integer)a->ring[a->head].seq : (lua_Integer)a->seq + 1);
  lua_setfield(L, -2, "first_seq");
  lua_pushinteger(L, (lua_Integer)a->truncated);
  lua_setfield(L, -2, "truncated");
  lua_pushinteger(L, (lua_Integer)a->event_cap);
  lua_setfield(L, -2, "event_cap");
  lua_Integer nslots = (lua_Integer)a->capacity, slotsz = (lua_Integer)sizeof(slot);
  lua_pushinteger(L, (lua_Integer)a->bytes + nslots * slotsz);
  lua_setfield(L, -2, "bytes");
  lua_pushinteger(L, nslots * (slotsz + (lua_Integer)a->event_cap));
  lua_setfield(L, -2, "max_bytes");
  lua_Integer nsinks = 0;
  for (asink *k = a->sinks; k; k = k->next) nsinks++;
  lua_pushinteger(L, nsinks);
  lua_setfield(L, -2, "sinks");
  lua_pushinteger(L, (lua_Integer)a->sink_dropped);
  lua_setfield(L, -2, "sink_dropped");
  lua_pushinteger(L, (lua_Integer)(a->npids - a->ngone));
  lua_setfield(L, -2, "tracked_pids");
  audit_kernel_push_state(L, a);
  lua_setfield(L, -2, "kernel");
  return 1;
}

/* Lua: audit.track_pid(pid, sandbox) / audit.forget_pid(pid) / audit.sandbox_of(pid) */
static int l_track_pid(lua_State *L) {
  lua_Integer pid = luaL_checkinteger(L, 1);
  const char *sb = luaL_checkstring(L, 2);
  luaL_argcheck(L, pid > 0, 1, "pid must be positive");
  cl_audit_track_pid(L, (pid_t)pid, sb);
  return 0;
}

static int l_forget_pid(lua_State *L) {
  cl_audit_forget_pid(L, (pid_t)luaL_checkinteger(L, 1));
  return 0;
}

static int l_sandbox_of(lua_State *L) {
  const char *sb = cl_audit_sandbox_of(L, (pid_t)luaL_checkinteger(L, 1));
  if (!sb) return 0;
  lua_pushstring(L, sb);
  return 1;
}

/* Hidden benchmark hook: audit._bench_emit(n, kind, detail) emits n events from C the way a
 * primitive does (cl_audit_emit) and returns the seconds it took. */
static int l_bench_emit(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  const char *kind = luaL_checkstring(L, 2);
  int detail = lua_istable(L, 3) ? 3 : 0;
  uint64_t t0 = cl_now_ns();
  for (lua_Integer i = 0; i < n; i++) cl_audit_emit(L, kind, NULL, 0, detail);
  lua_pushnumber(L, (double)(cl_now_ns() - t0) / 1e9);
  return 1;
}

static int audit_gc(lua_State *L) {
  audit *a = lua_touserdata(L, 1);
  audit_sinks_close_all(a);
  audit_kernel_stop(a);
  audit_release(a);
  return 0;
}

/* The functions written in Lua (lua/clawlua/audit_log.lua), loaded on first use. */
static int l_subscribe(lua_State *L) {
  return cl_call_lua(L, "clawlua.audit_log", "subscribe");
}
static int l_log_files(lua_State *L) {
  return cl_call_lua(L, "clawlua.audit_log", "log_files");
}
static int l_read_file(lua_State *L) {
  return cl_call_lua(L, "clawlua.audit_log", "read_file");
}
static int l_verify(lua_State *L) {
  return cl_call_lua(L, "clawlua.audit_log", "verify");
}

static const luaL_Reg funcs[] = {
    {"events", l_events},
    {"subscribe", l_subscribe},
    {"log_files", l_log_files},
    {"read_file", l_read_file},
    {"verify", l_verify},
    {"query", l_query},
    {"wait", l_wait},
    {"configure", l_configure},
    {"stats", l_stats},
    {"track_pid", l_track_pid},
    {"forget_pid", l_forget_pid},
    {"sandbox_of", l_sandbox_of},
    {"sink", audit_sink_open},
    {"reader", audit_reader_open},
    {"format", audit_l_format},
    {"kernel_source", audit_l_kernel_source},
    {"_verifier", audit_verifier_open},
    {"_file_head", audit_l_head},
    {"_parse_kernel", audit_l_parse_kernel},
    {NULL, NULL},
};

/* Benchmark hooks, kept off the public module: require "clawlua.audit_bench" (tests/bench). */
static const luaL_Reg bench_funcs[] = {
    {"emit", l_bench_emit},
    {"sink", audit_bench_sink},
    {"write", audit_bench_write},
    {NULL, NULL},
};

static int open_bench(lua_State *L) {
  cl_push_namespace(L); /* the ring those hooks use */
  lua_pop(L, 1);
  luaL_newlib(L, bench_funcs);
  return 1;
}

int luaopen_clawlua_audit(lua_State *L) {
  if (cl_entry_redirect(L, "audit")) return 1;
  if (!audit_get(L)) {
    audit *a = lua_newuserdatauv(L, sizeof *a, 1); /* user value: the kind emit last checked */
    if (audit_init(a, L) != 0) return luaL_error(L, "audit: out of memory");
    static const cl_class cls = {AUDIT_MT, NULL, audit_gc, NULL};
    cl_class_register(L, &cls);
    luaL_setmetatable(L, AUDIT_MT);
    audit_set(L);
    audit_sink_register(L);
    audit_record_register(L);
    audit_chain_register(L);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, open_bench);
    lua_setfield(L, -2, "clawlua.audit_bench");
    lua_pop(L, 1);
  }
  luaL_newlib(L, funcs);
  audit_push(L);
  lua_pushliteral(L, "sandbox");
  lua_pushliteral(L, "vm");
  lua_pushliteral(L, "pid");
  lua_pushcclosure(L, l_emit, 4);
  lua_setfield(L, -2, "emit");
  return 1;
}
