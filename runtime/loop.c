/*
 * The event loop: one epoll instance per Lua state, coroutine tasks, timers on a timerfd,
 * SIGINT/SIGTERM through a signalfd, fd readiness for the primitives, and the wait mechanism
 * that lets every blocking call either yield (inside a task) or run the loop itself (main chunk).
 *
 * Lua code never runs while epoll events are dispatched: dispatch only wakes waits, which puts
 * their tasks on the ready queue; tasks are resumed afterwards, one at a time.
 */
#include "clawlua.h"

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

#define LOOP_MT    "clawlua.loop"
#define TASK_MT    "clawlua.task"
#define WAIT_MT    "clawlua.wait"
#define EVENT_MT   "clawlua.event"
#define CHANNEL_MT "clawlua.channel"

#define MAX_EVENTS           128
#define MAX_NESTING          64
#define CHANNEL_MAX_CAPACITY (1 << 24)

static const char LOOP_KEY = 'L';      /* registry: the loop userdata */
static const char CANCELLED_KEY = 'C'; /* registry: the cancellation error object */

enum { T_READY, T_RUNNING, T_WAITING, T_DONE, T_FAILED, T_CANCELLED };
static const char *const task_state_names[] = {"ready", "running", "waiting",
                                               "done",  "failed",  "cancelled"};

struct cl_task {
  cl_loop *loop;
  lua_State *co;
  int state;
  int nargs; /* arguments on co's stack for the first resume */
  int started;
  int cancel; /* cancellation requested, delivered at the task's next wait */
  int queued;
  int joined; /* a joiner waits: the error is the joiner's to handle */
  int daemon; /* does not keep loop.run() going (subscribers, watchers) */
  cl_wait *wait;
  cl_task *next;
  cl_waitq joiners;
};

typedef struct reap {
  struct reap *next;
  pid_t pid;
  int pidfd;
  cl_watch watch;
  void (*done)(void *);
  void *arg;
} reap;

typedef struct closer {
  struct closer *next;
  void (*fn)(void *);
  void *arg;
} closer;

struct cl_loop {
  lua_State *L; /* main thread */
  int epfd, tfd, sfd;
  cl_watch twatch, swatch;
  cl_timer **heap;
  size_t nheap, capheap;
  uint64_t armed; /* deadline programmed into the timerfd; 0: disarmed */
  cl_task *rhead, *rtail;
  size_t ntasks;    /* tasks not finished */
  size_t ndaemon;   /* of which daemons */
  size_t nexternal; /* pending waits on fds or children */
  size_t nref;      /* cb watches that keep the loop alive */
  cl_task *current;
  cl_wait *blocking[MAX_NESTING]; /* waits of callers that run the loop themselves */
  int depth;
  int stopping;       /* signal number of a shutdown in progress */
  int shutdown_done;  /* host mode: the orderly shutdown finished */
  uint64_t grace_end; /* shutdown deadline */
  double grace;       /* seconds a shutdown may take */
  long unhandled;     /* task errors nobody joined */
  struct epoll_event *events;
  int nevents, ievent; /* the batch being dispatched */
  reap *reaps;
  closer *closers;
  sigset_t oldmask;
  int closed;
};

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
static void wait_finish(cl_wait *w, int state, int result) {
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
  wait_finish(w, CL_WAIT_DONE, result);
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
  wait_finish(w, CL_WAIT_TIMEOUT, ETIMEDOUT);
}

