/*
 * clawlua.json: decode, and a round-trip oracle on what decodes. Whatever decodes must encode;
 * the canonical encoding (sorted keys) must decode again and encode to the same bytes, and so
 * must the pretty one; the decoded value's nesting depth must pass max_depth = depth and fail
 * max_depth = depth - 1; an input one byte over max_size must be refused. cl_json_decode (the
 * C entry point) and json.decode (Lua) must agree on every input.
 */
#include <stdint.h>
#include <string.h>

#include "fuzz_lua_state.h"

/* json.<fn>(value at idx, {opt = val, ...}) with up to two integer/boolean options. */
static int json_call(lua_State *L, const char *fn, int idx, const char *k1, lua_Integer v1,
                     const char *k2, lua_Integer v2) {
  idx = lua_absindex(L, idx);
  fz_push_field(L, "json", fn);
  lua_pushvalue(L, idx);
  lua_createtable(L, 0, 2);
  const char *keys[2] = {k1, k2};
  lua_Integer vals[2] = {v1, v2};
  for (int i = 0; i < 2; i++) {
    if (!keys[i]) continue;
    if (!strcmp(keys[i], "sort_keys") || !strcmp(keys[i], "pretty"))
      lua_pushboolean(L, (int)vals[i]);
    else
      lua_pushinteger(L, vals[i]);
    lua_setfield(L, -2, keys[i]);
  }
  fz_call(L, 2, 2, fn); /* misuse raises; content never should */
  return !lua_isnil(L, -2);
}

/* Nesting depth of a decoded value as json.c counts it: a scalar 0, [] or {} 1. */
static int depth_of(lua_State *L, int idx, int level) {
  if (lua_type(L, idx) != LUA_TTABLE) return 0;
  if (level > 20000) fz_abort("depth", "cycle in a decoded value");
  idx = lua_absindex(L, idx);
  int max = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int d = depth_of(L, -1, level + 1);
    if (d > max) max = d;
    lua_pop(L, 1);
  }
  return max + 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = fz_state();
  lua_settop(L, 0);
  const char *s = (const char *)data;

  int c_ok = cl_json_decode(L, s, size);
  lua_settop(L, 0);
  lua_pushlstring(L, s, size); /* 1 */
  fz_push_field(L, "json", "decode");
  lua_pushvalue(L, 1);
  fz_call(L, 1, 2, "decode");
  if (lua_isnil(L, -2)) {
    const char *err = lua_tostring(L, -1);
    if (!err || strncmp(err, "json: ", 6) != 0) fz_abort("decode error without a reason", err);
    if (c_ok) fz_abort("cl_json_decode accepted what json.decode refused", err);
    return fz_done(L);
  }
  if (!c_ok) fz_abort("cl_json_decode refused what json.decode accepted", NULL);
  lua_pop(L, 1); /* value at 2 */

  if (!json_call(L, "encode", 2, "sort_keys", 1, NULL, 0))
    fz_abort("a decoded value does not encode", lua_tostring(L, -1));
  lua_pop(L, 1); /* canonical encoding at 3 */
  size_t n1;
  const char *e1 = lua_tolstring(L, 3, &n1);

  if (!json_call(L, "decode", 3, NULL, 0, NULL, 0))
    fz_abort("an encoding does not decode", lua_tostring(L, -1));
  lua_pop(L, 1); /* 4 */
  if (!json_call(L, "encode", 4, "sort_keys", 1, NULL, 0))
    fz_abort("a re-decoded value does not encode", lua_tostring(L, -1));
  size_t n2;
  const char *e2 = lua_tolstring(L, -2, &n2);
  if (n1 != n2 || memcmp(e1, e2, n1) != 0) fz_abort("encode(decode(encode(x))) != encode(x)", e2);
  lua_settop(L, 4);

  if (!json_call(L, "encode", 2, "sort_keys", 1, "pretty", 1))
    fz_abort("a decoded value does not encode pretty", lua_tostring(L, -1));
  lua_pop(L, 1);
  if (!json_call(L, "decode", -1, NULL, 0, NULL, 0))
    fz_abort("a pretty encoding does not decode", lua_tostring(L, -1));
  lua_pop(L, 1);
  if (!json_call(L, "encode", -1, "sort_keys", 1, NULL, 0))
    fz_abort("a pretty round trip does not encode", lua_tostring(L, -1));
  e2 = lua_tolstring(L, -2, &n2);
  if (n1 != n2 || memcmp(e1, e2, n1) != 0) fz_abort("pretty round trip differs", e2);
  lua_settop(L, 4);

  /* Limits, on the canonical text (the input may hold duplicate keys deeper than the value). */
  int d = depth_of(L, 4, 0);
  if (d >= 1 && d <= 10000) {
    if (!json_call(L, "decode", 3, "max_depth", d, NULL, 0))
      fz_abort("max_depth = depth refused", lua_tostring(L, -1));
    lua_settop(L, 4);
    if (!json_call(L, "encode", 4, "max_depth", d, NULL, 0))
      fz_abort("encode max_depth = depth refused", lua_tostring(L, -1));
    lua_settop(L, 4);
    if (d > 1) {
      if (json_call(L, "decode", 3, "max_depth", d - 1, NULL, 0))
        fz_abort("max_depth = depth - 1 accepted", e1);
      if (!strstr(lua_tostring(L, -1), "nesting deeper"))
        fz_abort("max_depth error", lua_tostring(L, -1));
      lua_settop(L, 4);
      if (json_call(L, "encode", 4, "max_depth", d - 1, NULL, 0))
        fz_abort("encode max_depth = depth - 1 accepted", e1);
      lua_settop(L, 4);
    }
  }
  if (json_call(L, "decode", 3, "max_size", (lua_Integer)n1, NULL, 0) == 0)
    fz_abort("max_size = size refused", lua_tostring(L, -1));
  lua_settop(L, 4);
  if (n1 > 1) {
    if (json_call(L, "decode", 3, "max_size", (lua_Integer)n1 - 1, NULL, 0))
      fz_abort("max_size = size - 1 accepted", e1);
    lua_settop(L, 4);
    if (json_call(L, "encode", 4, "max_size", (lua_Integer)n1 - 1, "sort_keys", 1))
      fz_abort("encode max_size = size - 1 accepted", e1);
  }
  return fz_done(L);
}
