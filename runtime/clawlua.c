/*
 * luaopen_clawlua: builds the clawlua namespace from the primitives, registers the embedded Lua
 * libraries in package.preload under their real chunk names. Parts of a primitive written in
 * Lua (proc.run, the seccomp profile loaders, audit's file functions) are C exports that load
 * their Lua module on first use (cl_call_lua): nothing patches a C module after the fact.
 *
 * The same code runs inside the clawlua host (preloaded) and inside stock lua5.4 (clawlua.so).
 */
#include "clawlua.h"
#include "udp.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Primitives, in the order they are opened. Later primitives only add a line here. */
static const struct {
  const char *name;
  lua_CFunction open;
} primitives[] = {
    {"loop", luaopen_clawlua_loop},         {"json", luaopen_clawlua_json},
    {"stream", luaopen_clawlua_stream},     {"proc", luaopen_clawlua_proc},
    {"http", luaopen_clawlua_http},         {"audit", luaopen_clawlua_audit},
    {"seccomp", luaopen_clawlua_seccomp},   {"jail", luaopen_clawlua_jail},
    {"firewall", luaopen_clawlua_firewall}, {"vm", luaopen_clawlua_vm},
    {"udp", luaopen_clawlua_udp},
};

/* Loop functions that are also part of the top-level namespace. */
static const char *const loop_aliases[] = {
    "spawn",   "sleep",       "yield",     "now",          "time",      "current", "event",
    "channel", "on_shutdown", "on_signal", "is_cancelled", "cancelled", NULL,
};

/* Loads embedded module idx: from $CLAWLUA_LUA_DIR/<path> when that is set and the file
 * exists (development), else from the bytes compiled in. Leaves the chunk on the stack. */
static void load_embedded(lua_State *L, int idx) {
  const cl_embedded *m = &cl_embedded_modules[idx];
  const char *dir = getenv("CLAWLUA_LUA_DIR");
  if (dir && *dir) {
    /* relpath is "lua/clawlua/x.lua"; CLAWLUA_LUA_DIR names the "lua" directory. */
    const char *rel = m->relpath + 4;
    const char *path = lua_pushfstring(L, "%s/%s", dir, rel);
    if (access(path, R_OK) == 0) {
      if (luaL_loadfilex(L, path, "t") != LUA_OK) lua_error(L);
      lua_remove(L, -2);
      return;
    }
    lua_pop(L, 1);
  }
  /* The build's bytecode when this Lua accepts it (the same 5.4 it was made by), else the
   * source: a header mismatch is refused by the loader before anything runs. */
  if (m->code &&
      luaL_loadbufferx(L, (const char *)m->code, m->code_size, m->chunkname, "b") == LUA_OK)
    return;
  if (m->code) lua_pop(L, 1);
  if (luaL_loadbufferx(L, (const char *)m->data, m->size, m->chunkname, "t") != LUA_OK)
    lua_error(L);
}

int cl_open_embedded(lua_State *L, int idx) {
  const cl_embedded *m = &cl_embedded_modules[idx];
  cl_push_namespace(L); /* the Lua libraries build on the C namespace */
  lua_pop(L, 1);
  load_embedded(L, idx);
  lua_pushstring(L, m->module);
  lua_pushstring(L, m->chunkname + 1);
  lua_call(L, 2, 1);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushboolean(L, 1);
  }
  return 1;
}

static int preload_loader(lua_State *L) {
  return cl_open_embedded(L, (int)lua_tointeger(L, lua_upvalueindex(1)));
}

void cl_push_namespace(lua_State *L) {
  luaL_requiref(L, "clawlua", luaopen_clawlua, 0);
}

int cl_entry_redirect(lua_State *L, const char *name) {
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  int loaded = lua_getfield(L, -1, "clawlua") != LUA_TNIL;
  lua_pop(L, 2);
  if (loaded) return 0; /* the namespace is being built: create the module */
  cl_push_namespace(L);
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  return 1;
}

int luaopen_clawlua(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "clawlua") == LUA_TTABLE) {
    lua_remove(L, -2);
    return 1;
  }
  lua_pop(L, 1);
  int loaded = lua_gettop(L);

  lua_newtable(L);
  int ns = lua_gettop(L);
  /* Registered first, so that primitives and libraries that require "clawlua" get this
   * table instead of recursing. */
  lua_pushvalue(L, ns);
  lua_setfield(L, loaded, "clawlua");

  lua_pushliteral(L, CLAWLUA_VERSION);
  lua_setfield(L, ns, "version");
  /* Which host runs us: "clawlua" (the binary) or "lua" (a foreign interpreter). */
  lua_pushstring(L, cl_host_mode ? "clawlua" : "lua");
  lua_setfield(L, ns, "host");

  for (size_t i = 0; i < CL_ARRAY_LEN(primitives); i++) {
    lua_pushcfunction(L, primitives[i].open);
    lua_call(L, 0, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, ns, primitives[i].name);
    lua_pushfstring(L, "clawlua.%s", primitives[i].name);
    lua_insert(L, -2);
    lua_settable(L, loaded);
  }

  lua_getfield(L, ns, "loop");
  for (const char *const *a = loop_aliases; *a; a++) {
    lua_getfield(L, -1, *a);
    lua_setfield(L, ns, *a);
  }
  lua_getfield(L, -1, "run_task");
  lua_setfield(L, ns, "run");
  lua_pop(L, 1);

  /* Embedded Lua libraries. */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  for (int i = 0; cl_embedded_modules[i].module; i++) {
    lua_pushinteger(L, i);
    lua_pushcclosure(L, preload_loader, 1);
    lua_setfield(L, -2, cl_embedded_modules[i].module);
  }
  lua_pop(L, 2);

  lua_settop(L, ns);
  return 1;
}