static int wait_gc(lua_State *L) {
  cl_wait *w = lua_touserdata(L, 1);
  if (w->state == CL_WAIT_PENDING) {
    w->task = NULL; /* the task is being collected with it */
    wait_finish(w, CL_WAIT_CANCELLED, ECANCELED);
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

static void push_cancelled(lua_State *L) {
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

static int loop_iter(cl_loop *lp, lua_State *from, int may_block, cl_wait *until);

static void check_shutdown(cl_loop *lp);

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
    push_cancelled(L);
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
    wait_finish(w, CL_WAIT_CANCELLED, ECANCELED);
    w->state = CL_WAIT_IDLE;
    return luaL_error(L, "clawlua: loop nested more than %d deep", MAX_NESTING);
  }
  lp->blocking[lp->depth++] = w;
  while (w->state == CL_WAIT_PENDING) {
    if (!loop_iter(lp, L, 1, w)) {
      lp->depth--;
      wait_finish(w, CL_WAIT_CANCELLED, ECANCELED);
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
    push_cancelled(L);
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

static cl_task *check_task(lua_State *L, int i) {
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

static void push_task(lua_State *L, cl_task *t) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, t); /* task userdata registered under its address */
}

static int is_cancelled_value(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  push_cancelled(L);
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
  push_task(L, t);
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
    push_task(L, t);
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
  int cancelled = is_cancelled_value(co, -1);
  push_task(L, t);
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
    push_task(L, t);
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

static void task_cancel(lua_State *L, cl_task *t) {
  if (t->state >= T_DONE) return;
  t->cancel = 1;
  if (t->state == T_WAITING && t->wait) wait_finish(t->wait, CL_WAIT_CANCELLED, ECANCELED);
}

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
  cl_task *t = check_task(L, 1);
  if (t->state < T_DONE) {
    if (w->state == CL_WAIT_TIMEOUT) {
      t->joined = 0;
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
    cl_waitq_add(&t->joiners, w);
    return cl_wait_suspend(L, w, join_k, ctx);
  }
  return join_outcome(L, t, 1);
}

/* Lua: task:join([timeout]) -> results...; re-raises the task's error; nil, "cancelled" /
 * nil, "timeout" */
static int l_task_join(lua_State *L) {
  cl_task *t = check_task(L, 1);
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
  cl_task *t = check_task(L, 1);
  if (t->state == T_RUNNING && t->co == L) {
    t->cancel = 0;
    push_cancelled(L);
    return lua_error(L);
  }
  task_cancel(L, t);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_task_status(lua_State *L) {
  cl_task *t = check_task(L, 1);
  lua_pushstring(L, task_state_names[t->state]);
  return 1;
}

static int l_task_done(lua_State *L) {
  lua_pushboolean(L, check_task(L, 1)->state >= T_DONE);
  return 1;
}

/* Lua: task:result() -> true, results... | false, err | nil (not finished) */
static int l_task_result(lua_State *L) {
  cl_task *t = check_task(L, 1);
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
  cl_task *t = check_task(L, 1);
  cl_task_set_daemon(t, lua_isnone(L, 2) ? 1 : lua_toboolean(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int l_task_traceback(lua_State *L) {
  check_task(L, 1);
  lua_getiuservalue(L, 1, 3);
  return 1;
}

static int l_task_tostring(lua_State *L) {
  cl_task *t = check_task(L, 1);
  lua_pushfstring(L, "clawlua.task (%s): %p", task_state_names[t->state], (void *)t);
  return 1;
}

/* Lua: clawlua.run(fn, ...) -> fn's results. Runs the loop until fn's task finishes; errors
 * are raised again with the task's traceback appended. */
static int run_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  CL_UNUSED(w);
  cl_task *t = check_task(L, (int)ctx - 1);
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
    push_task(L, t);
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
    push_cancelled(L);
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
  loop_iter(lp, L, 0, NULL);
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
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: clawlua.loop.poll(fd, "r"|"w", [timeout]) -> true | nil, "timeout" */
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

/* ------------------------------------------------------------------------------------------ */
/* Events and channels                                                                        */

typedef struct event {
  int set;
  cl_waitq q;
} event;

static int l_event_new(lua_State *L) {
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
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: ev:wait([timeout]) -> true | nil, "timeout" */
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

static int l_event_gc(lua_State *L) {
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
static int l_channel_new(lua_State *L) {
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
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
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
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  cl_waitq_add(&c->receivers, w);
  return cl_wait_suspend(L, w, channel_recv_k, ctx);
}

/* Lua: ch:recv([timeout]) -> value | nil, "closed" | nil, "timeout" */
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

static int l_channel_len(lua_State *L) {
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

/* ------------------------------------------------------------------------------------------ */
/* Signals and orderly shutdown                                                               */

static void start_shutdown(cl_loop *lp, int sig) {
  lua_State *L = lp->L;
  lp->stopping = sig;
  lp->grace_end = cl_deadline(lp->grace);
  fprintf(stderr, "clawlua: %s received, shutting down (send it again to exit at once)\n",
          cl_signal_name(sig));
  fflush(stderr);
  /* Cancel every task: each unwinds through its <close> variables and pcall handlers. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  lua_getiuservalue(L, -1, 1);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pop(L, 1);
    task_cancel(L, lua_touserdata(L, -1));
  }
  lua_pop(L, 1);
  /* In the host, callers running the loop themselves (the main chunk) unwind too. A script
   * under stock lua5.4 keeps its main chunk waiting while the loop finishes the shutdown. */
  if (cl_host_mode)
    for (int i = 0; i < lp->depth; i++) wait_finish(lp->blocking[i], CL_WAIT_CANCELLED, ECANCELED);
  /* Shutdown handlers, most recently registered first, each as a task. */
  lua_getiuservalue(L, -1, 2);
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
  for (lua_Integer i = n; i >= 1; i--) {
    if (lua_rawgeti(L, -1, i) == LUA_TFUNCTION) {
      lua_pushinteger(L, sig);
      cl_task_spawn(L, 1);
      lua_pop(L, 1);
    } else {
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 2);
}

static void check_shutdown(cl_loop *lp) {
  if (!lp->stopping || lp->shutdown_done) return;
  if (lp->ntasks > 0 && cl_now_ns() < lp->grace_end) return;
  if (lp->ntasks > 0)
    fprintf(stderr, "clawlua: shutdown grace period over with %zu task(s) still running\n",
            lp->ntasks);
  lp->shutdown_done = 1;
  if (!cl_host_mode) {
    /* Under a foreign interpreter there is no host to return to: the shutdown was orderly,
     * now exit with the conventional status. */
    fflush(NULL);
    exit(128 + lp->stopping);
  }
}

static void on_signalfd(cl_watch *w, uint32_t events) {
  cl_loop *lp = w->data;
  struct signalfd_siginfo si;
  while (read(lp->sfd, &si, sizeof si) == (ssize_t)sizeof si) {
    int sig = (int)si.ssi_signo;
    if (lp->stopping) {
      fprintf(stderr, "clawlua: %s again, exiting now\n", cl_signal_name(sig));
      fflush(NULL);
      _exit(128 + sig);
    }
    start_shutdown(lp, sig);
  }
}

/* ------------------------------------------------------------------------------------------ */
/* Reaping dropped children                                                                   */

static void on_reap(cl_watch *w, uint32_t events) {
  reap *r = w->data;
  siginfo_t si;
  memset(&si, 0, sizeof si);
  if (waitid((idtype_t)P_PIDFD, (id_t)r->pidfd, &si, WEXITED | WNOHANG) < 0 && errno != ECHILD)
    return;
  if (errno != ECHILD && si.si_pid == 0) return; /* not yet */
  cl_loop *lp = w->loop;
  cl_watch_stop(w);
  close(r->pidfd);
  for (reap **p = &lp->reaps; *p; p = &(*p)->next)
    if (*p == r) {
      *p = r->next;
      break;
    }
  if (r->done) r->done(r->arg);
  free(r);
}

void cl_reap_later(cl_loop *lp, pid_t pid, int pidfd) {
  cl_reap_later_then(lp, pid, pidfd, NULL, NULL);
}

void cl_reap_later_then(cl_loop *lp, pid_t pid, int pidfd, void (*done)(void *), void *arg) {
  reap *r = calloc(1, sizeof *r);
  if (!r || cl_watch_start(lp, &r->watch, pidfd, EPOLLIN, on_reap) != 0) {
    /* Out of memory or epoll refused: the child was killed, reap it now. */
    siginfo_t si;
    waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED);
    close(pidfd);
    free(r);
    if (done) done(arg);
    return;
  }
  r->done = done;
  r->arg = arg;
  r->pid = pid;
  r->pidfd = pidfd;
  r->watch.data = r;
  r->next = lp->reaps;
  lp->reaps = r;
}

void cl_loop_atclose(cl_loop *lp, void (*fn)(void *), void *arg) {
  closer *c = malloc(sizeof *c);
  if (!c) abort();
  c->fn = fn;
  c->arg = arg;
  c->next = lp->closers;
  lp->closers = c;
}

/* ------------------------------------------------------------------------------------------ */
/* Running the loop                                                                           */

/* One turn: resume ready tasks, then wait for and dispatch I/O and timers. Returns 0 when it
 * would block with nothing left that could ever wake it. With `until`, returns as soon as that
 * wait is no longer pending. */
static int loop_iter(cl_loop *lp, lua_State *from, int may_block, cl_wait *until) {
  run_ready(lp, from);
  check_shutdown(lp);
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

/* Lua: clawlua.loop.run() runs until no task but daemons is left (or none can make progress).
 * Returns the number of non-daemon tasks still blocked forever (0 normally). */
static int l_loop_run(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  while (lp->ntasks > lp->ndaemon || lp->rhead) {
    if (lp->shutdown_done) break;
    if (!loop_iter(lp, L, 2, NULL)) break;
  }
  check_shutdown(lp);
  lua_pushinteger(L, (lua_Integer)(lp->ntasks - lp->ndaemon));
  return 1;
}

/* Lua: clawlua.loop.step([block]) runs one turn. */
static int l_loop_step(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  lua_pushboolean(L, loop_iter(lp, L, lua_toboolean(L, 1), NULL));
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
  lua_pushboolean(L, is_cancelled_value(L, 1));
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
  close(lp->epfd);
  close(lp->tfd);
  close(lp->sfd);
  free(lp->heap);
  free(lp->events);
  lp->heap = NULL;
  lp->events = NULL;
  sigprocmask(SIG_SETMASK, &lp->oldmask, NULL);
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

static void create_loop(lua_State *L) {
  cl_loop *lp = lua_newuserdatauv(L, sizeof *lp, 2);
  memset(lp, 0, sizeof *lp);
  lp->epfd = lp->tfd = lp->sfd = -1;
  lp->grace = 10.0;
  lua_newtable(L); /* live tasks */
  lua_setiuservalue(L, -2, 1);
  lua_newtable(L); /* shutdown handlers */
  lua_setiuservalue(L, -2, 2);
  luaL_newmetatable(L, LOOP_MT);
  lua_pushcfunction(L, loop_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);

  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  lp->L = lua_tothread(L, -1);
  lua_pop(L, 1);

  lp->events = calloc(MAX_EVENTS, sizeof *lp->events);
  lp->epfd = epoll_create1(EPOLL_CLOEXEC);
  lp->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  /* SIGINT and SIGTERM arrive through a signalfd, so they must be blocked; children get a
   * clean mask back before exec (proc.c). SIGPIPE is ignored: a closed pipe is an EPIPE. */
  sigset_t ss;
  sigemptyset(&ss);
  sigaddset(&ss, SIGINT);
  sigaddset(&ss, SIGTERM);
  sigprocmask(SIG_BLOCK, &ss, &lp->oldmask);
  lp->sfd = signalfd(-1, &ss, SFD_NONBLOCK | SFD_CLOEXEC);
  signal(SIGPIPE, SIG_IGN);
  if (!lp->events || lp->epfd < 0 || lp->tfd < 0 || lp->sfd < 0) {
    int err = errno;
    loop_gc(L); /* the userdata is on top */
    luaL_error(L, "clawlua: cannot create the event loop: %s", strerror(err));
  }
  cl_watch_start(lp, &lp->twatch, lp->tfd, EPOLLIN, on_timerfd);
  lp->twatch.data = lp;
  cl_watch_start(lp, &lp->swatch, lp->sfd, EPOLLIN, on_signalfd);
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

static const luaL_Reg event_methods[] = {
    {"set", l_event_set},
    {"clear", l_event_clear},
    {"is_set", l_event_is_set},
    {"wait", l_event_wait},
    {NULL, NULL},
};

static const luaL_Reg channel_methods[] = {
    {"send", l_channel_send},         {"recv", l_channel_recv},
    {"try_send", l_channel_try_send}, {"try_recv", l_channel_try_recv},
    {"close", l_channel_close},       {"is_closed", l_channel_is_closed},
    {"capacity", l_channel_capacity}, {NULL, NULL},
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
    {"event", l_event_new},
    {"channel", l_channel_new},
    {"poll", l_poll},
    {"stats", l_loop_stats},
    {"stopping", l_loop_stopping},
    {"shutdown_grace", l_loop_grace},
    {"on_shutdown", l_on_shutdown},
    {"is_cancelled", l_is_cancelled},
    {"run_task", l_run},
    {NULL, NULL},
};

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
                      lua_CFunction tostr) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  if (gc) {
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
  }
  if (tostr) {
    lua_pushcfunction(L, tostr);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}

int luaopen_clawlua_loop(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  int exists = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (!exists) {
    create_loop(L);
    new_class(L, TASK_MT, task_methods, NULL, l_task_tostring);
    new_class(L, EVENT_MT, event_methods, l_event_gc, NULL);
    new_class(L, CHANNEL_MT, channel_methods, NULL, NULL);
    luaL_getmetatable(L, CHANNEL_MT);
    lua_pushcfunction(L, l_channel_len);
    lua_setfield(L, -2, "__len");
    lua_pop(L, 1);
    luaL_newmetatable(L, WAIT_MT);
    lua_pushcfunction(L, wait_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
  }
  luaL_newlib(L, loop_funcs);
  push_cancelled(L);
  lua_setfield(L, -2, "cancelled");
  return 1;
}
