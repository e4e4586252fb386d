/*
 * The event loop core: one epoll instance per Lua state, coroutine tasks, timers on a timerfd,
 * SIGINT/SIGTERM handed over by a signal thread, fd readiness for the primitives, and the wait
 * mechanism that lets every blocking call either yield (inside a task) or run the loop itself
 * (main chunk).
 *
 * Lua code never runs while epoll events are dispatched: dispatch only wakes waits, which puts
 * their tasks on the ready queue; tasks are resumed afterwards, one at a time.
 */
#include "loop_int.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char cl_loop_key = 'L';
const char cl_loop_cancel_key = 'C';

int cl_host_mode = 0;

/* ------------------------------------------------------------------------------------------ */
/* Clock                                                                                      */

uint64_t cl_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double cl_now(void) {
  return (double)cl_now_ns() / 1e9;
}

uint64_t cl_deadline(double timeout) {
  if (!(timeout >= 0)) return 0; /* negative or NaN: no deadline */
  if (timeout > 1e9) timeout = 1e9;
  uint64_t d = cl_now_ns() + (uint64_t)(timeout * 1e9);
  return d ? d : 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Timer heap                                                                                 */

static void heap_swap(cl_loop *lp, size_t a, size_t b) {
  cl_timer *t = lp->heap[a];
  lp->heap[a] = lp->heap[b];
  lp->heap[b] = t;
  lp->heap[a]->slot = a + 1;
  lp->heap[b]->slot = b + 1;
}

static void heap_up(cl_loop *lp, size_t i) {
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (lp->heap[p]->deadline <= lp->heap[i]->deadline) break;
    heap_swap(lp, i, p);
    i = p;
  }
}

static void heap_down(cl_loop *lp, size_t i) {
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, m = i;
    if (l < lp->nheap && lp->heap[l]->deadline < lp->heap[m]->deadline) m = l;
    if (r < lp->nheap && lp->heap[r]->deadline < lp->heap[m]->deadline) m = r;
    if (m == i) break;
    heap_swap(lp, i, m);
    i = m;
  }
}

