/*
 * The Lua methods of the agent channel, on top of channel.c: vm:exec (collected or streamed
 * output, stdin in a window, a timeout that kills the command in the guest), vm:write_file,
 * vm:read_file and vm:ping. Each request is a userdata on the caller's stack: a cancelled or
 * collected caller cancels it in the guest.
 */
#include "chan.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

/* TLV helpers for requests */
/* Writes TLVs into p, or only counts them when p is NULL. */
typedef struct tlvw {
  unsigned char *p;
  size_t n;
} tlvw;
static void tlvw_add(tlvw *t, uint16_t tag, const void *v, size_t len) {
  if (t->p) {
    cla_put16(t->p + t->n, tag);
    cla_put32(t->p + t->n + 2, (uint32_t)len);
    if (len) memcpy(t->p + t->n + 6, v, len);
  }
  t->n += 6 + len;
}
static void tlvw_u64(tlvw *t, uint16_t tag, uint64_t x) {
  unsigned char v[8];
  cla_put64(v, x);
  tlvw_add(t, tag, v, 8);
}
static void tlv_add(luaL_Buffer *b, uint16_t tag, const void *v, size_t len) {
  unsigned char h[6];
  cla_put16(h, tag);
  cla_put32(h + 2, (uint32_t)len);
  luaL_addlstring(b, (const char *)h, 6);
  luaL_addlstring(b, v, len);
}
static void tlv_add_u64(luaL_Buffer *b, uint16_t tag, uint64_t x) {
  unsigned char v[8];
  cla_put64(v, x);
  tlv_add(b, tag, v, 8);
}
static void push_exec_result(lua_State *L, vm_req *r) {
  lua_createtable(L, 0, 10);
  if (r->exit_signal) {
    lua_pushinteger(L, r->exit_signal);
    lua_setfield(L, -2, "signal");
    lua_pushstring(L, cl_signal_name(r->exit_signal));
    lua_setfield(L, -2, "signal_name");
  } else {
    lua_pushinteger(L, r->exit_code);
    lua_setfield(L, -2, "code");
  }
  if (!r->streaming) {
    lua_pushlstring(L, r->out.p ? r->out.p : "", r->out.len);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, r->err.p ? r->err.p : "", r->err.len);
    lua_setfield(L, -2, "stderr");
  }
  int trunc =
      r->trunc_out || r->trunc_err || (r->flags & (CLA_F_OUT_TRUNCATED | CLA_F_ERR_TRUNCATED));
  lua_pushboolean(L, trunc);
  lua_setfield(L, -2, "truncated");
  lua_pushboolean(L, (r->flags & CLA_F_TIMED_OUT) != 0);
  lua_setfield(L, -2, "timed_out");
  lua_pushinteger(L, (lua_Integer)r->guest_pid);
  lua_setfield(L, -2, "pid");
  lua_pushnumber(L, (double)(cl_now_ns() - r->t0) / 1e9);
  lua_setfield(L, -2, "duration");
  lua_pushinteger(L, (lua_Integer)r->out_total);
  lua_setfield(L, -2, "stdout_bytes");
  lua_pushinteger(L, (lua_Integer)r->err_total);
  lua_setfield(L, -2, "stderr_bytes");
}
/* Sends as much stdin as the window and the queue allow. */
static void pump_stdin(vm *v, vm_req *r) {
  r->want_write = 0;
  while (r->in_data && r->in_sent < r->in_len && !v->chan.closed) {
    if (r->in_sent - r->in_acked >= CLA_STDIN_WINDOW) return; /* the agent acks as it writes */
    if (v->chan.out_len >= OUT_HIGH) {
      r->want_write = 1;
      return;
    }
    size_t n = r->in_len - r->in_sent;
    if (n > CLA_CHUNK) n = CLA_CHUNK;
    if (r->in_sent - r->in_acked + n > CLA_STDIN_WINDOW)
      n = CLA_STDIN_WINDOW - (size_t)(r->in_sent - r->in_acked);
    if (cl_chan_send(v, CLA_STDIN, r->id, r->in_data + r->in_sent, n)) return;
    r->in_sent += n;
  }
  if (r->in_data && !r->in_eof_sent && r->in_sent == r->in_len && !v->chan.closed) {
    if (cl_chan_send(v, CLA_STDIN, r->id, NULL, 0) == 0) r->in_eof_sent = 1;
  }
}
/* Stack: 1 vm, 2 options, 3 request, 4 wait */
static int exec_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  lua_settop(L, (int)ctx);
  while (r->qhead) { /* streamed output: one chunk per callback call */
    chunk *ch = r->qhead;
    r->qhead = ch->next;
    if (!r->qhead) r->qtail = NULL;
    r->queued -= ch->len;
    lua_getfield(L, 2, ch->err ? "on_stderr" : "on_stdout");
    lua_pushlstring(L, ch->data, ch->len);
    free(ch);
    cl_chan_unthrottle(r->v);
    /* A callback that waits resumes here, in exec_k, and the loop goes on with the next chunk. */
    if (lua_isfunction(L, -2)) lua_callk(L, 1, 0, ctx, exec_k);
    lua_settop(L, (int)ctx);
  }
  if (r->failed) return cl_chan_req_failed(L, r);
  vm *v = r->v;
  if (!v || v->released) return cl_failf(L, ECANCELED, "exec: the vm was closed");
  if (r->done) {
    push_exec_result(L, r);
    lua_createtable(L, 0, 3);
    lua_getfield(L, -2, "code");
    lua_setfield(L, -2, "code");
    lua_getfield(L, -2, "signal_name");
    lua_setfield(L, -2, "signal");
    lua_getfield(L, -2, "duration");
    lua_setfield(L, -2, "duration");
    cl_vm_audit(v, L, "vm.exec_done", lua_gettop(L));
    lua_pop(L, 1);
    cl_chan_req_release(r);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    char msg[200];
    snprintf(msg, sizeof msg,
             "vm %s: exec: no answer from the guest agent %.0f s after the command's timeout",
             v->id, EXEC_GRACE);
    cl_chan_send(v, CLA_CANCEL, r->id, NULL, 0); /* the agent kills what is left of it */
    cl_chan_req_fail(r, ETIMEDOUT, msg);
    return cl_chan_req_failed(L, r);
  }
  pump_stdin(v, r);
  if (r->failed) return cl_chan_req_failed(L, r);
  return cl_chan_req_wait(L, r, w, exec_k, ctx);
}
/* exec's env as a list of "K=V" strings pushed on the stack, every entry checked before
 * anything is built; returns its length. */
