/*
 * clawlua.json: a one-pass JSON codec between text and Lua values.
 *
 * Why not cJSON here (it is used for C-side documents such as QMP and Firecracker bodies):
 * cJSON keeps every number as a double, so integers above 2^53 are silently corrupted; it does
 * not validate UTF-8; it reports no reason for a parse error; and converting its tree to Lua
 * doubles the allocations. This codec decodes straight onto the Lua stack and encodes straight
 * into one buffer, with exact integers, strict UTF-8, limits and located errors.
 *
 * Decoding: integers that fit in int64 stay integers (exact), larger ones become floats; floats
 * use strtod in the C locale. Arrays get the json.array metatable, so they re-encode as arrays
 * even when empty. JSON null is json.null (a light userdata).
 * Encoding: a table is an array when its keys are exactly 1..n (or it carries json.array),
 * otherwise an object with string keys; an empty table is {} unless marked json.array.
 */
#include "json_int.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void read_limits(lua_State *L, int idx, int *max_depth, size_t *max_size) {
  *max_depth = DEFAULT_MAX_DEPTH;
  *max_size = DEFAULT_MAX_SIZE;
  if (lua_isnoneornil(L, idx)) return;
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_Integer md = cl_opt_integer(L, idx, "max_depth", DEFAULT_MAX_DEPTH);
  lua_Integer ms = cl_opt_integer(L, idx, "max_size", (lua_Integer)DEFAULT_MAX_SIZE);
  if (md < 1 || md > HARD_MAX_DEPTH) cl_field_error(L, "max_depth", "must be 1..10000");
  if (ms < 1) cl_field_error(L, "max_size", "must be positive");
  *max_depth = (int)md;
  *max_size = (size_t)ms;
}

/* Lua: json.decode(s, [{max_depth=, max_size=}]) -> value | nil, "json: <reason> at byte N" */
static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int max_depth;
  size_t max_size;
  static const char *const fields[] = {"max_depth", "max_size", NULL};
  if (lua_istable(L, 2)) cl_check_fields(L, 2, fields);
  read_limits(L, 2, &max_depth, &max_size);
  lua_settop(L, 1);
  return cl_json_decode_with(L, s, len, max_depth, max_size) ? 1 : 2;
}

/* Lua: json.encode(v, [{pretty=, sort_keys=, max_depth=, max_size=}]) -> string | nil, err */
static int l_encode(lua_State *L) {
  luaL_checkany(L, 1);
  int pretty = 0, sort_keys = 0, max_depth;
  size_t max_size;
  if (!lua_isnoneornil(L, 2)) {
    static const char *const fields[] = {"pretty", "sort_keys", "max_depth", "max_size", NULL};
    luaL_checktype(L, 2, LUA_TTABLE);
    cl_check_fields(L, 2, fields);
    pretty = cl_opt_boolean(L, 2, "pretty", 0);
    sort_keys = cl_opt_boolean(L, 2, "sort_keys", 0);
  }
  read_limits(L, 2, &max_depth, &max_size);
  return cl_json_encode_with(L, 1, pretty, sort_keys, max_depth, max_size) ? 1 : 2;
}

static int mark(lua_State *L, const char *mt) {
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    lua_newtable(L);
  }
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  luaL_setmetatable(L, mt);
  return 1;
}

/* Lua: json.array([t]) / json.object([t]) mark t (or a new table) as a JSON array / object. */
static int l_array(lua_State *L) {
  return mark(L, ARRAY_MT);
}
static int l_object(lua_State *L) {
  return mark(L, OBJECT_MT);
}

/* Lua: json.is_array(t) */
static int l_is_array(lua_State *L) {
  int r = 0;
  if (lua_getmetatable(L, 1)) {
    luaL_getmetatable(L, ARRAY_MT);
    r = lua_rawequal(L, -1, -2);
  }
  lua_pushboolean(L, r);
  return 1;
}

static const luaL_Reg funcs[] = {
    {"decode", l_decode}, {"encode", l_encode},     {"array", l_array},
    {"object", l_object}, {"is_array", l_is_array}, {NULL, NULL},
};

int luaopen_clawlua_json(lua_State *L) {
  if (cl_entry_redirect(L, "json")) return 1;
  cl_json_encoder_register(L);
  luaL_newlib(L, funcs);
  lua_pushlightuserdata(L, CL_JSON_NULL);
  lua_setfield(L, -2, "null");
  lua_pushinteger(L, DEFAULT_MAX_DEPTH);
  lua_setfield(L, -2, "max_depth");
  lua_pushinteger(L, (lua_Integer)DEFAULT_MAX_SIZE);
  lua_setfield(L, -2, "max_size");
  return 1;
}
