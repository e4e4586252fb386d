/*
 * The Lua binding of the event loop: clawlua.loop (run, step, stats, shutdown), spawn, sleep,
 * yield, poll, current, and the task methods. The core is loop.c.
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

/* Lua: clawlua.spawn(fn, ...) -> task */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  cl_task_spawn(L, lua_gettop(L) - 1);
  return 1;
}

static int push_results(lua_State *L, cl_task *t, int ti) {
  lua_getiuservalue(L, ti, 2);
  int r = lua_gettop(L);
  lua_getfield(L, r, "n");
  int n = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  luaL_checkstack(L, n, "too many results");
  for (int i = 1; i <= n; i++) lua_rawgeti(L, r, i);
  return n;
}

/* Outcome of a finished task at index ti, as join reports it. */
static int join_outcome(lua_State *L, cl_task *t, int ti) {
  switch (t->state) {
  case T_DONE:
    return push_results(L, t, ti);
  case T_CANCELLED:
    lua_pushnil(L);
    lua_pushliteral(L, "cancelled");
    return 2;
  default:
    lua_getiuservalue(L, ti, 2);
    return lua_error(L);
  }
}

static int join_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  cl_task *t = cl_loop_check_task(L, 1);
  if (t->state < T_DONE) {
    if (w->state == CL_WAIT_TIMEOUT) {
      t->joined = 0;
      return cl_timed_out(L);
    }
    cl_waitq_add(&t->joiners, w);
    return cl_wait_suspend(L, w, join_k, ctx);
  }
  return join_outcome(L, t, 1);
}

/* Lua: task:join([timeout]) -> results...; re-raises the task's error; nil, "cancelled" /
 * nil, "timeout", "ETIMEDOUT" */
static int l_task_join(lua_State *L) {
  cl_task *t = cl_loop_check_task(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 1);
  if (t->state >= T_DONE) return join_outcome(L, t, 1);
  if (t->co == L) return luaL_error(L, "a task cannot join itself");
  t->joined = 1;
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  cl_waitq_add(&t->joiners, w);
  return cl_wait_suspend(L, w, join_k, lua_gettop(L));
}

