/*
 * The fsync worker of a JSONL file sink: a thread per sink, so the loop never waits for the
 * disk. "never" leaves syncing to the kernel, "interval" syncs every fsync_interval seconds
 * when something was written, "always" syncs as soon as anything is unsynced (group commit).
 * The worker tells the loop through an eventfd when durable records moved.
 */
#include "sink_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* fsync worker                                                                               */

static void wait_until(syncer *y, uint64_t until) {
  struct timespec ts;
  ts.tv_sec = (time_t)(until / 1000000000ull);
  ts.tv_nsec = (long)(until % 1000000000ull);
  pthread_cond_timedwait(&y->cv, &y->mu, &ts);
}

static void *sync_main(void *arg) {
  syncer *y = arg;
  pthread_mutex_lock(&y->mu);
  uint64_t due = 0; /* the earliest time the next sync for the policy may start */
  for (;;) {
    uint64_t written = atomic_load(&y->written), now = cl_now_ns();
    int unsynced = written > y->synced && y->policy != FS_NEVER;
    int want = y->requested > y->synced || (unsynced && now >= due);
    if (!want && !y->nclosing) {
      if (y->stop) break;
      if (unsynced) { /* not due yet: the loop need not wake us */
        wait_until(y, due);
        continue;
      }
      atomic_store(&y->idle, 1);
      /* Dekker with the loop's store of `written`: one of us sees the other. */
      if (atomic_load(&y->written) == written) pthread_cond_wait(&y->cv, &y->mu);
      atomic_store(&y->idle, 0);
      continue;
    }
    int closing[MAX_CLOSE], n = y->nclosing;
    memcpy(closing, y->closing, sizeof closing);
    y->nclosing = 0;
    int fd = y->fd, policy = y->policy;
    uint64_t target = written;
    pthread_mutex_unlock(&y->mu);

    int err = 0;
    uint64_t t0 = cl_now_ns();
    for (int i = 0; i < n; i++) {
      if ((policy != FS_NEVER || want) && fdatasync(closing[i]) < 0 && !err) err = errno;
      close(closing[i]);
    }
    if (want && fd >= 0 && fdatasync(fd) < 0 && !err) err = errno;
    uint64_t t1 = cl_now_ns();

    pthread_mutex_lock(&y->mu);
    if (want || n) {
      y->fsyncs++;
      y->total_sync_ns += t1 - t0;
      if (t1 - t0 > y->max_sync_ns) y->max_sync_ns = t1 - t0;
    }
    if (err) {
      y->sync_errors++;
      y->last_err = err;
    } else if (want && target > y->synced) {
      y->synced = target;
    }
    if (y->requested <= y->synced || err) y->requested = 0;
    /* always: the next sync may start ALWAYS_GAP after this one started, so that a busy log
     * is synced in groups instead of back to back (each fdatasync stalls the loop's writes on
     * the file system's journal); interval: fsync_interval after this one. */
    if (want) due = policy == FS_ALWAYS ? t0 + y->gap_ns : t1 + y->interval_ns;
    uint64_t one = 1;
    if (write(y->evfd, &one, sizeof one) < 0) { /* the counter is full: the loop is behind */
    }
  }
  int fd = y->fd;
  y->fd = -1;
  uint64_t target = atomic_load(&y->written);
  pthread_mutex_unlock(&y->mu);
  if (fd >= 0) {
    if (y->policy != FS_NEVER && target > y->synced) {
      if (fdatasync(fd) == 0) y->synced = target;
      y->fsyncs++;
    }
    close(fd);
  }
  return NULL;
}

void audit_on_synced(cl_watch *w, uint32_t events) {
  sink *s = w->data;
  uint64_t v;
  while (read(s->sy->evfd, &v, sizeof v) > 0) {
  }
  cl_waitq_wake_all(&s->sync_waiters, 0);
}

int audit_syncer_start(sink *s, int policy, double interval) {
  syncer *y = calloc(1, sizeof *y);
  if (!y) return ENOMEM;
  y->policy = policy;
  y->interval_ns = (uint64_t)(interval * 1e9);
  y->gap_ns = ALWAYS_GAP_NS;
  y->fd = -1;
  y->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (y->evfd < 0) {
    int err = errno;
    free(y);
    return err;
  }
  pthread_mutex_init(&y->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&y->cv, &ca);
  pthread_condattr_destroy(&ca);
  s->sy = y;
  return 0;
}

/* Hands the worker a dup of the sink's current file. */
int audit_syncer_set_fd(sink *s) {
  syncer *y = s->sy;
  int fd = s->fd >= 0 ? fcntl(s->fd, F_DUPFD_CLOEXEC, 3) : -1;
  if (s->fd >= 0 && fd < 0) return errno;
  pthread_mutex_lock(&y->mu);
  if (y->fd >= 0) {
    if (y->nclosing < MAX_CLOSE)
      y->closing[y->nclosing++] = y->fd;
    else
      close(y->fd); /* cannot happen: the worker drains the list on every wake-up */
  }
  y->fd = fd;
  pthread_cond_signal(&y->cv);
  pthread_mutex_unlock(&y->mu);
  if (!y->started) {
    /* Block every signal in the worker: the loop reads them through its signalfd. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&y->th, NULL, sync_main, y);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) return rc;
    y->started = 1;
  }
  return 0;
}

void audit_syncer_stop(sink *s) {
  syncer *y = s->sy;
  if (!y) return;
  s->sy = NULL;
  if (y->started) {
    pthread_mutex_lock(&y->mu);
    y->stop = 1;
    pthread_cond_signal(&y->cv);
    pthread_mutex_unlock(&y->mu);
    pthread_join(y->th, NULL); /* the last fdatasync, per policy: closing a log makes it durable */
  } else if (y->fd >= 0) {
    close(y->fd);
  }
  for (int i = 0; i < y->nclosing; i++) close(y->closing[i]);
  if (s->evwatch.loop) cl_watch_stop(&s->evwatch);
  close(y->evfd);
  pthread_mutex_destroy(&y->mu);
  pthread_cond_destroy(&y->cv);
  free(y);
}

void audit_syncer_wrote(syncer *y, uint64_t count) {
  atomic_store(&y->written, count);
  if (atomic_load(&y->idle) && y->policy != FS_NEVER) {
    pthread_mutex_lock(&y->mu);
    pthread_cond_signal(&y->cv);
    pthread_mutex_unlock(&y->mu);
  }
}
