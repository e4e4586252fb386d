/*
 * Private header of the event loop (runtime/loop*.c). One-way flow:
 *
 *   loop_lua.c     Lua binding: clawlua.loop, spawn/sleep/yield/poll, the task methods
 *     |
 *   loop_sync.c    events and channels (Lua classes on the wait API)
 *   loop_signal.c  SIGINT/SIGTERM, orderly shutdown, reaping dropped children
 *     |
 *   loop.c         the core: clock, timer heap, waits, the ready queue, tasks, one loop turn
 *
 * The core calls the shutdown check of loop_signal.c only through cl_loop_check_shutdown,
 * declared here; everything else goes downward.
 */
#ifndef CLAWLUA_LOOP_INT_H
#define CLAWLUA_LOOP_INT_H

#include "clawlua.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/epoll.h>

#define LOOP_MT    "clawlua.loop"
#define TASK_MT    "clawlua.task"
#define WAIT_MT    "clawlua.wait"
#define EVENT_MT   "clawlua.event"
#define CHANNEL_MT "clawlua.channel"

#define MAX_EVENTS           128
#define MAX_NESTING          64
#define CHANNEL_MAX_CAPACITY (1 << 24)

extern const char cl_loop_key;        /* registry: the loop userdata (its address) */
extern const char cl_loop_cancel_key; /* registry: the cancellation error object */
#define LOOP_KEY      cl_loop_key
#define CANCELLED_KEY cl_loop_cancel_key

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
  int epfd, tfd;
  /* SIGINT/SIGTERM: a thread takes them with sigwaitinfo, counts them (a second one exits at
   * once, however busy the loop is) and hands the first to the loop through a pipe. */
  int sfd, sigw; /* the pipe's read and write ends */
  pthread_t sigthread;
  int sigthread_on;
  atomic_int nsignals; /* SIGINT/SIGTERM the thread has taken */
  atomic_int sigstop;  /* the loop is going: the thread returns */
  int hfd;             /* SIGHUP's signalfd, made when the first handler is registered */
  cl_watch twatch, swatch, hwatch;
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

void cl_loop_wait_finish(cl_wait *w, int state, int result);
int cl_loop_wait_gc(lua_State *L);
void cl_loop_push_cancelled(lua_State *L);
cl_task *cl_loop_check_task(lua_State *L, int i);
void cl_loop_push_task(lua_State *L, cl_task *t);
int cl_loop_is_cancelled_value(lua_State *L, int idx);
void cl_loop_task_cancel(lua_State *L, cl_task *t);
int cl_loop_iter(cl_loop *lp, lua_State *from, int may_block, cl_wait *until);
void cl_loop_create(lua_State *L);
int cl_loop_event_new(lua_State *L);
int cl_loop_event_gc(lua_State *L);
int cl_loop_channel_new(lua_State *L);
int cl_loop_channel_len(lua_State *L);
extern const luaL_Reg cl_loop_event_methods[];
extern const luaL_Reg cl_loop_channel_methods[];
void cl_loop_check_shutdown(cl_loop *lp);
void cl_loop_on_signal_pipe(cl_watch *w, uint32_t events);
/* Starts the signal thread (SIGINT/SIGTERM are blocked in the caller already). 0, or an errno. */
int cl_loop_signal_thread_start(cl_loop *lp);
/* Stops it. Returns a signal it took that the loop never acted on (the script ended), or 0. */
int cl_loop_signal_thread_stop(cl_loop *lp);
/* Adds the function at stack index fn to SIGHUP's handlers (the first one routes SIGHUP to the
 * signalfd). 0, or -1 with errno. */
int cl_loop_on_hup(lua_State *L, cl_loop *lp, int fn);

#endif