static void timerfd_arm(cl_loop *lp) {
  if (lp->nheap == 0) return; /* a stale early expiry is harmless */
  uint64_t d = lp->heap[0]->deadline;
  if (lp->armed && lp->armed <= d) return;
  struct itimerspec its = {0};
  its.it_value.tv_sec = (time_t)(d / 1000000000u);
  its.it_value.tv_nsec = (long)(d % 1000000000u);
  if (timerfd_settime(lp->tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0) lp->armed = d;
}

void cl_timer_start(cl_loop *lp, cl_timer *t, uint64_t deadline, cl_timer_cb cb) {
  if (t->slot) cl_timer_stop(t);
  if (lp->nheap == lp->capheap) {
    size_t n = lp->capheap ? lp->capheap * 2 : 64;
    cl_timer **h = realloc(lp->heap, n * sizeof(cl_timer *));
    if (!h) abort(); /* cannot keep a promise to wake someone: nothing sane remains */
    lp->heap = h;
    lp->capheap = n;
  }
  t->loop = lp;
  t->deadline = deadline;
  t->cb = cb;
  lp->heap[lp->nheap] = t;
  t->slot = ++lp->nheap;
  heap_up(lp, lp->nheap - 1);
  if (lp->heap[0] == t) timerfd_arm(lp);
}

void cl_timer_stop(cl_timer *t) {
  if (!t->slot) return;
  cl_loop *lp = t->loop;
  size_t i = t->slot - 1;
  t->slot = 0;
  lp->nheap--;
  if (i != lp->nheap) {
    lp->heap[i] = lp->heap[lp->nheap];
    lp->heap[i]->slot = i + 1;
    heap_down(lp, i);
    heap_up(lp, i);
  }
}

static void expire_timers(cl_loop *lp) {
  if (lp->nheap == 0) return;
  uint64_t now = cl_now_ns();
  while (lp->nheap && lp->heap[0]->deadline <= now) {
    cl_timer *t = lp->heap[0];
    cl_timer_stop(t);
    t->cb(t);
  }
}

static void on_timerfd(cl_watch *w, uint32_t events) {
  cl_loop *lp = w->data;
  uint64_t n;
  while (read(lp->tfd, &n, sizeof n) > 0) {
  }
  lp->armed = 0;
  expire_timers(lp);
  timerfd_arm(lp);
}

/* ------------------------------------------------------------------------------------------ */
/* Ready queue and wait plumbing                                                              */

static void make_ready(cl_task *t) {
  cl_loop *lp = t->loop;
  if (t->queued) return;
  t->queued = 1;
  t->next = NULL;
  if (lp->rtail)
    lp->rtail->next = t;
  else
    lp->rhead = t;
  lp->rtail = t;
}

void cl_waitq_add(cl_waitq *q, cl_wait *w) {
  w->queue = q;
  w->next = NULL;
  w->prev = q->tail;
  if (q->tail)
    q->tail->next = w;
  else
    q->head = w;
  q->tail = w;
}

static void waitq_remove(cl_wait *w) {
  cl_waitq *q = w->queue;
  if (!q) return;
  if (w->prev)
    w->prev->next = w->next;
  else
    q->head = w->next;
  if (w->next)
    w->next->prev = w->prev;
  else
    q->tail = w->prev;
  w->queue = NULL;
  w->next = w->prev = NULL;
}

int cl_waitq_empty(const cl_waitq *q) {
  return q->head == NULL;
}

/* Takes a wait out of everything it is linked into and records why it ended. */
void cl_loop_wait_finish(cl_wait *w, int state, int result) {
  if (w->state != CL_WAIT_PENDING) return;
  cl_loop *lp = w->loop;
  cl_timer_stop(&w->timer);
  waitq_remove(w);
  if (w->external) lp->nexternal--;
  w->state = state;
  w->result = result;
  if (state == CL_WAIT_CANCELLED && w->on_abort) w->on_abort(w);
  cl_task *t = w->task;
  if (t) {
    w->task = NULL;
    t->wait = NULL;
    t->state = T_READY;
    make_ready(t);
  }
}

void cl_wait_wake(cl_wait *w, int result) {
  cl_loop_wait_finish(w, CL_WAIT_DONE, result);
}

int cl_waitq_wake_one(cl_waitq *q, int result) {
  if (!q->head) return 0;
  cl_wait_wake(q->head, result);
  return 1;
}

void cl_waitq_wake_all(cl_waitq *q, int result) {
  while (q->head) cl_wait_wake(q->head, result);
}

static void on_wait_timeout(cl_timer *t) {
  cl_wait *w = (cl_wait *)((char *)t - offsetof(cl_wait, timer));
  cl_loop_wait_finish(w, CL_WAIT_TIMEOUT, ETIMEDOUT);
}

int cl_loop_wait_gc(lua_State *L) {
  cl_wait *w = lua_touserdata(L, 1);
  if (w->state == CL_WAIT_PENDING) {
    w->task = NULL; /* the task is being collected with it */
    cl_loop_wait_finish(w, CL_WAIT_CANCELLED, ECANCELED);
  }
  return 0;
}

cl_wait *cl_wait_push(lua_State *L) {
  cl_wait *w = lua_newuserdatauv(L, sizeof *w, 0);
  memset(w, 0, sizeof *w);
  w->loop = cl_loop_get(L);
  luaL_setmetatable(L, WAIT_MT);
  return w;
}

void cl_loop_push_cancelled(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &CANCELLED_KEY);
}

cl_task *cl_task_current(cl_loop *lp, lua_State *L) {
  cl_task *t = lp->current;
  if (t && t->co == L && lua_isyieldable(L)) return t;
  return NULL;
}

static int can_progress(cl_loop *lp) {
  return lp->rhead || lp->nheap || lp->nexternal || lp->nref;
}

