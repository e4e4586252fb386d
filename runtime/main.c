/*
 * The clawlua host: a Lua 5.4 interpreter with the clawlua module preloaded. Everything the
 * command line does is in lua/clawlua/cli.lua; this file only makes the state, hands over argv
 * and turns the result into an exit status after lua_close has run every finaliser.
 */
#include "clawlua.h"

#include <stdio.h>
#include <stdlib.h>

static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_clawlua);
  lua_setfield(L, -2, "clawlua");
  lua_pop(L, 1);
  /* The namespace registers the embedded libraries, clawlua.cli among them. */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "clawlua");
  lua_call(L, 1, 0);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "clawlua.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 1, 1);
  return 1;
}

int main(int argc, char **argv) {
  cl_host_mode = 1;
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "clawlua: cannot create the Lua state: not enough memory\n");
    return 1;
  }
  lua_pushcfunction(L, msghandler);
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int status = lua_pcall(L, 2, 1, 1);
  int code;
  if (status != LUA_OK) {
    fprintf(stderr, "clawlua: %s\n", lua_tostring(L, -1));
    code = 1;
  } else {
    code = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
  }
  fflush(stdout);
  lua_close(L);
  return code;
}
