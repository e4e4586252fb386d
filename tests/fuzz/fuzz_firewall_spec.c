/*
 * The firewall spec compiler through the Lua API: fw:attach(id, spec) with the input decoded
 * as JSON for the spec. Every attach goes to a kernel (nf_tables over netlink: the API has no
 * compile-only path), so the harness first moves itself into a network namespace of its own
 * (unshare(CLONE_NEWNET), root needed): the rules land in that namespace's kernel, which
 * disappears with the process, and host names resolve against a resolver on its loopback,
 * which is down (no packet leaves). The contract: a bad spec raises "bad field ..." (misuse) or
 * returns nil + message (the kernel or the resolver refused); either way nothing is left
 * (fw:list() empty); an accepted spec detaches cleanly.
 */
#include <sched.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_lua_state.h"

static int fw_ref = LUA_NOREF;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  if (unshare(CLONE_NEWNET) != 0) fz_abort("unshare(CLONE_NEWNET) (needs root)", NULL);
  lua_State *L = fz_state();
  fz_push_field(L, "firewall", "open");
  lua_createtable(L, 0, 4);
  lua_pushliteral(L, "fuzz");
  lua_setfield(L, -2, "table");
  lua_createtable(L, 1, 0);
  lua_pushliteral(L, "127.0.0.1");
  lua_rawseti(L, -2, 1);
  lua_setfield(L, -2, "resolvers");
  lua_pushnumber(L, 0.05);
  lua_setfield(L, -2, "dns_timeout");
  lua_pushinteger(L, 7); /* an NFLOG group, so that specs with log = true compile */
  lua_setfield(L, -2, "log_group");
  fz_call(L, 1, 2, "firewall.open raised");
  if (lua_isnil(L, -2)) fz_abort("firewall.open", lua_tostring(L, -1));
  lua_pop(L, 1);
  fw_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* fw:<method>(...) with the arguments on top; leaves its results. */
static int fw_method(lua_State *L, const char *method, int nargs, int nres) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, fw_ref);
  lua_getfield(L, -1, method);
  lua_insert(L, -2 - nargs);
  lua_insert(L, -1 - nargs);
  return fz_pcall(L, nargs + 1, nres);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  lua_settop(L, 0);
  fz_push_field(L, "json", "decode");
  lua_pushlstring(L, (const char *)data, size);
  fz_call(L, 1, 1, "json.decode raised");
  if (!lua_istable(L, 1)) return fz_done(L);
  lua_pushliteral(L, "fz");
  lua_pushvalue(L, 1);
  int ok = fw_method(L, "attach", 2, 2); /* results at 2, 3 */
  if (!ok) {
    const char *err = lua_tostring(L, -1);
    if (!err || !strstr(err, "bad ")) fz_abort("attach raised something else than misuse", err);
  }
  int attached = ok && !lua_isnil(L, 2);
  if (ok && !attached && !lua_isstring(L, 3)) fz_abort("attach failed without a message", NULL);
  lua_settop(L, 1);
  if (attached) {
    lua_pushliteral(L, "fz");
    if (!fw_method(L, "detach", 1, 2) || lua_isnil(L, -2))
      fz_abort("detach of an attached vm failed", lua_tostring(L, -1));
    lua_settop(L, 1);
  }
  if (!fw_method(L, "list", 0, 1)) fz_abort("list raised", lua_tostring(L, -1));
  if (lua_rawlen(L, -1) != 0)
    fz_abort(attached ? "a vm is left after detach" : "a failed attach left a vm", NULL);
  return fz_done(L);
}