int cl_wait_suspend(lua_State *L, cl_wait *w, lua_KFunction k, lua_KContext ctx) {
  cl_loop *lp = w->loop;
  cl_task *t = cl_task_current(lp, L);
  if (t && t->cancel) {
    /* A cancellation is delivered once, at the first wait after it was requested; waits in
     * the task's clean-up code then proceed normally. The wait is abandoned as surely as one
     * cancelled while pending (the task may have been woken, then cancelled before it ran):
     * its owner is told, so that nothing it started goes on unwatched. */
    t->cancel = 0;
    waitq_remove(w);
    w->state = CL_WAIT_IDLE;
    if (w->on_abort) w->on_abort(w);
    cl_loop_push_cancelled(L);
    return lua_error(L);
  }
  w->state = CL_WAIT_PENDING;
  w->result = 0;
  if (w->external) lp->nexternal++;
  if (w->deadline) cl_timer_start(lp, &w->timer, w->deadline, on_wait_timeout);
  if (t) {
    w->task = t;
    t->wait = w;
    t->state = T_WAITING;
    return lua_yieldk(L, 0, ctx, k);
  }
  /* Not in a task: run the loop here until the wait completes. */
  w->task = NULL;
  if (lp->depth >= MAX_NESTING) {
    cl_loop_wait_finish(w, CL_WAIT_CANCELLED, ECANCELED);
    w->state = CL_WAIT_IDLE;
    return luaL_error(L, "clawlua: loop nested more than %d deep", MAX_NESTING);
  }
  lp->blocking[lp->depth++] = w;
  while (w->state == CL_WAIT_PENDING) {
    if (!cl_loop_iter(lp, L, 1, w)) {
      lp->depth--;
      cl_loop_wait_finish(w, CL_WAIT_CANCELLED, ECANCELED);
      w->state = CL_WAIT_IDLE;
      return luaL_error(L, "deadlock: this call waits for something that nothing left "
                           "running can provide (no tasks, timers or I/O in progress)");
    }
  }
  lp->depth--;
  return k(L, LUA_OK, ctx);
}

cl_wait *cl_wait_resumed(lua_State *L, lua_KContext ctx) {
  cl_wait *w = lua_touserdata(L, (int)ctx);
  if (w->state == CL_WAIT_CANCELLED) {
    w->state = CL_WAIT_IDLE;
    cl_task *t = cl_task_current(w->loop, L);
    if (t) t->cancel = 0;
    cl_loop_push_cancelled(L);
    lua_error(L);
  }
  return w;
}

/* ------------------------------------------------------------------------------------------ */
/* fd watches                                                                                 */

int cl_watch_start(cl_loop *lp, cl_watch *w, int fd, uint32_t events, cl_watch_cb cb) {
  memset(w, 0, sizeof *w);
  w->loop = lp;
  w->fd = fd;
  w->cb = cb;
  struct epoll_event ev = {0};
  ev.data.ptr = w;
  ev.events = cb ? events : (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET);
  w->events = ev.events;
  if (epoll_ctl(lp->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
    if (errno == EPERM && !cb) { /* regular file or directory: always ready */
      w->always_ready = 1;
      return 0;
    }
    return errno;
  }
  w->active = 1;
  return 0;
}

int cl_watch_modify(cl_watch *w, uint32_t events) {
  if (!w->active) return EBADF;
  struct epoll_event ev = {0};
  ev.data.ptr = w;
  ev.events = events;
  if (epoll_ctl(w->loop->epfd, EPOLL_CTL_MOD, w->fd, &ev) < 0) return errno;
  w->events = events;
  return 0;
}

void cl_watch_ref(cl_watch *w, int on) {
  on = !!on;
  if (w->ref == on) return;
  w->ref = on;
  if (on)
    w->loop->nref++;
  else
    w->loop->nref--;
}

void cl_watch_stop(cl_watch *w) {
  cl_loop *lp = w->loop;
  if (!lp) return;
  if (w->active) {
    epoll_ctl(lp->epfd, EPOLL_CTL_DEL, w->fd, NULL);
    w->active = 0;
    /* The batch being dispatched may still name this watch. */
    for (int i = lp->ievent + 1; i < lp->nevents; i++)
      if (lp->events[i].data.ptr == w) lp->events[i].data.ptr = NULL;
  }
  cl_watch_ref(w, 0);
  cl_waitq_wake_all(&w->rd, ECANCELED);
  cl_waitq_wake_all(&w->wr, ECANCELED);
}

int cl_watch_wait(lua_State *L, cl_wait *w, cl_watch *watch, int dir, lua_KFunction k,
                  lua_KContext ctx) {
  if (!watch->active && !watch->always_ready) return luaL_error(L, "wait on a stopped watch");
  w->external = 1;
  cl_waitq_add(dir ? &watch->wr : &watch->rd, w);
  return cl_wait_suspend(L, w, k, ctx);
}

static void dispatch(cl_loop *lp, int n) {
  lp->nevents = n;
  for (lp->ievent = 0; lp->ievent < n; lp->ievent++) {
    cl_watch *w = lp->events[lp->ievent].data.ptr;
    if (!w) continue;
    uint32_t ev = lp->events[lp->ievent].events;
    if (w->cb) {
      w->cb(w, ev);
      continue;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)) cl_waitq_wake_all(&w->rd, 0);
    if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) cl_waitq_wake_all(&w->wr, 0);
  }
  lp->nevents = 0;
  lp->ievent = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Tasks                                                                                      */

