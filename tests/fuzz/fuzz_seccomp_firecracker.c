/*
 * Firecracker seccompiler JSON through the Lua API (claw.seccomp.load_firecracker), as text or
 * from a path (see fuzz_seccomp.h). The contract: {thread = filter} or nil + a message naming
 * the profile, never a raised error; every filter's BPF is well formed; the filter file built
 * from them (seccomp.firecracker_file) parses back, thread by thread in name order, to exactly
 * those programs and nothing more.
 */
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_lua_state.h"
#include "fuzz_seccomp.h"

static uint64_t get_u64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

/* Parses the filter file at -1 against the table of filters at idx. */
static void check_file(lua_State *L, int idx) {
  size_t len, off = 8;
  const unsigned char *p = (const unsigned char *)lua_tolstring(L, -1, &len);
  if (!p || len < 8) fz_abort("filter file shorter than its count", NULL);
  uint64_t count = get_u64(p), seen = 0;
  const char *prev = NULL;
  size_t prevlen = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    seen++;
    lua_pop(L, 1);
  }
  if (count != seen) fz_abort("filter file count differs from the threads", NULL);
  for (uint64_t i = 0; i < count; i++) {
    if (len - off < 8) fz_abort("filter file truncated (name length)", NULL);
    uint64_t nl = get_u64(p + off);
    off += 8;
    if (nl > len - off) fz_abort("filter file truncated (name)", NULL);
    const char *name = (const char *)p + off;
    off += nl;
    if (prev) {
      size_t m = prevlen < nl ? prevlen : nl;
      int c = memcmp(prev, name, m);
      if (c > 0 || (c == 0 && prevlen >= nl))
        fz_abort("filter file threads not in name order", NULL);
    }
    prev = name;
    prevlen = nl;
    if (len - off < 8) fz_abort("filter file truncated (instruction count)", NULL);
    uint64_t ni = get_u64(p + off);
    off += 8;
    if (ni > (len - off) / 8) fz_abort("filter file truncated (instructions)", NULL);
    lua_pushlstring(L, name, nl);
    if (lua_gettable(L, idx) != LUA_TUSERDATA)
      fz_abort("filter file names an unknown thread", NULL);
    lua_getfield(L, -1, "bpf");
    lua_insert(L, -2);
    fz_call(L, 1, 1, "bpf raised");
    size_t bl;
    const char *bpf = lua_tolstring(L, -1, &bl);
    if (bl != ni * 8) fz_abort("filter file program length differs", NULL);
    /* struct sock_filter is {u16 code, u8 jt, u8 jf, u32 k}: little-endian here, as in the file */
    if (memcmp(bpf, p + off, bl) != 0) fz_abort("filter file program differs", NULL);
    lua_pop(L, 1);
    off += bl;
  }
  if (off != len) fz_abort("filter file has trailing bytes", NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  lua_settop(L, 0);
  int fd = fz_push_source(L, data, size); /* 1 */
  fz_push_field(L, "seccomp", "load_firecracker");
  lua_pushvalue(L, 1);
  fz_call(L, 1, 2, "load_firecracker raised");
  if (fd >= 0) close(fd);
  if (lua_isnil(L, -2)) {
    fz_check_profile_error(L, -1);
    return fz_done(L);
  }
  lua_pop(L, 1);
  int filters = lua_gettop(L);
  if (!lua_istable(L, filters)) fz_abort("load_firecracker returned no table", NULL);
  lua_pushnil(L);
  while (lua_next(L, filters)) {
    fz_check_filter(L, -1);
    lua_pop(L, 1);
  }
  fz_push_field(L, "seccomp", "firecracker_file");
  lua_pushvalue(L, filters);
  fz_call(L, 1, 1, "firecracker_file raised");
  check_file(L, filters);
  return fz_done(L);
}
