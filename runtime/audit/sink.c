/*
 * Audit sinks: where events go besides the ring.
 *
 * JSON-lines files. Each record is written with ONE write(2) on an O_APPEND descriptor, at
 * emission, so it is in the page cache (and survives a crash of the process) before emit
 * returns; the loop never waits for anything slower than that write. A record is the ring's
 * bytes plus its chain fields (see chain.c) and a newline. A write cut short (disk full in the
 * middle of a record) is undone with ftruncate, so the file only ever holds whole lines, and a
 * crash in the middle of a write(2) leaves at most one unfinished last line, which readers skip
 * and which the next sink to open the file cuts off before appending.
 *
 * fsync runs on a worker thread per sink, never on the loop: "never" leaves it to the kernel,
 * "interval" syncs every fsync_interval seconds when something was written, "always" syncs as
 * soon as anything is unsynced (group commit: one fdatasync covers every record written while
 * the previous one ran). sink:sync() waits, yielding, until what was written is durable.
 *
 * Rotation by size: path -> path.1 -> ... -> path.<keep>; the new file begins with an
 * "audit.anchor" event whose chain link is the hash of the old file's last record.
 *
 * Failures never lose records silently: a record a sink cannot write is counted (sink stats,
 * audit.stats().sink_dropped), the first failure is reported as an "audit.sink.error" event,
 * and the first write that succeeds again is followed by an "audit.sink.dropped" event that
 * names the count and the seq range lost.
 *
 * The stderr sink pretty-prints one line per event. stderr is shared with the rest of the
 * process, so its flags are left alone: a line is written only when poll() says the fd takes
 * it, otherwise it waits in a bounded buffer drained when the fd becomes writable; what does not
 * fit is counted and reported.
 */
#include "audit_int.h"

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

#define SINK_MT           "clawlua.audit_sink"
#define DEFAULT_MAX_BYTES ((lua_Integer)64 << 20)
#define MIN_MAX_BYTES     4096
#define DEFAULT_KEEP      5
#define MAX_KEEP          1000
#define STDERR_BUF        (64 * 1024)
#define STDERR_LINE       1024
#define MAX_CLOSE         16
#define RETRY_NS          1000000000ull /* reopen / rotation retries: at most once a second */
#define ERROR_REPORT_NS   (10ull * 1000000000ull)
#ifndef ALWAYS_GAP_NS
#define ALWAYS_GAP_NS 2000000ull /* 2 ms: see sync_main */
#endif

enum { T_FILE, T_STDERR };
enum { FS_NEVER, FS_INTERVAL, FS_ALWAYS };
static const char *const fsync_names[] = {"never", "interval", "always", NULL};

/* The fsync worker. The loop only stores `written` and, when the worker sleeps waiting for
 * work, signals it; everything else is under mu. */
typedef struct syncer {
  pthread_t th;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int started;
  int policy;
  uint64_t interval_ns;
  uint64_t gap_ns;          /* always: the least time between the starts of two syncs */
  _Atomic uint64_t written; /* records the loop has written (a count: seqs may repeat) */
  _Atomic int idle;         /* the worker waits on cv */
  uint64_t synced;          /* of which known durable */
  uint64_t requested;       /* sink:sync() wants at least this */
  int fd;                   /* the worker's own dup of the current file */
  int closing[MAX_CLOSE];   /* files rotated away: sync (per policy) and close */
  int nclosing;
  int stop;
  int evfd; /* worker -> loop: synced moved */
  uint64_t fsyncs, sync_errors;
  int last_err;
  uint64_t max_sync_ns, total_sync_ns;
} syncer;

typedef struct sink {
  asink base;
  int type;
  int closed;
  int policy;
  audit *a;
  /* file */
  char *path;
  int fd;
  off_t size;
  lua_Integer max_bytes;
  int keep, mode;
  char head[AUDIT_HEX]; /* hash of the last record in the file */
  uint64_t file_records, last_seq;
  char *line;
  size_t linecap;
  char *pend; /* the anchor of a new file, not written yet: it must come first */
  size_t pendlen, pendcap;
  char pend_hash[AUDIT_HEX];
  uint64_t pend_seq;
  uint64_t anchor_seq; /* the anchor being emitted */
  int need_rotate, want_reopen, need_newline;
  uint64_t next_retry;
  const char *anchor_reason;
  uint64_t anchor_prev_seq;
  lua_Integer cut_bytes;
  /* failures */
  int failing, fail_err, report_error, report_recovered;
  const char *fail_op;
  int last_err;               /* the last error seen, for stats */
  uint64_t last_error_report; /* when an audit.sink.error was last emitted (mono ns) */
  uint64_t dropped, dropped_since, drop_first, drop_last;
  uint64_t written, bytes, rotations, write_errors;
  syncer *sy;
  cl_watch evwatch;
  cl_waitq sync_waiters;
  /* stderr */
  int efd;
  int color;
  int watching;
  cl_watch owatch;
  char *obuf;
  size_t olen;
  uint64_t lost_lines;
} sink;

static void sink_release(sink *s);

/* ------------------------------------------------------------------------------------------ */
/* fsync worker                                                                               */

static uint64_t mono_ns(void) {
  return cl_now_ns();
}

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
    uint64_t written = atomic_load(&y->written), now = mono_ns();
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
    uint64_t t0 = mono_ns();
    for (int i = 0; i < n; i++) {
      if ((policy != FS_NEVER || want) && fdatasync(closing[i]) < 0 && !err) err = errno;
      close(closing[i]);
    }
    if (want && fd >= 0 && fdatasync(fd) < 0 && !err) err = errno;
    uint64_t t1 = mono_ns();

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