cl_task *cl_loop_check_task(lua_State *L, int i) {
  return luaL_checkudata(L, i, TASK_MT);
}

static int traceback_handler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

int cl_pcall_report(lua_State *L, int nargs, int nres, const char *what) {
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback_handler);
  lua_insert(L, base);
  int st = lua_pcall(L, nargs, nres, base);
  lua_remove(L, base);
  if (st == LUA_OK) return 1;
  fprintf(stderr, "clawlua: %s: %s\n", what, lua_tostring(L, -1));
  lua_pop(L, 1);
  return 0;
}

/* The live-task table (loop user value 1) anchors every unfinished task. */
static void anchor_task(lua_State *L, cl_loop *lp, int idx, int on) {
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  lua_getiuservalue(L, -1, 1);
  lua_pushvalue(L, idx);
  if (on)
    lua_pushboolean(L, 1);
  else
    lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 2);
}

void cl_loop_push_task(lua_State *L, cl_task *t) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, t); /* task userdata registered under its address */
}

int cl_loop_is_cancelled_value(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  cl_loop_push_cancelled(L);
  int r = lua_rawequal(L, idx, -1);
  lua_pop(L, 1);
  return r;
}

/* Records the outcome of a finished task: results (or error and traceback) in user value 2/3. */
static void task_finish(lua_State *L, cl_task *t, int state) {
  cl_loop *lp = t->loop;
  t->state = state;
  lp->ntasks--;
  if (t->daemon) lp->ndaemon--;
  cl_loop_push_task(L, t);
  int ti = lua_gettop(L);
  lua_pushnil(L);
  lua_setiuservalue(L, ti, 1); /* the coroutine may go */
  anchor_task(L, lp, ti, 0);
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, t);
  lua_pop(L, 1);
  t->co = NULL;
  cl_waitq_wake_all(&t->joiners, 0);
}

static void task_resume(cl_loop *lp, lua_State *from, cl_task *t) {
  lua_State *co = t->co;
  lua_State *L = lp->L;
  if (!t->started && t->cancel) { /* cancelled before it ever ran */
    lua_settop(co, 0);
    task_finish(L, t, T_CANCELLED);
    return;
  }
  t->started = 1;
  t->state = T_RUNNING;
  cl_task *prev = lp->current;
  lp->current = t;
  int nres = 0;
  int nargs = t->nargs;
  t->nargs = 0;
  int st = lua_resume(co, from, nargs, &nres);
  lp->current = prev;
  if (st == LUA_YIELD) {
    lua_pop(co, nres);
    if (!t->wait) { /* a plain coroutine.yield(): run again on the next turn */
      t->state = T_READY;
      make_ready(t);
    }
    return;
  }
  luaL_checkstack(L, nres + 8, "task results");
  if (st == LUA_OK) {
    /* Results go into a table {n = k, ...} kept as user value 2. */
    cl_loop_push_task(L, t);
    lua_createtable(L, nres, 1);
    lua_xmove(co, L, nres);
    for (int i = nres; i >= 1; i--) lua_rawseti(L, -(i + 1), i); /* table sits below i values */
    lua_pushinteger(L, nres);
    lua_setfield(L, -2, "n");
    lua_setiuservalue(L, -2, 2);
    lua_pop(L, 1);
    task_finish(L, t, T_DONE);
    return;
  }
  /* Error: keep the error value and a traceback of the dead coroutine, then close its pending
   * to-be-closed variables (lua_resume leaves them for us). */
  int cancelled = cl_loop_is_cancelled_value(co, -1);
  cl_loop_push_task(L, t);
  lua_pushvalue(co, -1);
  lua_xmove(co, L, 1);
  lua_setiuservalue(L, -2, 2);
  if (!cancelled) {
    const char *msg = lua_tostring(co, -1);
    if (!msg) {
      if (luaL_callmeta(co, -1, "__tostring") && lua_type(co, -1) == LUA_TSTRING)
        msg = lua_tostring(co, -1);
      else
        msg = lua_pushfstring(co, "(error object is a %s value)", luaL_typename(co, -1));
    }
    luaL_traceback(L, co, msg, 0);
    lua_setiuservalue(L, -2, 3);
  }
  lua_pop(L, 1);
  lua_pushvalue(co, -1); /* the original error, to tell it from a __close failure */
  lua_resetthread(co);
  if (lua_gettop(co) >= 2 && !lua_rawequal(co, -1, -2)) {
    /* A __close handler failed while unwinding: report it, the task still failed. */
    fprintf(stderr, "clawlua: error while closing a failed task: %s\n",
            lua_tostring(co, -1) ? lua_tostring(co, -1) : "(non-string error)");
  }
  if (!cancelled && !t->joined && cl_waitq_empty(&t->joiners)) {
    cl_loop_push_task(L, t);
    lua_getiuservalue(L, -1, 3);
    fprintf(stderr, "clawlua: task failed: %s\n", lua_tostring(L, -1));
    fflush(stderr);
    lua_pop(L, 2);
    lp->unhandled++;
  }
  task_finish(L, t, cancelled ? T_CANCELLED : T_FAILED);
}