static lua_Integer read_exec_env(lua_State *L) {
  lua_newtable(L);
  int envt = lua_gettop(L);
  lua_Integer nenv = 0;
  if (lua_getfield(L, 2, "env") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "env", "table expected");
    int ei = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, ei)) {
      if (lua_type(L, -2) != LUA_TSTRING ||
          (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER))
        cl_field_error(L, "env", "string keys with string values expected");
      size_t kl, vl;
      const char *k = lua_tolstring(L, -2, &kl);
      const char *val = lua_tolstring(L, -1, &vl);
      if (kl == 0 || strchr(k, '=') || strlen(k) != kl || strlen(val) != vl)
        cl_field_error(L, "env", lua_pushfstring(L, "invalid variable '%s'", k));
      lua_pushfstring(L, "%s=%s", k, val);
      lua_rawseti(L, envt, ++nenv);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  if (nenv > CLA_MAX_ARGS) cl_field_error(L, "env", "more entries than the agent accepts");
  return nenv;
}

/* Lua: vm:exec{argv... | argv=, env=, env_clear=, cwd=, stdin=, timeout=, max_output=, on_stdout=,
 * on_stderr=} -> {code=|signal=, stdout=, stderr=, truncated=, timed_out=, duration=, pid=} */
static int l_exec(lua_State *L) {
  static const char *const fields[] = {"argv",    "env",        "env_clear", "cwd",       "stdin",
                                       "timeout", "max_output", "on_stdout", "on_stderr", NULL};
  vm *v = cl_vm_check(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  cl_check_fields(L, 2, fields);
  char **argv;
  if (lua_getfield(L, 2, "argv") != LUA_TNIL) {
    if (lua_rawlen(L, 2) > 0) cl_field_error(L, "argv", "given twice (positional and argv=)");
    argv = cl_check_argv(L, -1, "argv", 0);
  } else {
    argv = cl_check_argv(L, 2, "argv", 0);
  }
  int argv_idx = lua_gettop(L);
  size_t nargs = 0;
  while (argv[nargs]) nargs++;
  if (nargs > CLA_MAX_ARGS) cl_field_error(L, "argv", "more arguments than the agent accepts");
  int has_timeout = lua_getfield(L, 2, "timeout") != LUA_TNIL;
  lua_pop(L, 1);
  double timeout = cl_opt_number(L, 2, "timeout", -1); /* nil: no limit */
  if (has_timeout && timeout < 0) cl_field_error(L, "timeout", "non-negative seconds expected");
  lua_Integer max_out = cl_opt_integer(L, 2, "max_output", (lua_Integer)DEFAULT_MAX_OUTPUT);
  if (max_out < 0) cl_field_error(L, "max_output", "must not be negative");
  const char *cwd = cl_opt_string(L, 2, "cwd", NULL);
  size_t in_len = 0;
  const char *in = NULL;
  if (lua_getfield(L, 2, "stdin") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING) cl_field_error(L, "stdin", "string expected");
    in = lua_tolstring(L, -1, &in_len);
  }
  lua_pop(L, 1);
  int streaming = 0;
  for (int i = 0; i < 2; i++) {
    const char *k = i ? "on_stderr" : "on_stdout";
    int t = lua_getfield(L, 2, k);
    if (t != LUA_TNIL && t != LUA_TFUNCTION) cl_field_error(L, k, "function expected");
    if (t == LUA_TFUNCTION) streaming = 1;
    lua_pop(L, 1);
  }
  lua_Integer nenv = read_exec_env(L);
  int envt = lua_gettop(L);
  int env_clear = cl_opt_boolean(L, 2, "env_clear", 0);
  /* The payload, sized first and then written into a userdata: nothing to leak on an error. */
  unsigned char *payload = NULL;
  size_t plen = 0;
  for (int pass = 0; pass < 2; pass++) {
    tlvw tw = {payload, 0};
    for (size_t i = 0; i < nargs; i++) tlvw_add(&tw, CLA_T_ARG, argv[i], strlen(argv[i]));
    if (env_clear) tlvw_u64(&tw, CLA_T_ENV_CLEAR, 1);
    for (lua_Integer i = 1; i <= nenv; i++) {
      size_t l;
      lua_rawgeti(L, envt, i);
      const char *kv = lua_tolstring(L, -1, &l);
      tlvw_add(&tw, CLA_T_ENV, kv, l);
      lua_pop(L, 1);
    }
    if (cwd) tlvw_add(&tw, CLA_T_CWD, cwd, strlen(cwd));
    if (timeout >= 0) /* 0: the agent kills it at once unless it is done (1 ms) */
      tlvw_u64(&tw, CLA_T_TIMEOUT_MS, timeout < 0.001 ? 1 : (uint64_t)(timeout * 1000.0 + 0.5));
    tlvw_u64(&tw, CLA_T_MAX_OUT, (uint64_t)max_out);
    tlvw_u64(&tw, CLA_T_MAX_ERR, (uint64_t)max_out);
    tlvw_u64(&tw, CLA_T_STDIN, in != NULL);
    plen = tw.n;
    if (pass == 0) {
      if (plen > CLA_MAX_PAYLOAD)
        return cl_failf(L, E2BIG, "vm %s: exec: arguments and environment exceed %d bytes", v->id,
                        CLA_MAX_PAYLOAD);
      payload = lua_newuserdatauv(L, plen ? plen : 1, 0);
    }
  }
  if (!v->chan.ready || v->chan.closed) return cl_chan_unavailable(L, v, "exec");
  CL_UNUSED(argv_idx);
  vm_req *r = cl_chan_new_req(L, v, R_EXEC);
  r->max_out = r->max_err = (uint64_t)max_out;
  r->streaming = streaming;
  r->in_data = in;
  r->in_len = in_len;
  int e = cl_chan_send(v, CLA_EXEC, r->id, payload, plen);
  if (e) {
    cl_chan_req_release(r);
    return cl_failf(L, e, "vm %s: exec: %s", v->id, strerror(e));
  }
  lua_createtable(L, 0, 2);
  lua_createtable(L, (int)nargs, 0);
  for (size_t i = 0; i < nargs; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "argv");
  cl_vm_audit(v, L, "vm.exec", lua_gettop(L));
  lua_pop(L, 1);
  /* Stack: 1 vm, 2 options, 3 request, 4 wait */
  lua_replace(L, 3);
  lua_settop(L, 3);
  cl_wait *w = cl_wait_push(L);
  if (timeout >= 0) w->deadline = cl_deadline(timeout + EXEC_GRACE);
  pump_stdin(v, r);
  if (r->failed) return cl_chan_req_failed(L, r);
  return cl_chan_req_wait(L, r, w, exec_k, lua_gettop(L));
}
/* Stack: 1 vm, 2 path, 3 data, 4 options, 5 request, 6 wait */
static int write_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  if (r->failed) return cl_chan_req_failed(L, r);
  vm *v = r->v;
  if (!v || v->released) return cl_failf(L, ECANCELED, "write_file: the vm was closed");
  if (r->done) {
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "path");
    lua_pushinteger(L, (lua_Integer)r->wlen);
    lua_setfield(L, -2, "size");
    cl_vm_audit(v, L, "vm.write_file", lua_gettop(L));
    lua_pop(L, 1);
    cl_chan_req_release(r);
    lua_pushboolean(L, 1);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    cl_chan_req_release(r); /* cancels the write: no file is left */
    return cl_timed_out(L);
  }
  r->want_write = 0;
  while (r->wsent < r->wlen && !v->chan.closed) {
    if (v->chan.out_len >= OUT_HIGH) {
      r->want_write = 1;
      break;
    }
    size_t n = r->wlen - r->wsent;
    if (n > CLA_CHUNK) n = CLA_CHUNK;
    if (cl_chan_send(v, CLA_WDATA, r->id, r->wdata + r->wsent, n)) break;
    r->wsent += n;
  }
  if (r->wsent == r->wlen && !r->wend_sent && !v->chan.closed &&
      cl_chan_send(v, CLA_WEND, r->id, NULL, 0) == 0)
    r->wend_sent = 1;
  if (r->failed) return cl_chan_req_failed(L, r);
  return cl_chan_req_wait(L, r, w, write_k, ctx);
}
static lua_Integer opt_mode(lua_State *L, int idx) {
  int t = lua_getfield(L, idx, "mode");
  lua_Integer mode = 0644;
  if (t == LUA_TNUMBER && lua_isinteger(L, -1))
    mode = lua_tointeger(L, -1);
  else if (t == LUA_TSTRING) {
    char *end;
    mode = strtol(lua_tostring(L, -1), &end, 8);
    if (*end || end == lua_tostring(L, -1))
      cl_field_error(L, "mode", "octal string or integer expected");
  } else if (t != LUA_TNIL) {
    cl_field_error(L, "mode", "octal string or integer expected");
  }
  lua_pop(L, 1);
  if (mode < 0 || mode > 07777) cl_field_error(L, "mode", "between 0 and 07777 expected");
  return mode;
}
static void check_path(lua_State *L, int idx, const char *what) {
  size_t n;
  const char *p = luaL_checklstring(L, idx, &n);
  if (n == 0 || n >= 4096 || strlen(p) != n)
    luaL_argerror(L, idx, "a path of 1 to 4095 bytes without NUL");
  if (p[0] != '/') luaL_argerror(L, idx, lua_pushfstring(L, "%s needs an absolute path", what));
}
/* Lua: vm:write_file(path, data, [{mode=0644}]) -> true | nil, err (atomic: renamed into place) */
static int l_write_file(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  check_path(L, 2, "write_file");
  size_t len;
  const char *data = luaL_checklstring(L, 3, &len);
  lua_Integer mode = 0644;
  double timeout = -1;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    static const char *const fields[] = {"mode", "timeout", NULL};
    cl_check_fields(L, 4, fields);
    mode = opt_mode(L, 4);
    timeout = cl_opt_number(L, 4, "timeout", -1);
  }
  lua_settop(L, 4);
  if (!v->chan.ready || v->chan.closed) return cl_chan_unavailable(L, v, "write_file");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t pl;
  const char *path = lua_tolstring(L, 2, &pl);
  tlv_add(&b, CLA_T_PATH, path, pl);
  tlv_add_u64(&b, CLA_T_MODE, (uint64_t)mode);
  tlv_add_u64(&b, CLA_T_SIZE, len);
  luaL_pushresult(&b);
  size_t plen;
  const char *payload = lua_tolstring(L, -1, &plen);
  vm_req *r = cl_chan_new_req(L, v, R_WRITE);
  r->wdata = data;
  r->wlen = len;
  int e = cl_chan_send(v, CLA_WRITE, r->id, payload, plen);
  if (e) {
    cl_chan_req_release(r);
    return cl_failf(L, e, "vm %s: write_file: %s", v->id, strerror(e));
  }
  lua_replace(L, 5);
  lua_settop(L, 5);
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return write_k(L, LUA_OK, lua_gettop(L));
}
/* Stack: 1 vm, 2 path, 3 options, 4 request, 5 wait */
static int read_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  if (r->failed) return cl_chan_req_failed(L, r);
  vm *v = r->v;
  if (!v || v->released) return cl_failf(L, ECANCELED, "read_file: the vm was closed");
  if (r->done) {
    lua_pushlstring(L, r->data.p ? r->data.p : "", r->data.len);
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, "path");
    lua_pushinteger(L, (lua_Integer)r->data.len);
    lua_setfield(L, -2, "size");
    cl_vm_audit(v, L, "vm.read_file", lua_gettop(L));
    lua_pop(L, 1);
    cl_chan_req_release(r);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    cl_chan_req_release(r);
    return cl_timed_out(L);
  }
  return cl_chan_req_wait(L, r, w, read_k, ctx);
}
/* Lua: vm:read_file(path, [{max=64 MiB}]) -> data | nil, err */
static int l_read_file(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  check_path(L, 2, "read_file");
  lua_Integer max = (lua_Integer)DEFAULT_MAX_READ;
  double timeout = -1;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    static const char *const fields[] = {"max", "timeout", NULL};
    cl_check_fields(L, 3, fields);
    timeout = cl_opt_number(L, 3, "timeout", -1);
    max = cl_opt_integer(L, 3, "max", max);
    if (max < 0 || (uint64_t)max > MAX_FILE)
      cl_field_error(L, "max", "between 0 and 2^40 expected");
  }
  lua_settop(L, 3);
  if (!v->chan.ready || v->chan.closed) return cl_chan_unavailable(L, v, "read_file");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t pl;
  const char *path = lua_tolstring(L, 2, &pl);
  tlv_add(&b, CLA_T_PATH, path, pl);
  tlv_add_u64(&b, CLA_T_MAX, (uint64_t)max);
  luaL_pushresult(&b);
  size_t plen;
  const char *payload = lua_tolstring(L, -1, &plen);
  vm_req *r = cl_chan_new_req(L, v, R_READ);
  r->rmax = (uint64_t)max;
  int e = cl_chan_send(v, CLA_READ, r->id, payload, plen);
  if (e) {
    cl_chan_req_release(r);
    return cl_failf(L, e, "vm %s: read_file: %s", v->id, strerror(e));
  }
  lua_replace(L, 4);
  lua_settop(L, 4);
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return cl_chan_req_wait(L, r, w, read_k, lua_gettop(L));
}
/* Stack: 1 vm, 2 timeout, 3 request, 4 wait */
static int ping_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  vm_req *r = lua_touserdata(L, (int)ctx - 1);
  if (r->failed) return cl_chan_req_failed(L, r);
  if (r->done) {
    lua_pushnumber(L, (double)(cl_now_ns() - r->t0) / 1e9);
    cl_chan_req_release(r);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    cl_chan_req_release(r);
    return cl_timed_out(L);
  }
  return cl_chan_req_wait(L, r, w, ping_k, ctx);
}
/* Lua: vm:ping([timeout]) -> round-trip seconds | nil, "timeout", "ETIMEDOUT" | nil, err */
static int l_ping(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  if (!lua_isnoneornil(L, 2) && timeout < 0)
    return luaL_argerror(L, 2, "non-negative seconds expected");
  lua_settop(L, 2);
  if (!v->chan.ready || v->chan.closed) return cl_chan_unavailable(L, v, "ping");
  vm_req *r = cl_chan_new_req(L, v, R_PING);
  int e = cl_chan_send(v, CLA_PING, r->id, NULL, 0);
  if (e) {
    cl_chan_req_release(r);
    return cl_failf(L, e, "vm %s: ping: %s", v->id, strerror(e));
  }
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return cl_chan_req_wait(L, r, w, ping_k, lua_gettop(L));
}
static const luaL_Reg chan_methods[] = {
    {"exec", l_exec}, {"write_file", l_write_file}, {"read_file", l_read_file}, {"ping", l_ping},
    {NULL, NULL},
};
int cl_chan_open_methods(lua_State *L) {
  luaL_setfuncs(L, chan_methods, 0);
  static const luaL_Reg meta[] = {{"__gc", cl_chan_req_gc}, {NULL, NULL}};
  static const cl_class cls = {REQ_MT, NULL, NULL, meta};
  cl_class_register(L, &cls);
  return 0;
}
