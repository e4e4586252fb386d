/*
 * Shared by the fuzz harnesses: one Lua state with the clawlua module open, kept across inputs
 * (opening the module per input would dominate the run time), and the way a harness reports a
 * broken invariant: a message on stderr and abort(), which libFuzzer records as a crash with
 * the input that caused it.
 */
#ifndef CLAWLUA_FUZZ_LUA_STATE_H
#define CLAWLUA_FUZZ_LUA_STATE_H

#include <stdio.h>
#include <stdlib.h>

#include "clawlua.h"

__attribute__((noreturn)) static inline void fz_abort(const char *what, const char *detail) {
  fprintf(stderr, "fuzz: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  abort();
}

/* CLAWLUA_FUZZ_STRICT=1: known, still open findings (tests/fuzz/crashes/) are crashes too;
 * without it a harness lets them pass so that fuzzing goes on past them. */
static inline int fz_strict(void) {
  static int strict = -1;
  if (strict < 0) {
    const char *s = getenv("CLAWLUA_FUZZ_STRICT");
    strict = s && *s && *s != '0';
  }
  return strict;
}

static int fz_traceback(lua_State *L) {
  luaL_traceback(L, L, luaL_tolstring(L, 1, NULL), 1);
  return 1;
}

/* Calls the function below nargs arguments; an error is returned as 0 with the traceback on
 * top of the stack. */
static inline int fz_pcall(lua_State *L, int nargs, int nres) {
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, fz_traceback);
  lua_insert(L, base);
  int st = lua_pcall(L, nargs, nres, base);
  lua_remove(L, base);
  return st == LUA_OK;
}

/* Like fz_pcall, but an error is a finding. */
static inline void fz_call(lua_State *L, int nargs, int nres, const char *what) {
  if (!fz_pcall(L, nargs, nres)) fz_abort(what, lua_tostring(L, -1));
}

/* The process-wide state, with the clawlua namespace in the global "claw". */
static inline lua_State *fz_state(void) {
  static lua_State *L;
  if (L) return L;
  L = luaL_newstate();
  if (!L) fz_abort("luaL_newstate", "out of memory");
  luaL_openlibs(L);
  luaL_requiref(L, "clawlua", luaopen_clawlua, 0);
  lua_setglobal(L, "claw");
  return L;
}

/* Ends an input: a full collection, so that what the input allocated is freed before the next
 * one (libFuzzer's leak check runs LSan on every input whose mallocs outnumber its frees). */
static inline int fz_done(lua_State *L) {
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT);
  return 0;
}

/* Pushes claw.<a>.<b> (b may be NULL). */
static inline void fz_push_field(lua_State *L, const char *a, const char *b) {
  lua_getglobal(L, "claw");
  lua_getfield(L, -1, a);
  lua_remove(L, -2);
  if (b) {
    lua_getfield(L, -1, b);
    lua_remove(L, -2);
  }
}

#endif