static void run_ready(cl_loop *lp, lua_State *from) {
  cl_task *list = lp->rhead;
  lp->rhead = lp->rtail = NULL;
  while (list) {
    cl_task *t = list;
    list = t->next;
    t->next = NULL;
    t->queued = 0;
    if (t->state == T_READY) task_resume(lp, from, t);
  }
}

cl_task *cl_task_spawn(lua_State *L, int nargs) {
  cl_loop *lp = cl_loop_get(L);
  luaL_checktype(L, -(nargs + 1), LUA_TFUNCTION);
  luaL_checkstack(L, 4, "spawn");
  cl_task *t = lua_newuserdatauv(L, sizeof *t, 3);
  memset(t, 0, sizeof *t);
  t->loop = lp;
  luaL_setmetatable(L, TASK_MT);
  lua_insert(L, -(nargs + 2));
  lua_State *co = lua_newthread(L);
  lua_insert(L, -(nargs + 2));
  lua_xmove(L, co, nargs + 1); /* function and arguments */
  /* stack: task, thread */
  lua_setiuservalue(L, -2, 1);
  t->co = co;
  t->nargs = nargs;
  t->state = T_READY;
  lp->ntasks++;
  anchor_task(L, lp, -1, 1);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, t);
  make_ready(t);
  return t;
}

void cl_loop_task_cancel(lua_State *L, cl_task *t) {
  if (t->state >= T_DONE) return;
  t->cancel = 1;
  if (t->state == T_WAITING && t->wait) cl_loop_wait_finish(t->wait, CL_WAIT_CANCELLED, ECANCELED);
}

/* ------------------------------------------------------------------------------------------ */
/* Running the loop                                                                           */

/* One turn: resume ready tasks, then wait for and dispatch I/O and timers. Returns 0 when it
 * would block with nothing left that could ever wake it. With `until`, returns as soon as that
 * wait is no longer pending. */
