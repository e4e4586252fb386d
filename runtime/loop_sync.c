/*
 * Events and channels: Lua classes built on the wait API of the loop (clawlua.event,
 * clawlua.channel).
 */
#include "loop_int.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Events and channels                                                                        */

typedef struct event {
  int set;
  cl_waitq q;
} event;

int cl_loop_event_new(lua_State *L) {
  event *e = lua_newuserdatauv(L, sizeof *e, 0);
  memset(e, 0, sizeof *e);
  luaL_setmetatable(L, EVENT_MT);
  return 1;
}

static int l_event_set(lua_State *L) {
  event *e = luaL_checkudata(L, 1, EVENT_MT);
  e->set = 1;
  cl_waitq_wake_all(&e->q, 0);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_event_clear(lua_State *L) {
  event *e = luaL_checkudata(L, 1, EVENT_MT);
  e->set = 0;
  lua_pushboolean(L, 1);
  return 1;
}

static int l_event_is_set(lua_State *L) {
  lua_pushboolean(L, ((event *)luaL_checkudata(L, 1, EVENT_MT))->set);
  return 1;
}

static int event_wait_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  if (w->state == CL_WAIT_TIMEOUT) {
    return cl_timed_out(L);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: ev:wait([timeout]) -> true | nil, "timeout", "ETIMEDOUT" */
static int l_event_wait(lua_State *L) {
  event *e = luaL_checkudata(L, 1, EVENT_MT);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 2);
  if (e->set) {
    lua_pushboolean(L, 1);
    return 1;
  }
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  cl_waitq_add(&e->q, w);
  return cl_wait_suspend(L, w, event_wait_k, lua_gettop(L));
}

int cl_loop_event_gc(lua_State *L) {
  event *e = lua_touserdata(L, 1);
  /* Pending waiters anchor the event through their stacks, so this queue is empty. */
  cl_waitq_wake_all(&e->q, ECANCELED);
  return 0;
}

typedef struct channel {
  lua_Integer cap, head, count;
  int closed;
  cl_waitq senders, receivers;
} channel;

static channel *check_channel(lua_State *L) {
  return luaL_checkudata(L, 1, CHANNEL_MT);
}

/* Lua: clawlua.channel([capacity=1]) */
int cl_loop_channel_new(lua_State *L) {
  lua_Integer cap = luaL_optinteger(L, 1, 1);
  luaL_argcheck(L, cap >= 1 && cap <= CHANNEL_MAX_CAPACITY, 1,
                "capacity must be between 1 and 16777216");
  channel *c = lua_newuserdatauv(L, sizeof *c, 1);
  memset(c, 0, sizeof *c);
  c->cap = cap;
  lua_createtable(L, cap < 64 ? (int)cap : 64, 0);
  lua_setiuservalue(L, -2, 1);
  luaL_setmetatable(L, CHANNEL_MT);
  return 1;
}

static int channel_send_k(lua_State *L, int status, lua_KContext ctx);

static int channel_try_send(lua_State *L, channel *c) {
  if (c->closed) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (c->count >= c->cap) return -1;
  lua_getiuservalue(L, 1, 1);
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, (c->head + c->count) % c->cap + 1);
  lua_pop(L, 1);
  c->count++;
  cl_waitq_wake_one(&c->receivers, 0);
  lua_pushboolean(L, 1);
  return 1;
}

static int channel_send_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  channel *c = check_channel(L);
  int n = channel_try_send(L, c);
  if (n >= 0) return n;
  if (w->state == CL_WAIT_TIMEOUT) {
    return cl_timed_out(L);
  }
  cl_waitq_add(&c->senders, w);
  return cl_wait_suspend(L, w, channel_send_k, ctx);
}

/* Lua: ch:send(value, [timeout]) -> true | nil, "closed" | nil, "timeout". nil cannot be sent:
 * recv's nil means "nothing received". */