static void on_synced(cl_watch *w, uint32_t events) {
  sink *s = w->data;
  uint64_t v;
  while (read(s->sy->evfd, &v, sizeof v) > 0) {
  }
  cl_waitq_wake_all(&s->sync_waiters, 0);
}

static int syncer_start(sink *s, int policy, double interval) {
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
static int syncer_set_fd(sink *s) {
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

static void syncer_stop(sink *s) {
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

static void syncer_wrote(syncer *y, uint64_t count) {
  atomic_store(&y->written, count);
  if (atomic_load(&y->idle) && y->policy != FS_NEVER) {
    pthread_mutex_lock(&y->mu);
    pthread_cond_signal(&y->cv);
    pthread_mutex_unlock(&y->mu);
  }
}

/* ------------------------------------------------------------------------------------------ */
/* JSONL files                                                                                */

static void mark_failing(sink *s, uint64_t seq, int err, const char *op) {
  s->last_err = err;
  if (!s->failing) {
    s->failing = 1;
    s->fail_err = err;
    s->fail_op = op;
    s->report_error = 1;
    s->base.has_pending = 1;
  }
}

static void count_drop(audit *a, sink *s, uint64_t seq, int err, const char *op) {
  mark_failing(s, seq, err, op);
  s->dropped++;
  s->dropped_since++;
  a->sink_dropped++;
  if (s->dropped_since == 1) s->drop_first = seq;
  s->drop_last = seq;
}

/* Writes one whole line or nothing: a short write is undone. 0 or an errno. */
static int write_line(sink *s, const char *p, size_t n) {
  if (s->need_newline) { /* an earlier failed write left bytes we could not cut */
    if (write(s->fd, "\n", 1) != 1) return errno ? errno : EIO;
    s->need_newline = 0;
    s->size++;
  }
  size_t done = 0;
  int err = 0;
  while (done < n) {
    ssize_t w = write(s->fd, p + done, n - done);
    if (w > 0) {
      done += (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    err = w < 0 ? errno : EIO;
    break;
  }
  if (!err) {
    s->size += (off_t)n;
    return 0;
  }
  if (done > 0 && ftruncate(s->fd, s->size) < 0) s->need_newline = 1;
  s->write_errors++;
  return err;
}

/* Frames ring record rec (len bytes) with the chain fields after prev into s->line. */
static size_t frame(sink *s, const char *prev, const char *rec, size_t len, char *hash) {
  size_t n = len - 1 + AUDIT_CHAIN_SUFFIX + 1;
  if (n > s->linecap) {
    char *nl = realloc(s->line, n);
    if (!nl) return 0;
    s->line = nl;
    s->linecap = n;
  }
  if (!audit_chain_hash(prev, rec, len, NULL, 0, hash)) return 0;
  /* rec minus its "}", then ,"prev":"<prev>","hash":"<hash>"}\n */
  static const char k_prev[9] = {',', '"', 'p', 'r', 'e', 'v', '"', ':', '"'};
  static const char k_hash[10] = {'"', ',', '"', 'h', 'a', 's', 'h', '"', ':', '"'};
  static const char k_end[3] = {'"', '}', '\n'};
  char *o = s->line;
  memcpy(o, rec, len - 1);
  o += len - 1;
  memcpy(o, k_prev, sizeof k_prev);
  memcpy(o + 9, prev, AUDIT_HEX);
  memcpy(o + 9 + AUDIT_HEX, k_hash, sizeof k_hash);
  memcpy(o + 19 + AUDIT_HEX, hash, AUDIT_HEX);
  memcpy(o + 19 + 2 * AUDIT_HEX, k_end, sizeof k_end);
  return n;
}

static int file_write(audit *a, asink *base, const slot *e) {
  sink *s = (sink *)base;
  if (s->fd < 0) {
    count_drop(a, s, e->seq, s->fail_err ? s->fail_err : EBADF, "open");
    s->want_reopen = 1;
    s->base.has_pending = 1;
    return 0;
  }
  if (s->pendlen) { /* the file's anchor first */
    int err = write_line(s, s->pend, s->pendlen);
    if (err) {
      if (e->seq != s->pend_seq) count_drop(a, s, e->seq, err, "write");
      return 0;
    }
    memcpy(s->head, s->pend_hash, AUDIT_HEX);
    s->file_records++;
    s->written++;
    s->bytes += s->pendlen;
    s->last_seq = s->pend_seq;
    s->pendlen = 0;
    if (s->sy) syncer_wrote(s->sy, s->written);
    if (s->failing) {
      s->failing = 0;
      s->report_recovered = 1;
      s->base.has_pending = 1;
    }
    if (e->seq == s->pend_seq) return 1;
  }
  char hash[AUDIT_HEX];
  size_t n = frame(s, s->head, e->rec, e->len, hash);
  if (!n) {
    count_drop(a, s, e->seq, ENOMEM, "write");
    return 0;
  }
  int err = write_line(s, s->line, n);
  if (err) {
    if (e->seq == s->anchor_seq) { /* a new file's anchor: keep it, it must come first */
      if (n > s->pendcap) {
        char *np = realloc(s->pend, n);
        if (!np) {
          count_drop(a, s, e->seq, err, "write");
          return 0;
        }
        s->pend = np;
        s->pendcap = n;
      }
      memcpy(s->pend, s->line, n);
      memcpy(s->pend_hash, hash, AUDIT_HEX);
      s->pendlen = n;
      s->pend_seq = e->seq;
      mark_failing(s, e->seq, err, "write"); /* not lost: written before the next record */
      return 0;
    }
    count_drop(a, s, e->seq, err, "write");
    return 0;
  }
  memcpy(s->head, hash, AUDIT_HEX);
  s->file_records++;
  s->written++;
  s->bytes += n;
  s->last_seq = e->seq;
  if (s->failing) {
    s->failing = 0;
    s->report_recovered = 1;
    s->base.has_pending = 1;
  }
  if (s->sy) syncer_wrote(s->sy, s->written);
  if (s->max_bytes > 0 && s->size >= s->max_bytes && s->file_records >= 2) {
    s->need_rotate = 1;
    s->base.has_pending = 1;
  }
  return 1;
}

/* Finds the last whole line of the first `size` bytes of fd. Returns 0 with *found = 1 and
 * hash/seq set when it is a chained record (*found = 0: no whole line), *cut = the bytes after
 * it; or an errno with *msg. */
static int last_record_in(int fd, off_t size, off_t span, char *hash, uint64_t *seq, int *found,
                          off_t *cut, const char **msg, int *more) {
  *more = 0;
  size_t want = (size_t)(size < span ? size : span);
  char *buf = malloc(want);
  if (!buf) return ENOMEM;
  ssize_t got = pread(fd, buf, want, size - (off_t)want);
  if (got != (ssize_t)want) {
    int err = got < 0 ? errno : EIO;
    free(buf);
    return err;
  }
  size_t end = want; /* one past the last newline */
  while (end > 0 && buf[end - 1] != '\n') end--;
  size_t ls = end > 0 ? end - 1 : 0;
  while (ls > 0 && buf[ls - 1] != '\n') ls--;
  if ((end == 0 || ls == 0) && (off_t)want < size) { /* the line may begin before the window */
    free(buf);
    *more = 1;
    return 0;
  }
  *cut = (off_t)(want - end);
  if (end > 0) {
    recview v;
    if (!audit_scan(buf + ls, end - 1 - ls, &v) || !v.prev) {
      free(buf);
      *msg = "not an audit log (its last line is not a chained audit record)";
      return EINVAL;
    }
    memcpy(hash, v.hash, AUDIT_HEX);
    *seq = v.seq;
    *found = 1;
  }
  free(buf);
  return 0;
}

/* Finds the last whole line of the first `size` bytes of fd. Returns 0 with *found = 1 and
 * hash/seq set when it is a chained record (*found = 0: no whole line), *cut = the bytes after
 * it; or an errno with *msg. Reads 64 KiB from the end, more only for long lines. */
static int last_record(int fd, off_t size, char *hash, uint64_t *seq, int *found, off_t *cut,
                       const char **msg) {
  *found = 0;
  *cut = 0;
  if (size <= 0) return 0;
  int more;
  int err = last_record_in(fd, size, 65536, hash, seq, found, cut, msg, &more);
  if (err || !more) return err;
  /* Enough for a torn last line and the whole line before it, each at most a record long. */
  err =
      last_record_in(fd, size, 2 * (off_t)(AUDIT_MAX_LINE + 1), hash, seq, found, cut, msg, &more);
  if (!err && more) {
    *msg = "its last line is longer than any audit record";
    return EINVAL;
  }
  return err;
}

/* Opens (or creates) the log file and finds where its chain stands: at its last record, or at
 * the last record of path.1 when the file is new (the process died between renaming the old
 * file and writing the new one's anchor), or at genesis. 0 or an errno; *msg says why a file
 * cannot be continued. */
static int open_file(sink *s, int find_prev, const char **msg) {
  *msg = NULL;
  int fd = open(s->path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, (mode_t)s->mode);
  if (fd < 0) return errno;
  struct stat st;
  if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    int err = S_ISREG(st.st_mode) ? errno : EINVAL;
    if (!S_ISREG(st.st_mode)) *msg = "not a regular file";
    close(fd);
    return err;
  }
  if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
    int err = errno;
    if (err == EWOULDBLOCK) *msg = "another process is writing this audit log";
    close(fd);
    return err;
  }
  memcpy(s->head, audit_genesis, AUDIT_HEX);
  s->anchor_prev_seq = 0;
  s->cut_bytes = 0;
  s->anchor_reason = "open";
  off_t size = st.st_size, cut = 0;
  uint64_t seq = 0;
  int found = 0;
  int err = last_record(fd, size, s->head, &seq, &found, &cut, msg);
  if (err) {
    close(fd);
    return err;
  }
  if (found) {
    s->anchor_reason = "reopen";
  } else if (s->keep > 0 && find_prev) {
    char prev[PATH_MAX];
    snprintf(prev, sizeof prev, "%s.1", s->path);
    int pfd = open(prev, O_RDONLY | O_CLOEXEC);
    struct stat pst;
    if (pfd >= 0 && fstat(pfd, &pst) == 0) {
      off_t pcut;
      const char *pmsg;
      if (last_record(pfd, pst.st_size, s->head, &seq, &found, &pcut, &pmsg) != 0) found = 0;
    }
    if (pfd >= 0) close(pfd);
    if (!found) memcpy(s->head, audit_genesis, AUDIT_HEX);
  }
  if (found) {
    s->anchor_prev_seq = seq;
    audit_bump_seq(s->a, seq);
  }
  if (cut > 0) { /* a torn last record (a crash mid-write): whole lines only */
    if (ftruncate(fd, size - cut) < 0) {
      err = errno;
      close(fd);
      return err;
    }
    size -= cut;
    s->cut_bytes = (lua_Integer)cut;
  }
  s->fd = fd;
  s->size = size;
  s->file_records = 0;
  s->need_newline = 0;
  return 0;
}

/* Emits the anchor that begins a file (or marks where writing resumed in it). */
static void emit_anchor(lua_State *L, audit *a, sink *s) {
  int top = lua_gettop(L);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, s->path);
  lua_setfield(L, -2, "sink");
  lua_pushstring(L, s->anchor_reason);
  lua_setfield(L, -2, "reason");
  if (s->anchor_prev_seq) {
    lua_pushinteger(L, (lua_Integer)s->anchor_prev_seq);
    lua_setfield(L, -2, "prev_seq");
  }
  if (s->cut_bytes) {
    lua_pushinteger(L, s->cut_bytes);
    lua_setfield(L, -2, "cut_torn_bytes");
  }
  lua_pushinteger(L, 1);
  lua_setfield(L, -2, "version");
  s->base.force_seq = s->anchor_seq = a->seq + 1;
  audit_emit(L, a, "audit.anchor", NULL, 0, lua_gettop(L), NULL);
  s->base.force_seq = s->anchor_seq = 0;
  lua_settop(L, top);
}

/* Emits a report about this sink (audit.sink.error, audit.sink.dropped). The sink writes it
 * whatever its filter, so its file explains its own gaps. Returns 1 when the sink wrote it. */
static int emit_report(lua_State *L, audit *a, sink *s, const char *kind, int err, const char *op,
                       uint64_t dropped, uint64_t first, uint64_t last) {
  int top = lua_gettop(L);
  lua_createtable(L, 0, 7);
  lua_pushstring(L, s->path ? s->path : "stderr");
  lua_setfield(L, -2, "sink");
  if (err) {
    lua_pushstring(L, strerror(err));
    lua_setfield(L, -2, "error");
    lua_pushinteger(L, err);
    lua_setfield(L, -2, "errno");
  }
  if (op) {
    lua_pushstring(L, op);
    lua_setfield(L, -2, "op");
  }
  if (dropped) {
    lua_pushinteger(L, (lua_Integer)dropped);
    lua_setfield(L, -2, "dropped");
    lua_pushinteger(L, (lua_Integer)first);
    lua_setfield(L, -2, "first_seq");
    lua_pushinteger(L, (lua_Integer)last);
    lua_setfield(L, -2, "last_seq");
  }
  uint64_t seq = a->seq + 1;
  s->base.force_seq = seq;
  audit_emit(L, a, kind, NULL, 0, lua_gettop(L), NULL);
  s->base.force_seq = 0;
  lua_settop(L, top);
  return s->last_seq == seq;
}

static void rotate(lua_State *L, audit *a, sink *s, const char *reason) {
  int err = 0;
  char from[PATH_MAX], to[PATH_MAX];
  if (s->keep == 0) {
    if (unlink(s->path) < 0 && errno != ENOENT) err = errno;
  } else {
    /* Shift only the files that exist: path.1 .. path.<top>, the last one falls off at keep. */
    int top = 0;
    struct stat st;
    while (top < s->keep) {
      snprintf(from, sizeof from, "%s.%d", s->path, top + 1);
      if (stat(from, &st) < 0) break;
      top++;
    }
    if (top == s->keep) top--; /* path.<keep> is replaced by path.<keep - 1> */
    for (int i = top; i >= 1 && !err; i--) {
      snprintf(from, sizeof from, "%s.%d", s->path, i);
      snprintf(to, sizeof to, "%s.%d", s->path, i + 1);
      if (rename(from, to) < 0 && errno != ENOENT) err = errno;
    }
    snprintf(to, sizeof to, "%s.1", s->path);
    if (!err && rename(s->path, to) < 0) err = errno;
  }
  if (err) {
    s->next_retry = cl_now_ns() + RETRY_NS;
    s->last_err = err;
    if (cl_now_ns() - s->last_error_report >= ERROR_REPORT_NS || !s->last_error_report) {
      s->last_error_report = cl_now_ns();
      emit_report(L, a, s, "audit.sink.error", err, "rotate", 0, 0, 0);
    }
    return;
  }
  int old = s->fd;
  s->fd = -1;
  uint64_t prev_seq = s->last_seq;
  char prev_head[AUDIT_HEX];
  memcpy(prev_head, s->head, AUDIT_HEX);
  const char *msg;
  err = open_file(s, 0, &msg);
  if (s->sy) {
    /* The worker syncs the old file (per policy) and closes its own copy. */
    syncer_set_fd(s);
  }
  close(old);
  s->rotations++;
  if (err) {
    s->fd = -1;
    s->want_reopen = 1;
    s->next_retry = cl_now_ns() + RETRY_NS;
    s->fail_err = err;
    return;
  }
  /* A fresh file continues the chain of the one it replaces (keep = 0 leaves no path.1). */
  memcpy(s->head, prev_head, AUDIT_HEX);
  s->anchor_reason = reason;
  s->anchor_prev_seq = prev_seq;
  emit_anchor(L, a, s);
}

static void file_pending(lua_State *L, audit *a, asink *base) {
  sink *s = (sink *)base;
  if (s->report_error) {
    /* Once, and again only after a quiet spell: a disk that is nearly full takes small records
     * and refuses large ones, and every refusal is counted in the next drop report anyway. */
    s->report_error = 0;
    uint64_t now = cl_now_ns();
    if (!s->last_error_report || now - s->last_error_report >= ERROR_REPORT_NS) {
      s->last_error_report = now;
      emit_report(L, a, s, "audit.sink.error", s->fail_err, s->fail_op, 0, 0, 0);
    }
  }
  if (s->report_recovered && !s->failing) {
    s->report_recovered = 0;
    uint64_t n = s->dropped_since, first = s->drop_first, last = s->drop_last;
    int err = s->fail_err;
    const char *op = s->fail_op;
    s->fail_err = 0;
    s->fail_op = NULL;
    if (n) {
      /* Counted as reported once the report is in the file; if it could not be written the
       * count carries on into the next report. */
      if (emit_report(L, a, s, "audit.sink.dropped", err, op, n, first, last))
        s->dropped_since -= n;
    }
  }
  if (s->need_rotate && cl_now_ns() >= s->next_retry) {
    s->need_rotate = 0;
    rotate(L, a, s, "rotate");
  }
  if (s->want_reopen && s->fd < 0 && cl_now_ns() >= s->next_retry) {
    s->want_reopen = 0;
    char head[AUDIT_HEX];
    memcpy(head, s->head, AUDIT_HEX);
    uint64_t prev_seq = s->last_seq;
    const char *msg;
    int err = open_file(s, 0, &msg);
    if (err) {
      s->fd = -1;
      s->next_retry = cl_now_ns() + RETRY_NS;
      return;
    }
    if (s->anchor_reason[0] == 'o') { /* it was gone: a new file continues our chain */
      memcpy(s->head, head, AUDIT_HEX);
      s->anchor_prev_seq = prev_seq;
      s->anchor_reason = "reopen";
    }
    if (s->sy) syncer_set_fd(s);
    emit_anchor(L, a, s);
  }
}

/* ------------------------------------------------------------------------------------------ */
/* stderr                                                                                     */

static void stderr_flush(sink *s);

static void on_stderr_writable(cl_watch *w, uint32_t events) {
  stderr_flush(w->data);
}

static void stderr_watch(sink *s, int on) {
  if (on == s->watching) return;
  if (on) {
    if (cl_watch_start(s->owatch.loop, &s->owatch, s->efd, EPOLLOUT, on_stderr_writable) != 0)
      return; /* not pollable (a regular file): it never blocks for long, writes go through */
    s->owatch.data = s;
  } else {
    cl_watch_stop(&s->owatch);
  }
  s->watching = on;
}

static int fd_writable(int fd) {
  struct pollfd p = {fd, POLLOUT, 0};
  int r = poll(&p, 1, 0);
  return r > 0 && (p.revents & (POLLOUT | POLLERR | POLLHUP));
}

static void stderr_flush(sink *s) {
  while (s->olen > 0 && fd_writable(s->efd)) {
    size_t n = s->olen > PIPE_BUF ? PIPE_BUF : s->olen;
    ssize_t w = write(s->efd, s->obuf, n);
    if (w <= 0) {
      if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      s->olen = 0; /* stderr is gone: nothing to keep it for */
      break;
    }
    memmove(s->obuf, s->obuf + w, s->olen - (size_t)w);
    s->olen -= (size_t)w;
  }
  if (s->olen == 0 && s->lost_lines && s->obuf) {
    char note[96];
    int n = snprintf(note, sizeof note, "clawlua audit: %llu line(s) not shown (stderr was full)\n",
                     (unsigned long long)s->lost_lines);
    memcpy(s->obuf, note, (size_t)n);
    s->olen = (size_t)n;
    s->lost_lines = 0;
    if (fd_writable(s->efd)) {
      stderr_flush(s);
      return;
    }
  }
  stderr_watch(s, s->olen > 0);
}

static int stderr_write(audit *a, asink *base, const slot *e) {
  sink *s = (sink *)base;
  char line[STDERR_LINE + 8];
  recview v;
  if (!audit_scan(e->rec, e->len, &v)) return 0;
  size_t n = audit_format(&v, s->color, line, STDERR_LINE);
  line[n++] = '\n';
  if (s->olen == 0 && fd_writable(s->efd)) {
    ssize_t w = write(s->efd, line, n);
    if (w == (ssize_t)n) {
      s->written++;
      s->bytes += n;
      return 1;
    }
    if (w < 0) w = 0;
    memmove(line, line + w, n - (size_t)w);
    n -= (size_t)w;
  }
  if (!s->obuf) s->obuf = malloc(STDERR_BUF);
  if (!s->obuf || s->olen + n > STDERR_BUF) {
    s->lost_lines++;
    s->dropped++;
    a->sink_dropped++;
    return 0;
  }
  memcpy(s->obuf + s->olen, line, n);
  s->olen += n;
  s->written++;
  s->bytes += n;
  stderr_watch(s, 1);
  return 1;
}

static void stderr_pending(lua_State *L, audit *a, asink *base) {}

/* ------------------------------------------------------------------------------------------ */
/* Lua API                                                                                    */

static sink *check_sink(lua_State *L) {
  sink *s = luaL_checkudata(L, 1, SINK_MT);
  if (s->closed) luaL_error(L, "attempt to use a closed audit_sink");
  return s;
}

static void sink_release(sink *s) {
  if (s->closed) return;
  s->closed = 1;
  s->base.active = 0;
  if (s->a) audit_remove_sink(s->a, &s->base);
  if (s->type == T_FILE) {
    syncer_stop(s);
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    cl_waitq_wake_all(&s->sync_waiters, ECANCELED);
  } else {
    if (s->olen > 0) stderr_flush(s);
    stderr_watch(s, 0);
    if (s->efd >= 0) close(s->efd);
    s->efd = -1;
  }
  free(s->path);
  free(s->line);
  free(s->pend);
  free(s->obuf);
  s->path = s->line = s->pend = s->obuf = NULL;
}

void audit_sinks_close_all(audit *a) {
  while (a->sinks) sink_release((sink *)a->sinks);
}

/* Drops the anchor that kept an open sink from being collected. */
static void unanchor(lua_State *L, int idx) {
  audit *a = audit_get(L);
  if (!a) return;
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, a); /* see anchor() */
  if (lua_istable(L, -1)) {
    lua_pushvalue(L, idx);
    lua_pushnil(L);
    lua_rawset(L, -3);
  }
  lua_pop(L, 1);
}

static void anchor(lua_State *L, audit *a, int idx) {
  idx = lua_absindex(L, idx);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, a) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, a);
  }
  lua_pushvalue(L, idx);
  lua_pushboolean(L, 1);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

