/*
 * OCI/Docker seccomp profiles through the Lua API (claw.seccomp.load_oci), the way the runtime
 * loads them: as JSON text, or, when the input does not look like JSON text, from a path (a
 * memfd holding the input, /proc/self/fd/N). The contract: a filter or nil + a message naming
 * the profile, never a raised error; a filter has a BPF program of info().instructions
 * instructions.
 */
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz_lua_state.h"
#include "fuzz_seccomp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  lua_settop(L, 0);
  int fd = fz_push_source(L, data, size); /* 1 */
  fz_push_field(L, "seccomp", "load_oci");
  lua_pushvalue(L, 1);
  lua_createtable(L, 0, 2);
  lua_pushliteral(L, "x86_64");
  lua_setfield(L, -2, "arch");
  lua_pushliteral(L, "6.1"); /* the profile's minKernel is compared with this, not the host */
  lua_setfield(L, -2, "kernel");
  fz_call(L, 2, 2, "load_oci raised");
  if (fd >= 0) close(fd);
  if (lua_isnil(L, -2)) {
    fz_check_profile_error(L, -1);
  } else {
    fz_check_filter(L, -2);
  }
  return fz_done(L);
}