static int l_channel_send(lua_State *L) {
  channel *c = check_channel(L);
  luaL_argcheck(L, !lua_isnoneornil(L, 2), 2, "a channel cannot carry nil");
  double timeout = luaL_optnumber(L, 3, -1);
  lua_settop(L, 3);
  int n = channel_try_send(L, c);
  if (n >= 0) return n;
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  cl_waitq_add(&c->senders, w);
  return cl_wait_suspend(L, w, channel_send_k, lua_gettop(L));
}

static int channel_try_recv(lua_State *L, channel *c) {
  if (c->count == 0) {
    if (!c->closed) return -1;
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  lua_getiuservalue(L, 1, 1);
  lua_rawgeti(L, -1, c->head + 1);
  lua_pushnil(L);
  lua_rawseti(L, -3, c->head + 1);
  lua_remove(L, -2);
  c->head = (c->head + 1) % c->cap;
  c->count--;
  cl_waitq_wake_one(&c->senders, 0);
  return 1;
}

static int channel_recv_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  channel *c = check_channel(L);
  int n = channel_try_recv(L, c);
  if (n >= 0) return n;
  if (w->state == CL_WAIT_TIMEOUT) {
    return cl_timed_out(L);
  }
  cl_waitq_add(&c->receivers, w);
  return cl_wait_suspend(L, w, channel_recv_k, ctx);
}

/* Lua: ch:recv([timeout]) -> value | nil, "closed" | nil, "timeout", "ETIMEDOUT" */
static int l_channel_recv(lua_State *L) {
  channel *c = check_channel(L);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 2);
  int n = channel_try_recv(L, c);
  if (n >= 0) return n;
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  cl_waitq_add(&c->receivers, w);
  return cl_wait_suspend(L, w, channel_recv_k, lua_gettop(L));
}

/* Lua: ch:try_send(v) -> true | nil, "full" | nil, "closed" */
static int l_channel_try_send(lua_State *L) {
  channel *c = check_channel(L);
  luaL_argcheck(L, !lua_isnoneornil(L, 2), 2, "a channel cannot carry nil");
  lua_settop(L, 2);
  int n = channel_try_send(L, c);
  if (n >= 0) return n;
  lua_pushnil(L);
  lua_pushliteral(L, "full");
  return 2;
}

/* Lua: ch:try_recv() -> value | nil, "empty" | nil, "closed" */
static int l_channel_try_recv(lua_State *L) {
  channel *c = check_channel(L);
  lua_settop(L, 1);
  int n = channel_try_recv(L, c);
  if (n >= 0) return n;
  lua_pushnil(L);
  lua_pushliteral(L, "empty");
  return 2;
}

/* Lua: ch:close(): senders fail from now on; receivers drain what is buffered, then "closed". */
static int l_channel_close(lua_State *L) {
  channel *c = check_channel(L);
  c->closed = 1;
  cl_waitq_wake_all(&c->senders, 0);
  cl_waitq_wake_all(&c->receivers, 0);
  lua_pushboolean(L, 1);
  return 1;
}

int cl_loop_channel_len(lua_State *L) {
  lua_pushinteger(L, check_channel(L)->count);
  return 1;
}

static int l_channel_capacity(lua_State *L) {
  lua_pushinteger(L, check_channel(L)->cap);
  return 1;
}

static int l_channel_is_closed(lua_State *L) {
  lua_pushboolean(L, check_channel(L)->closed);
  return 1;
}

const luaL_Reg cl_loop_event_methods[] = {
    {"set", l_event_set},
    {"clear", l_event_clear},
    {"is_set", l_event_is_set},
    {"wait", l_event_wait},
    {NULL, NULL},
};

const luaL_Reg cl_loop_channel_methods[] = {
    {"send", l_channel_send},         {"recv", l_channel_recv},
    {"try_send", l_channel_try_send}, {"try_recv", l_channel_try_recv},
    {"close", l_channel_close},       {"is_closed", l_channel_is_closed},
    {"capacity", l_channel_capacity}, {NULL, NULL},
};
