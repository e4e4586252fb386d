/*
 * SIGINT/SIGTERM through a thread of their own and the orderly shutdown they start, SIGHUP's
 * handlers (through a signalfd, once one is registered), the reaping of children nobody waits
 * for, and the closers run when the loop goes away.
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
/* Signals and orderly shutdown                                                               */

static void start_shutdown(cl_loop *lp, int sig) {
  lua_State *L = lp->L;
  lp->stopping = sig;
  lp->grace_end = cl_deadline(lp->grace); /* the signal thread has said so on stderr */
  /* Cancel every task: each unwinds through its <close> variables and pcall handlers. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
  lua_getiuservalue(L, -1, 1);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pop(L, 1);
    cl_loop_task_cancel(L, lua_touserdata(L, -1));
  }
  lua_pop(L, 1);
  /* In the host, callers running the loop themselves (the main chunk) unwind too. A script
   * under stock lua5.4 keeps its main chunk waiting while the loop finishes the shutdown. */
  if (cl_host_mode)
    for (int i = 0; i < lp->depth; i++)
      cl_loop_wait_finish(lp->blocking[i], CL_WAIT_CANCELLED, ECANCELED);
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

void cl_loop_check_shutdown(cl_loop *lp) {
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

/* The SIGHUP handlers (a table in the registry), each run as a task with the signal number. */
static char HUP_KEY;

static void run_hup_handlers(cl_loop *lp) {
  lua_State *L = lp->L;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &HUP_KEY) != LUA_TTABLE) {
    lua_pop(L, 1);
    return;
  }
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    lua_pushinteger(L, SIGHUP);
    cl_task_spawn(L, 1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static void on_hup(cl_watch *w, uint32_t events) {
  (void)events;
  cl_loop *lp = w->data;
  struct signalfd_siginfo si;
  while (read(lp->hfd, &si, sizeof si) == (ssize_t)sizeof si)
    if (!lp->stopping) run_hup_handlers(lp);
}

int cl_loop_on_hup(lua_State *L, cl_loop *lp, int fn) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &HUP_KEY) != LUA_TTABLE) {
    lua_pop(L, 1);
    /* the first handler: SIGHUP goes to a signalfd of its own */
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    int fd = signalfd(-1, &hup, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0) return -1;
    int e = cl_watch_start(lp, &lp->hwatch, fd, EPOLLIN, on_hup);
    if (e) {
      close(fd);
      errno = e;
      return -1;
    }
    lp->hwatch.data = lp;
    lp->hfd = fd;
    sigprocmask(SIG_BLOCK, &hup, NULL);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &HUP_KEY);
  }
  lua_pushvalue(L, fn);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_pop(L, 1);
  return 0;
}

/* The signal thread. The loop reads signals only between turns, so a process busy in C or in a
 * Lua loop that never waits would not notice one, and a second SIGINT sent to it would merge
 * with the first still pending. This thread takes each SIGINT/SIGTERM at once: it says so, hands
 * the first to the loop (which starts the orderly shutdown at its next turn) and exits the
 * process on the second, whatever the loop is doing. Everything else stays blocked in it. */
static void flush_if_free(FILE *f) {
  if (ftrylockfile(f) == 0) { /* a stream held elsewhere may be stuck: never wait for it */
    fflush_unlocked(f);
    funlockfile(f);
  }
}

static void *signal_main(void *arg) {
  cl_loop *lp = arg;
  sigset_t ss;
  sigemptyset(&ss);
  sigaddset(&ss, SIGINT);
  sigaddset(&ss, SIGTERM);
  sigaddset(&ss, SIGURG); /* the loop's wake-up when it goes (ignored by default: harmless) */
  for (;;) {
    int sig = sigwaitinfo(&ss, NULL);
    if (atomic_load(&lp->sigstop)) return NULL;
    if (sig < 0 || sig == SIGURG) continue; /* EINTR; or a stray SIGURG, which is ignored */
    char msg[128];
    if (atomic_fetch_add(&lp->nsignals, 1) > 0) {
      int n = snprintf(msg, sizeof msg, "clawlua: %s again, exiting now\n", cl_signal_name(sig));
      flush_if_free(stdout);
      if (write(STDERR_FILENO, msg, (size_t)n) < 0) { /* nothing more to do about it */
      }
      _exit(128 + sig);
    }
    int n = snprintf(msg, sizeof msg,
                     "clawlua: %s received, shutting down (send it again to exit at once)\n",
                     cl_signal_name(sig));
    if (write(STDERR_FILENO, msg, (size_t)n) < 0) { /* stderr gone: the shutdown goes on */
    }
    unsigned char b = (unsigned char)sig;
    while (write(lp->sigw, &b, 1) < 0 && errno == EINTR) {
    }
  }
}

int cl_loop_signal_thread_start(cl_loop *lp) {
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return errno;
  lp->sfd = p[0];
  lp->sigw = p[1];
  /* the thread starts with every signal blocked: it only takes what it waits for */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int e = pthread_create(&lp->sigthread, NULL, signal_main, lp);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (e) return e;
  lp->sigthread_on = 1;
  return 0;
}

int cl_loop_signal_thread_stop(cl_loop *lp) {
  if (lp->sigthread_on) {
    atomic_store(&lp->sigstop, 1);
    pthread_kill(lp->sigthread, SIGURG);
    pthread_join(lp->sigthread, NULL);
    lp->sigthread_on = 0;
  }
  unsigned char unseen = 0;
  if (lp->sfd >= 0 && !lp->stopping && read(lp->sfd, &unseen, 1) != 1) unseen = 0;
  return unseen;
}

void cl_loop_on_signal_pipe(cl_watch *w, uint32_t events) {
  (void)events;
  cl_loop *lp = w->data;
  unsigned char b[16];
  ssize_t n;
  while ((n = read(lp->sfd, b, sizeof b)) > 0)
    for (ssize_t i = 0; i < n; i++)
      if (!lp->stopping) start_shutdown(lp, b[i]);
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
