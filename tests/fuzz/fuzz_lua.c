/*
 * The generic harness for parsers written in Lua: built once per tests/fuzz/targets/<name>.lua
 * as fuzz_lua_<name>, with CLAWLUA_FUZZ_LUA_TARGET naming that file. The file is a chunk that
 * gets the clawlua namespace as its argument and returns function(data); the harness calls it
 * with each input as a string. The function checks its own oracle and raises when it breaks
 * (expected failures of the parser are the function's business): any error that escapes is a
 * finding, reported with its traceback.
 *
 * Coverage of the Lua code itself: the stock liblua and the Lua files are not instrumented, so
 * a line hook feeds libFuzzer's extra counters (a section it scans like its own edge counters)
 * with the pair (previous line, this line) of every line event, hashed over the chunk's source
 * and the line number. Without it every input that stays in Lua looks alike and the corpus
 * never grows past the seeds. Tasks and coroutines inherit the hook from the thread that
 * creates them (lua_newthread copies it).
 */
#include <stdint.h>

#include "fuzz_lua_state.h"

#define FZ_LUA_COUNTERS (1u << 16)

__attribute__((used,
               section("__libfuzzer_extra_counters"))) static uint8_t fz_lua_cov[FZ_LUA_COUNTERS];
static uint32_t fz_prev_line;

static void fz_line_hook(lua_State *L, lua_Debug *ar) {
  if (!lua_getinfo(L, "S", ar)) return;
  uint32_t h = (uint32_t)(uintptr_t)ar->source * 2654435761u ^ (uint32_t)ar->currentline * 40503u;
  h ^= h >> 15;
  uint32_t i = (h ^ fz_prev_line) & (FZ_LUA_COUNTERS - 1);
  if (fz_lua_cov[i] != 255) fz_lua_cov[i]++;
  fz_prev_line = h >> 1;
}

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
  lua_sethook(L, fz_line_hook, LUA_MASKLINE, 0);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, target_ref);
  lua_pushlstring(L, (const char *)data, size);
  fz_prev_line = 0;
  fz_call(L, 1, 0, CLAWLUA_FUZZ_LUA_TARGET);
  return fz_done(L);
}
