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
#include <stdint.h>
#include <string.h>

#include "fuzz_firewall.h"

static int fw_ref = LUA_NOREF;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  fw_ref = fz_firewall_open(fz_state(), 0, "127.0.0.1");
  return 0;
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
  int ok = fz_fw_method(L, fw_ref, "attach", 2, 2); /* results at 2, 3 */
  if (!ok) {
    const char *err = lua_tostring(L, -1);
    if (!err || !strstr(err, "bad ")) fz_abort("attach raised something else than misuse", err);
  }
  int attached = ok && !lua_isnil(L, 2);
  if (ok && !attached && !lua_isstring(L, 3)) fz_abort("attach failed without a message", NULL);
  lua_settop(L, 1);
  if (attached) {
    lua_pushliteral(L, "fz");
    if (!fz_fw_method(L, fw_ref, "detach", 1, 2) || lua_isnil(L, -2))
      fz_abort("detach of an attached vm failed", lua_tostring(L, -1));
    lua_settop(L, 1);
  }
  if (!fz_fw_method(L, fw_ref, "list", 0, 1)) fz_abort("list raised", lua_tostring(L, -1));
  if (lua_rawlen(L, -1) != 0)
    fz_abort(attached ? "a vm is left after detach" : "a failed attach left a vm", NULL);
  return fz_done(L);
}
