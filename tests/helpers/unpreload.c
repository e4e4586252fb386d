/*
 * Preloaded last into stock lua5.4 when the specs run against the sanitized clawlua.so (the
 * ASan build's `.stock` tests): the sanitizer runtimes must be loaded into the interpreter
 * before the module, but every program a spec starts (ip, nft, sh, qemu, python3) would inherit
 * them through LD_PRELOAD and report its own leaks. Once every preloaded library is in, this
 * constructor takes LD_PRELOAD out of the environment the interpreter's children get. A child
 * that should run sanitized again (a stock lua5.4 started by a spec) gets it explicitly
 * (tests/lua/helper.lua, CLAWLUA_LUA_PRELOAD).
 */
#define _POSIX_C_SOURCE 200809L /* unsetenv */
#include <stdlib.h>

__attribute__((constructor)) static void unpreload(void) {
  unsetenv("LD_PRELOAD");
}