/* Lua: task:cancel() -> true. Cancelling the running task raises the cancellation at once. */
static int l_task_cancel(lua_State *L) {
  cl_task *t = cl_loop_check_task(L, 1);
  if (t->state == T_RUNNING && t->co == L) {
    t->cancel = 0;
    cl_loop_push_cancelled(L);
    return lua_error(L);
  }
  cl_loop_task_cancel(L, t);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_task_status(lua_State *L) {
  cl_task *t = cl_loop_check_task(L, 1);
  lua_pushstring(L, task_state_names[t->state]);
  return 1;
}

static int l_task_done(lua_State *L) {
  lua_pushboolean(L, cl_loop_check_task(L, 1)->state >= T_DONE);
  return 1;
}

/* Lua: task:result() -> true, results... | false, err | nil (not finished) */
static int l_task_result(lua_State *L) {
  cl_task *t = cl_loop_check_task(L, 1);
  lua_settop(L, 1);
  if (t->state < T_DONE) {
    lua_pushnil(L);
    return 1;
  }
  if (t->state == T_DONE) {
    lua_pushboolean(L, 1);
    return 1 + push_results(L, t, 1);
  }
  lua_pushboolean(L, 0);
  if (t->state == T_CANCELLED)
    lua_pushliteral(L, "cancelled");
  else
    lua_getiuservalue(L, 1, 2);
  return 2;
}

void cl_task_set_daemon(cl_task *t, int on) {
  on = !!on;
  if (t->state >= T_DONE || t->daemon == on) return;
  t->daemon = on;
  if (on)
    t->loop->ndaemon++;
  else
    t->loop->ndaemon--;
}

/* Lua: task:set_daemon([on=true]) -> task. A daemon task does not keep loop.run() (and the
 * host) going; it is cancelled at shutdown like any other. */
static int l_task_set_daemon(lua_State *L) {
  cl_task *t = cl_loop_check_task(L, 1);
  cl_task_set_daemon(t, lua_isnone(L, 2) ? 1 : lua_toboolean(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int l_task_traceback(lua_State *L) {
  cl_loop_check_task(L, 1);
  lua_getiuservalue(L, 1, 3);
  return 1;
}

static int l_task_tostring(lua_State *L) {
  cl_task *t = cl_loop_check_task(L, 1);
  lua_pushfstring(L, "clawlua.task (%s): %p", task_state_names[t->state], (void *)t);
  return 1;
}

/* Lua: clawlua.run(fn, ...) -> fn's results. Runs the loop until fn's task finishes; errors
 * are raised again with the task's traceback appended. */
static int run_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  CL_UNUSED(w);
  cl_task *t = cl_loop_check_task(L, (int)ctx - 1);
  if (t->state < T_DONE) {
    cl_waitq_add(&t->joiners, w);
    return cl_wait_suspend(L, w, run_k, ctx);
  }
  int ti = (int)ctx - 1;
  if (t->state == T_FAILED) {
    lua_getiuservalue(L, ti, 2);
    if (lua_type(L, -1) == LUA_TSTRING) {
      lua_getiuservalue(L, ti, 3);
      lua_remove(L, -2);
    }
    return lua_error(L);
  }
  return join_outcome(L, t, ti);
}

static int l_run(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  cl_task *t = cl_task_spawn(L, lua_gettop(L) - 1);
  t->joined = 1;
  cl_wait *w = cl_wait_push(L);
  cl_waitq_add(&t->joiners, w);
  return cl_wait_suspend(L, w, run_k, lua_gettop(L));
}

/* Lua: clawlua.current() -> the running task or nil */
static int l_current(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  cl_task *t = lp->current;
  if (t && t->co == L)
    cl_loop_push_task(L, t);
  else
    lua_pushnil(L);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* sleep, yield, poll                                                                         */

static int sleep_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait_resumed(L, ctx);
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: clawlua.sleep(seconds) -> true */
static int l_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  luaL_argcheck(L, s >= 0, 1, "negative duration");
  lua_settop(L, 1);
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(s);
  return cl_wait_suspend(L, w, sleep_k, lua_gettop(L));
}

static int yield_k(lua_State *L, int status, lua_KContext ctx) {
  cl_loop *lp = cl_loop_get(L);
  cl_task *t = cl_task_current(lp, L);
  if (t && t->cancel) {
    t->cancel = 0;
    cl_loop_push_cancelled(L);
    return lua_error(L);
  }
  return 0;
}

/* Lua: clawlua.yield() lets every other ready task run once. */
static int l_yield(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  cl_task *t = cl_task_current(lp, L);
  if (t) {
    if (t->cancel) return yield_k(L, LUA_OK, 0);
    return lua_yieldk(L, 0, 0, yield_k);
  }
  cl_loop_iter(lp, L, 0, NULL);
  return 0;
}

typedef struct pollwatch {
  cl_watch watch;
  int fd; /* a dup of the caller's fd: epoll keys on (fd, file), so this never collides */
} pollwatch;

static int pollwatch_gc(lua_State *L) {
  pollwatch *p = lua_touserdata(L, 1);
  if (p->fd >= 0) {
    cl_watch_stop(&p->watch);
    close(p->fd);
    p->fd = -1;
  }
  return 0;
}

static int poll_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  pollwatch *p = lua_touserdata(L, (int)ctx - 1);
  int timedout = w->state == CL_WAIT_TIMEOUT;
  cl_watch_stop(&p->watch);
  close(p->fd);
  p->fd = -1;
  if (timedout) {
    return cl_timed_out(L);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: clawlua.loop.poll(fd, "r"|"w", [timeout]) -> true | nil, "timeout", "ETIMEDOUT" */
static int l_poll(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  static const char *const modes[] = {"r", "w", NULL};
  int dir = luaL_checkoption(L, 2, "r", modes);
  double timeout = luaL_optnumber(L, 3, -1);
  lua_settop(L, 3);
  pollwatch *p = lua_newuserdatauv(L, sizeof *p, 0);
  p->fd = -1;
  lua_newtable(L);
  lua_pushcfunction(L, pollwatch_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  int dfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (dfd < 0) return cl_fail(L, "poll", errno);
  p->fd = dfd;
  int err = cl_watch_start(cl_loop_get(L), &p->watch, dfd, 0, NULL);
  if (err) return cl_fail(L, "poll", err);
  if (p->watch.always_ready) {
    lua_pushboolean(L, 1);
    return 1;
  }
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return cl_watch_wait(L, w, &p->watch, dir, poll_k, lua_gettop(L));
}

/* Lua: clawlua.loop.run() runs until no task but daemons is left (or none can make progress).
 * Returns the number of non-daemon tasks still blocked forever (0 normally). */
static int l_loop_run(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  while (lp->ntasks > lp->ndaemon || lp->rhead) {
    if (lp->shutdown_done) break;
    if (!cl_loop_iter(lp, L, 2, NULL)) break;
  }
  cl_loop_check_shutdown(lp);
  lua_pushinteger(L, (lua_Integer)(lp->ntasks - lp->ndaemon));
  return 1;
}

/* Lua: clawlua.loop.step([block]) runs one turn. */
static int l_loop_step(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  lua_pushboolean(L, cl_loop_iter(lp, L, lua_toboolean(L, 1), NULL));
  return 1;
}

static int l_loop_stats(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, (lua_Integer)lp->ntasks);
  lua_setfield(L, -2, "tasks");
  lua_pushinteger(L, (lua_Integer)lp->ndaemon);
  lua_setfield(L, -2, "daemons");
  lua_pushinteger(L, (lua_Integer)lp->nheap);
  lua_setfield(L, -2, "timers");
  lua_pushinteger(L, (lua_Integer)lp->nexternal);
  lua_setfield(L, -2, "io_waits");
  lua_pushinteger(L, (lua_Integer)lp->nref);
  lua_setfield(L, -2, "watchers");
  lua_pushinteger(L, lp->unhandled);
  lua_setfield(L, -2, "unhandled_errors");
  long nreap = 0;
  for (reap *r = lp->reaps; r; r = r->next) nreap++;
  lua_pushinteger(L, nreap);
  lua_setfield(L, -2, "reaping");
  lua_pushinteger(L, lp->depth);
  lua_setfield(L, -2, "depth");
  return 1;
}

/* Lua: clawlua.loop.stopping() -> signal name of a shutdown in progress, or nil */
static int l_loop_stopping(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  if (!lp->stopping) return 0;
  lua_pushstring(L, cl_signal_name(lp->stopping));
  lua_pushboolean(L, lp->shutdown_done);
  return 2;
}

/* Lua: clawlua.loop.shutdown_grace([seconds]) -> seconds */
static int l_loop_grace(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  if (!lua_isnoneornil(L, 1)) {
    double g = luaL_checknumber(L, 1);
    luaL_argcheck(L, g >= 0 && g <= 86400, 1, "between 0 and 86400 seconds");
    lp->grace = g;
  }
  lua_pushnumber(L, lp->grace);
  return 1;
}

/* Lua: clawlua.on_shutdown(fn) registers a handler run (as a task, with the signal number) when
 * SIGINT/SIGTERM start a shutdown. Returns fn. */
static int l_on_shutdown(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  lua_getiuservalue(L, -1, 2);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_settop(L, 1);
  return 1;
}

/* Lua: clawlua.on_signal("HUP", fn) registers a handler run (as a task, with the signal number)
 * at every SIGHUP; until one is registered SIGHUP keeps its default action. Returns fn. */
static int l_on_signal(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  luaL_argcheck(L, strcmp(name, "HUP") == 0 || strcmp(name, "SIGHUP") == 0, 1,
                "\"HUP\" expected (SIGINT/SIGTERM: on_shutdown)");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  cl_loop *lp = cl_loop_get(L);
  if (cl_loop_on_hup(L, lp, 2) != 0) return luaL_error(L, "on_signal: %s", strerror(errno));
  lua_settop(L, 2);
  return 1;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, cl_now());
  return 1;
}

static int l_time(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
  return 1;
}

static int l_is_cancelled(lua_State *L) {
  lua_pushboolean(L, cl_loop_is_cancelled_value(L, 1));
  return 1;
}

static const luaL_Reg task_methods[] = {
    {"join", l_task_join},
    {"cancel", l_task_cancel},
    {"status", l_task_status},
    {"done", l_task_done},
    {"result", l_task_result},
    {"traceback", l_task_traceback},
    {"set_daemon", l_task_set_daemon},
    {NULL, NULL},
};

static const luaL_Reg loop_funcs[] = {
    {"spawn", l_spawn},
    {"run", l_loop_run},
    {"step", l_loop_step},
    {"sleep", l_sleep},
    {"yield", l_yield},
    {"now", l_now},
    {"time", l_time},
    {"current", l_current},
    {"event", cl_loop_event_new},
    {"channel", cl_loop_channel_new},
    {"poll", l_poll},
    {"stats", l_loop_stats},
    {"stopping", l_loop_stopping},
    {"shutdown_grace", l_loop_grace},
    {"on_shutdown", l_on_shutdown},
    {"on_signal", l_on_signal},
    {"is_cancelled", l_is_cancelled},
    {"run_task", l_run},
    {NULL, NULL},
};

int luaopen_clawlua_loop(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  int exists = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (!exists) {
    cl_loop_create(L);
    static const luaL_Reg task_meta[] = {{"__tostring", l_task_tostring}, {NULL, NULL}};
    static const luaL_Reg channel_meta[] = {{"__len", cl_loop_channel_len}, {NULL, NULL}};
    static const cl_class classes[] = {
        {TASK_MT, task_methods, NULL, task_meta},
        {EVENT_MT, cl_loop_event_methods, cl_loop_event_gc, NULL},
        {CHANNEL_MT, cl_loop_channel_methods, NULL, channel_meta},
        {WAIT_MT, NULL, cl_loop_wait_gc, NULL},
    };
    for (size_t i = 0; i < CL_ARRAY_LEN(classes); i++) cl_class_register(L, &classes[i]);
  }
  luaL_newlib(L, loop_funcs);
  cl_loop_push_cancelled(L);
  lua_setfield(L, -2, "cancelled");
  return 1;
}