static int sink_gc(lua_State *L) {
  sink_release(luaL_checkudata(L, 1, SINK_MT));
  return 0;
}

static int sink_close(lua_State *L) {
  sink *s = luaL_checkudata(L, 1, SINK_MT);
  sink_release(s);
  unanchor(L, 1);
  lua_pushboolean(L, 1);
  return 1;
}

static void setint(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

/* Lua: sink:stats() */
static int sink_stats(lua_State *L) {
  sink *s = luaL_checkudata(L, 1, SINK_MT);
  lua_createtable(L, 0, 20);
  lua_pushstring(L, s->type == T_FILE ? "jsonl" : "stderr");
  lua_setfield(L, -2, "type");
  lua_pushboolean(L, !s->closed);
  lua_setfield(L, -2, "open");
  setint(L, "written", s->written);
  setint(L, "bytes", s->bytes);
  setint(L, "dropped", s->dropped);
  if (s->type == T_FILE) {
    if (s->path) {
      lua_pushstring(L, s->path);
      lua_setfield(L, -2, "path");
    }
    lua_pushstring(L, fsync_names[s->policy]);
    lua_setfield(L, -2, "fsync");
    setint(L, "size", (uint64_t)s->size);
    setint(L, "rotations", s->rotations);
    setint(L, "write_errors", s->write_errors);
    setint(L, "last_seq", s->last_seq);
    lua_pushlstring(L, s->head, AUDIT_HEX);
    lua_setfield(L, -2, "head");
    lua_pushboolean(L, s->failing || s->fd < 0);
    lua_setfield(L, -2, "failing");
    if (s->last_err) {
      lua_pushstring(L, strerror(s->last_err));
      lua_setfield(L, -2, "error");
    }
    if (s->sy) {
      syncer *y = s->sy;
      pthread_mutex_lock(&y->mu);
      setint(L, "fsyncs", y->fsyncs);
      setint(L, "synced", y->synced);
      setint(L, "unsynced", s->written - y->synced);
      setint(L, "sync_errors", y->sync_errors);
      lua_pushnumber(L, (double)y->max_sync_ns / 1e9);
      lua_setfield(L, -2, "max_sync_seconds");
      lua_pushnumber(L, y->fsyncs ? (double)y->total_sync_ns / 1e9 / (double)y->fsyncs : 0);
      lua_setfield(L, -2, "mean_sync_seconds");
      pthread_mutex_unlock(&y->mu);
    }
  } else {
    setint(L, "buffered", s->olen);
  }
  return 1;
}

static int sync_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  sink *s = luaL_checkudata(L, 1, SINK_MT);
  if (s->closed || !s->sy) {
    lua_pushboolean(L, 1); /* closing synced it */
    return 1;
  }
  syncer *y = s->sy;
  uint64_t target = (uint64_t)w->aux[0];
  pthread_mutex_lock(&y->mu);
  uint64_t synced = y->synced;
  int err = y->last_err;
  uint64_t errors = y->sync_errors;
  pthread_mutex_unlock(&y->mu);
  if (synced >= target) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (errors > (uint64_t)w->aux[1]) return cl_failf(L, err, "audit sink sync: %s", strerror(err));
  if (w->state == CL_WAIT_TIMEOUT) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  w->external = 1;
  cl_waitq_add(&s->sync_waiters, w);
  return cl_wait_suspend(L, w, sync_k, ctx);
}

