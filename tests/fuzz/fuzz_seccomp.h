/* Shared by the seccomp profile harnesses: the input as a profile source, and the checks on
 * what a loader returns. */
#ifndef CLAWLUA_FUZZ_SECCOMP_H
#define CLAWLUA_FUZZ_SECCOMP_H

#include <linux/filter.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz_lua_state.h"

/* Pushes the source a loader gets: the input itself when it looks like JSON text (what the
 * loaders take as text: optional blanks, then '{'), else the path of a memfd holding it (the
 * loader reads the file). Returns the memfd to close after the call, or -1. */
static inline int fz_push_source(lua_State *L, const uint8_t *data, size_t size) {
  size_t i = 0;
  while (i < size && strchr(" \t\r\n\f\v", data[i]) && data[i]) i++;
  if (i < size && data[i] == '{') {
    lua_pushlstring(L, (const char *)data, size);
    return -1;
  }
  int fd = memfd_create("fuzz-profile", MFD_CLOEXEC);
  if (fd < 0) fz_abort("memfd_create", NULL);
  size_t off = 0;
  while (off < size) {
    ssize_t n = write(fd, data + off, size - off);
    if (n <= 0) fz_abort("write to memfd", NULL);
    off += (size_t)n;
  }
  lua_pushfstring(L, "/proc/self/fd/%d", fd);
  return fd;
}

/* A loader's failure: a message that names the profile. */
static inline void fz_check_profile_error(lua_State *L, int idx) {
  const char *err = lua_tostring(L, idx);
  if (!err || strncmp(err, "seccomp profile", 15) != 0)
    fz_abort("profile error without the profile's name", err);
}

/* A filter: its BPF is info().instructions instructions, every jump lands inside the program,
 * and the program ends in a return. */
static inline void fz_check_filter(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_getfield(L, idx, "info");
  lua_pushvalue(L, idx);
  fz_call(L, 1, 1, "info raised");
  lua_getfield(L, -1, "instructions");
  lua_Integer n = lua_tointeger(L, -1);
  lua_pop(L, 2);
  lua_getfield(L, idx, "bpf");
  lua_pushvalue(L, idx);
  fz_call(L, 1, 1, "bpf raised");
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  if (!s || n <= 0 || len != (size_t)n * sizeof(struct sock_filter))
    fz_abort("bpf() length differs from info().instructions", NULL);
  for (lua_Integer pc = 0; pc < n; pc++) {
    struct sock_filter f;
    memcpy(&f, s + pc * sizeof f, sizeof f);
    if (BPF_CLASS(f.code) != BPF_JMP) continue;
    uint64_t last =
        (uint64_t)pc + 1 + (BPF_OP(f.code) == BPF_JA ? f.k : (f.jt > f.jf ? f.jt : f.jf));
    if (last >= (uint64_t)n) fz_abort("BPF jump past the end of the program", NULL);
  }
  struct sock_filter end;
  memcpy(&end, s + (n - 1) * sizeof end, sizeof end);
  if (BPF_CLASS(end.code) != BPF_RET) fz_abort("BPF program does not end in a return", NULL);
  lua_pop(L, 1);
}

#endif
