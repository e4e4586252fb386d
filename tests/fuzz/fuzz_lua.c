/*
 * The generic harness for parsers written in Lua: built once per tests/fuzz/targets/<name>.lua
 * as fuzz_lua_<name>, with CLAWLUA_FUZZ_LUA_TARGET naming that file. The file is a chunk that
 * gets the clawlua namespace as its argument and returns function(data); the harness calls it
 * with each input as a string. The function checks its own oracle and raises when it breaks
 * (expected failures of the parser are the function's business): any error that escapes is a
 * finding, reported with its traceback.
 */
#include <stdint.h>

#include "fuzz_lua_state.h"

#ifndef CLAWLUA_FUZZ_LUA_TARGET
#error "build with -DCLAWLUA_FUZZ_LUA_TARGET=\"path/to/target.lua\""
#endif

static int target_ref = LUA_NOREF;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  lua_State *L = fz_state();
  if (luaL_loadfile(L, CLAWLUA_FUZZ_LUA_TARGET) != LUA_OK)
    fz_abort("cannot load " CLAWLUA_FUZZ_LUA_TARGET, lua_tostring(L, -1));
  lua_getglobal(L, "claw");
  fz_call(L, 1, 1, CLAWLUA_FUZZ_LUA_TARGET);
  if (!lua_isfunction(L, -1)) fz_abort(CLAWLUA_FUZZ_LUA_TARGET, "does not return a function");
  target_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, target_ref);
  lua_pushlstring(L, (const char *)data, size);
  fz_call(L, 1, 0, CLAWLUA_FUZZ_LUA_TARGET);
  return fz_done(L);
}