int cl_loop_iter(cl_loop *lp, lua_State *from, int may_block, cl_wait *until) {
  run_ready(lp, from);
  cl_loop_check_shutdown(lp);
  if (until && until->state != CL_WAIT_PENDING) return 1; /* the caller's wait is over */
  int timeout = 0;
  if (may_block && !lp->rhead) {
    /* loop.run() (may_block 2): when the tasks just resumed left only daemons, stop before
     * blocking; waiting here would keep the host alive until a daemon's timer or I/O fires. */
    if (may_block == 2 && !until && lp->ntasks <= lp->ndaemon) return 1;
    if (!can_progress(lp) && !(lp->stopping && !lp->shutdown_done)) return 0;
    timeout = -1;
    if (lp->stopping && !lp->shutdown_done) timeout = 100; /* watch the grace deadline */
  }
  int n = epoll_wait(lp->epfd, lp->events, MAX_EVENTS, timeout);
  if (n > 0) dispatch(lp, n);
  expire_timers(lp);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Loop life cycle                                                                            */

static int loop_gc(lua_State *L) {
  cl_loop *lp = lua_touserdata(L, 1);
  if (lp->closed) return 0;
  lp->closed = 1;
  while (lp->closers) {
    closer *c = lp->closers;
    lp->closers = c->next;
    c->fn(c->arg);
    free(c);
  }
  while (lp->reaps) {
    reap *r = lp->reaps;
    lp->reaps = r->next;
    siginfo_t si;
    waitid((idtype_t)P_PIDFD, (id_t)r->pidfd, &si, WEXITED);
    close(r->pidfd);
    if (r->done) r->done(r->arg);
    free(r);
  }
  int unseen = cl_loop_signal_thread_stop(lp);
  close(lp->epfd);
  close(lp->tfd);
  if (lp->sfd >= 0) close(lp->sfd);
  if (lp->sigw >= 0) close(lp->sigw);
  if (lp->hfd >= 0) close(lp->hfd);
  free(lp->heap);
  free(lp->events);
  lp->heap = NULL;
  lp->events = NULL;
  sigprocmask(SIG_SETMASK, &lp->oldmask, NULL);
  /* it gets its own action now, as a blocked one would when unblocked (what the script wrote
   * is not lost with the process) */
  if (unseen) {
    fflush(NULL);
    raise(unseen);
  }
  return 0;
}

cl_loop *cl_loop_get(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  cl_loop *lp = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (!lp) luaL_error(L, "clawlua: the loop is not initialised (require \"clawlua\" first)");
  return lp;
}

static int cancelled_tostring(lua_State *L) {
  lua_pushliteral(L, "task cancelled");
  return 1;
}

void cl_loop_create(lua_State *L) {
  cl_loop *lp = lua_newuserdatauv(L, sizeof *lp, 2);
  memset(lp, 0, sizeof *lp);
  lp->epfd = lp->tfd = lp->sfd = lp->sigw = lp->hfd = -1;
  lp->grace = 10.0;
  lua_newtable(L); /* live tasks */
  lua_setiuservalue(L, -2, 1);
  lua_newtable(L); /* shutdown handlers */
  lua_setiuservalue(L, -2, 2);
  static const cl_class cls = {LOOP_MT, NULL, loop_gc, NULL};
  cl_class_register(L, &cls);
  luaL_setmetatable(L, LOOP_MT);

  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  lp->L = lua_tothread(L, -1);
  lua_pop(L, 1);

  lp->events = calloc(MAX_EVENTS, sizeof *lp->events);
  lp->epfd = epoll_create1(EPOLL_CLOEXEC);
  lp->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  /* SIGINT and SIGTERM are taken by the signal thread (loop_signal.c), so they are blocked
   * here; children get a clean mask back before exec (proc.c). SIGPIPE is ignored: a closed
   * pipe is an EPIPE. */
  sigset_t ss;
  sigemptyset(&ss);
  sigaddset(&ss, SIGINT);
  sigaddset(&ss, SIGTERM);
  sigprocmask(SIG_BLOCK, &ss, &lp->oldmask);
  signal(SIGPIPE, SIG_IGN);
  int err = !lp->events || lp->epfd < 0 || lp->tfd < 0 ? errno : cl_loop_signal_thread_start(lp);
  if (err) {
    loop_gc(L); /* the userdata is on top */
    luaL_error(L, "clawlua: cannot create the event loop: %s", strerror(err));
  }
  cl_watch_start(lp, &lp->twatch, lp->tfd, EPOLLIN, on_timerfd);
  lp->twatch.data = lp;
  cl_watch_start(lp, &lp->swatch, lp->sfd, EPOLLIN, cl_loop_on_signal_pipe);
  lp->swatch.data = lp;
  lua_rawsetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);

  /* The cancellation error: a unique table that prints as "task cancelled". */
  lua_newtable(L);
  lua_newtable(L);
  lua_pushcfunction(L, cancelled_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, "clawlua.cancelled");
  lua_setfield(L, -2, "__name");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &CANCELLED_KEY);
}