/* Lua: sink:sync([timeout]) -> true once every record written so far is on disk */
static int sink_sync(lua_State *L) {
  sink *s = check_sink(L);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 2);
  if (s->type != T_FILE || !s->sy) {
    lua_pushboolean(L, 1);
    return 1;
  }
  syncer *y = s->sy;
  uint64_t target = atomic_load(&y->written);
  pthread_mutex_lock(&y->mu);
  uint64_t errors = y->sync_errors;
  int done = y->synced >= target;
  if (!done && y->requested < target) {
    y->requested = target;
    pthread_cond_signal(&y->cv);
  }
  pthread_mutex_unlock(&y->mu);
  if (done) {
    lua_pushboolean(L, 1);
    return 1;
  }
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  w->aux[0] = (intptr_t)target;
  w->aux[1] = (intptr_t)errors;
  w->external = 1;
  cl_waitq_add(&s->sync_waiters, w);
  return cl_wait_suspend(L, w, sync_k, lua_gettop(L));
}

/* Lua: sink:rotate() starts a new file now. */
static int sink_rotate(lua_State *L) {
  sink *s = check_sink(L);
  if (s->type != T_FILE) return luaL_error(L, "rotate: not a file sink");
  audit *a = s->a;
  if (s->fd < 0) return cl_failf(L, s->fail_err, "audit sink %s: not open", s->path);
  uint64_t rot = s->rotations;
  rotate(L, a, s, "rotate");
  if (s->rotations == rot) return cl_failf(L, s->fail_err, "audit sink rotate %s: failed", s->path);
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: audit.sink{path=, max_bytes=, keep=, fsync=, fsync_interval=, mode=, filter=} or
 * audit.sink{type="stderr", color=, filter=} -> sink | nil, err, errno */
int audit_sink_open(lua_State *L) {
  static const char *const fields[] = {"type",           "path", "max_bytes", "keep",  "fsync",
                                       "fsync_interval", "mode", "filter",    "color", NULL};
  static const char *const sink_filter[] = {"kind", "sandbox", "vm", "pid", NULL};
  static const char *const types[] = {"jsonl", "stderr", NULL};
  audit *a = audit_get(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  cl_check_fields(L, 1, fields);
  const char *type = cl_opt_string(L, 1, "type", "jsonl");
  int t = -1;
  for (int i = 0; types[i]; i++)
    if (strcmp(type, types[i]) == 0) t = i;
  if (t < 0) cl_field_error(L, "type", "\"jsonl\" or \"stderr\" expected");
  const char *path = cl_opt_string(L, 1, "path", NULL);
  lua_Integer max_bytes = cl_opt_integer(L, 1, "max_bytes", DEFAULT_MAX_BYTES);
  lua_Integer keep = cl_opt_integer(L, 1, "keep", DEFAULT_KEEP);
  lua_Integer mode = cl_opt_integer(L, 1, "mode", 0600);
  const char *fs = cl_opt_string(L, 1, "fsync", "interval");
  double interval = cl_opt_number(L, 1, "fsync_interval", 1.0);
  int policy = -1;
  for (int i = 0; fsync_names[i]; i++)
    if (strcmp(fs, fsync_names[i]) == 0) policy = i;
  if (t == T_FILE) {
    if (!path || !*path) cl_field_error(L, "path", "a file path expected");
    if (max_bytes != 0 && (max_bytes < MIN_MAX_BYTES || max_bytes > ((lua_Integer)1 << 50)))
      cl_field_error(L, "max_bytes", "0 (no rotation) or 4096.. bytes expected");
    if (keep < 0 || keep > MAX_KEEP) cl_field_error(L, "keep", "must be 0..1000");
    if (mode < 0 || mode > 0777) cl_field_error(L, "mode", "permission bits 0..0777 expected");
    if (policy < 0) cl_field_error(L, "fsync", "\"never\", \"interval\" or \"always\" expected");
    if (!(interval > 0 && interval <= 3600))
      cl_field_error(L, "fsync_interval", "seconds in (0, 3600] expected");
  } else if (path) {
    cl_field_error(L, "path", "a stderr sink has no path");
  }
  lua_getfield(L, 1, "filter"); /* 2 */
  if (!lua_isnil(L, 2) && !lua_istable(L, 2)) cl_field_error(L, "filter", "table expected");

  sink *s = lua_newuserdatauv(L, sizeof *s, 1); /* 3 */
  memset(s, 0, sizeof *s);
  s->closed = 1;
  s->fd = -1;
  s->efd = -1;
  luaL_setmetatable(L, SINK_MT);
  lua_newtable(L); /* a private copy of the filter: the strings it points to live here */
  if (lua_istable(L, 2)) {
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
  }
  audit_read_filter(L, -1, &s->base.filter, sink_filter);
  lua_setiuservalue(L, 3, 1);
  s->a = a;
  s->type = t;
  if (t == T_STDERR) {
    s->efd = fcntl(2, F_DUPFD_CLOEXEC, 3);
    if (s->efd < 0) return cl_fail(L, "audit.sink stderr", errno);
    lua_getfield(L, 1, "color");
    s->color = lua_isnil(L, -1) ? isatty(2) : lua_toboolean(L, -1);
    lua_pop(L, 1);
    s->owatch.loop = cl_loop_get(L);
    s->closed = 0;
    s->base.write = stderr_write;
    s->base.pending = stderr_pending;
  } else {
    s->path = strdup(path);
    if (!s->path) return cl_fail(L, "audit.sink", ENOMEM);
    s->max_bytes = max_bytes;
    s->policy = policy;
    s->keep = (int)keep;
    s->mode = (int)mode;
    const char *msg;
    int err = open_file(s, 1, &msg);
    if (err) {
      free(s->path);
      s->path = NULL;
      if (msg) return cl_failf(L, err, "audit.sink %s: %s", path, msg);
      return cl_failf(L, err, "audit.sink %s: %s", path, strerror(err));
    }
    s->closed = 0;
    err = syncer_start(s, policy, interval);
    if (!err) err = syncer_set_fd(s);
    if (err) {
      sink_release(s);
      return cl_failf(L, err, "audit.sink %s: fsync worker: %s", path, strerror(err));
    }
    if (cl_watch_start(cl_loop_get(L), &s->evwatch, s->sy->evfd, EPOLLIN, on_synced) != 0) {
      err = errno;
      sink_release(s);
      return cl_failf(L, err, "audit.sink %s: %s", path, strerror(err));
    }
    s->evwatch.data = s;
    s->base.write = file_write;
    s->base.pending = file_pending;
  }
  s->base.active = 1;
  audit_add_sink(a, &s->base);
  anchor(L, a, 3);
  if (t == T_FILE) emit_anchor(L, a, s);
  lua_settop(L, 3);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Benchmark hooks (tests/bench/audit.lua)                                                    */

static int cmp_u64(const void *pa, const void *pb) {
  uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
  return a < b ? -1 : a > b;
}

static void push_timing(lua_State *L, uint64_t *t, size_t n, uint64_t total, uint64_t bytes) {
  qsort(t, n, sizeof *t, cmp_u64);
  lua_createtable(L, 0, 5);
  lua_pushnumber(L, (double)total / 1e9);
  lua_setfield(L, -2, "seconds");
  lua_pushinteger(L, (lua_Integer)bytes);
  lua_setfield(L, -2, "bytes");
  size_t p50 = n / 2, p99 = n * 99 / 100;
  lua_pushnumber(L, n ? (double)t[p50] / 1e3 : 0);
  lua_setfield(L, -2, "p50_us");
  lua_pushnumber(L, n ? (double)t[p99] / 1e3 : 0);
  lua_setfield(L, -2, "p99_us");
  lua_pushnumber(L, n ? (double)t[n - 1] / 1e3 : 0);
  lua_setfield(L, -2, "max_us");
}

/* audit._bench_sink(sink, n): writes the ring's events through the sink n times in all (what
 * an emit does after the ring), timing each. */
int audit_bench_sink(lua_State *L) {
  sink *s = check_sink(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  audit *a = s->a;
  if (a->count == 0 || n <= 0) return luaL_error(L, "_bench_sink: empty ring");
  uint64_t *t = malloc(sizeof *t * (size_t)n);
  if (!t) return luaL_error(L, "out of memory");
  uint64_t b0 = s->bytes, total0 = cl_now_ns();
  for (lua_Integer i = 0; i < n; i++) {
    const slot *e = &a->ring[(a->head + (size_t)i % a->count) % a->capacity];
    uint64_t t0 = cl_now_ns();
    s->base.write(a, &s->base, e);
    t[i] = cl_now_ns() - t0;
  }
  uint64_t total = cl_now_ns() - total0;
  push_timing(L, t, (size_t)n, total, s->bytes - b0);
  free(t);
  return 1;
}

/* audit._bench_write(src, dst, n, [sync_each]): the peer. Reads the first n lines of src, then
 * writes each with one write(2) to dst (O_APPEND), timing each; with sync_each, an fdatasync
 * after every line (the naive way to make every record durable). */
int audit_bench_write(lua_State *L) {
  const char *src = luaL_checkstring(L, 1);
  const char *dst = luaL_checkstring(L, 2);
  lua_Integer n = luaL_checkinteger(L, 3);
  int sync_each = lua_toboolean(L, 4);
  FILE *f = fopen(src, "re");
  if (!f) return cl_fail(L, src, errno);
  char **lines = calloc((size_t)n, sizeof *lines);
  size_t *lens = calloc((size_t)n, sizeof *lens);
  uint64_t *t = malloc(sizeof *t * (size_t)n);
  lua_Integer got = 0;
  char *buf = NULL;
  size_t cap = 0;
  ssize_t len;
  while (lines && lens && t && got < n && (len = getline(&buf, &cap, f)) > 0) {
    lines[got] = malloc((size_t)len);
    if (!lines[got]) break;
    memcpy(lines[got], buf, (size_t)len);
    lens[got++] = (size_t)len;
  }
  free(buf);
  fclose(f);
  int fd = open(dst, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_TRUNC, 0600);
  uint64_t bytes = 0, total = 0;
  if (fd >= 0 && got > 0) {
    uint64_t total0 = cl_now_ns();
    for (lua_Integer i = 0; i < got; i++) {
      uint64_t t0 = cl_now_ns();
      if (write(fd, lines[i], lens[i]) == (ssize_t)lens[i]) bytes += lens[i];
      if (sync_each) fdatasync(fd);
      t[i] = cl_now_ns() - t0;
    }
    total = cl_now_ns() - total0;
  }
  if (fd >= 0) close(fd);
  if (t)
    push_timing(L, t, (size_t)got, total, bytes);
  else
    lua_pushnil(L);
  for (lua_Integer i = 0; lines && i < got; i++) free(lines[i]);
  free(lines);
  free(lens);
  free(t);
  return 1;
}

void audit_sink_register(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"close", sink_close},   {"stats", sink_stats}, {"sync", sink_sync},
      {"rotate", sink_rotate}, {NULL, NULL},
  };
  luaL_newmetatable(L, SINK_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, sink_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, sink_close);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 1);
}
