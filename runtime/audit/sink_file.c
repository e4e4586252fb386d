/*
 * The JSONL file sink of clawlua.audit (audit.sink{path=...}); sink.c is its Lua face.
 *
 * JSON-lines files. Each record is written with ONE write(2) on an O_APPEND descriptor, at
 * emission, so it is in the page cache (and survives a crash of the process) before emit
 * returns; the loop never waits for anything slower than that write. A record is the ring's
 * bytes plus its chain fields (see chain.c) and a newline. A write cut short (disk full in the
 * middle of a record) is undone with ftruncate, so the file only ever holds whole lines, and a
 * crash in the middle of a write(2) leaves at most one unfinished last line, which readers skip
 * and which the next sink to open the file cuts off before appending. With batch = true the
 * records are framed and chained the same way but written together (see "Batches" below): a
 * crash of the process then loses the records of the current loop iteration.
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
#include "sink_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
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

void audit_sink_count_drop(audit *a, sink *s, uint64_t seq, int err, const char *op) {
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

/* ------------------------------------------------------------------------------------------ */
/* Batches (batch = true): records are framed and chained as they come, and written together  */
/* with one write(2) once BATCH_MAX bytes wait or when the loop next runs its timers.         */

/* Writes the batch. On a failure the file keeps the whole records that reached it (a record cut
 * short is undone), the chain head moves to the last of them, and every record after it is
 * counted as dropped, so the next record chains onto what the file really holds. */
void audit_file_flush(sink *s) {
  if (s->flush_t.slot) cl_timer_stop(&s->flush_t);
  if (!s->nbe) return;
  size_t done = 0;
  int err = s->fd < 0 ? (s->fail_err ? s->fail_err : EBADF) : 0;
  while (!err && done < s->bblen) {
    ssize_t w = write(s->fd, s->bb + done, s->bblen - done);
    if (w > 0) {
      done += (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    err = w < 0 ? errno : EIO;
  }
  size_t k = 0;
  while (k < s->nbe && s->be[k].end <= done) k++;
  size_t keep = k ? s->be[k - 1].end : 0;
  if (err) {
    s->write_errors++;
    if (done > keep && ftruncate(s->fd, s->size + (off_t)keep) < 0) s->need_newline = 1;
  }
  if (k) {
    s->size += (off_t)keep;
    s->bytes += keep;
    s->written += k;
    s->file_records += k;
    memcpy(s->head, s->be[k - 1].hash, AUDIT_HEX);
    s->last_seq = s->be[k - 1].seq;
    if (s->sy) audit_syncer_wrote(s->sy, s->written);
    if (s->max_bytes > 0 && s->size >= s->max_bytes && s->file_records >= 2) {
      s->need_rotate = 1;
      s->base.has_pending = 1;
    }
  }
  for (size_t i = k; i < s->nbe; i++) audit_sink_count_drop(s->a, s, s->be[i].seq, err, "write");
  s->nbe = 0;
  s->bblen = 0;
}

void audit_file_flush_report(lua_State *L, sink *s) {
  audit_file_flush(s);
  audit *a = s->a;
  if (s->base.has_pending && s->base.active && L && !a->emitting && !a->in_pending) {
    s->base.has_pending = 0; /* a failure is reported now, not at the next event */
    a->in_pending = 1;
    audit_file_pending(L, a, &s->base);
    a->in_pending = 0;
  }
}

static void batch_timer(cl_timer *t) {
  sink *s = (sink *)((char *)t - offsetof(sink, flush_t));
  audit_file_flush_report(s->a->L, s);
}

static int grow(void **p, size_t *cap, size_t need, size_t size) {
  if (need <= *cap) return 1;
  size_t c = *cap ? *cap : 16;
  while (c < need) c *= 2;
  void *np = realloc(*p, c * size);
  if (!np) return 0;
  *p = np;
  *cap = c;
  return 1;
}

static size_t frame(sink *s, const char *prev, const char *rec, size_t len, char *hash);

static int batch_add(audit *a, sink *s, const slot *e) {
  char hash[AUDIT_HEX];
  size_t n = frame(s, s->nbe ? s->be[s->nbe - 1].hash : s->head, e->rec, e->len, hash);
  if (!n || !grow((void **)&s->bb, &s->bbcap, s->bblen + n, 1) ||
      !grow((void **)&s->be, &s->cbe, s->nbe + 1, sizeof *s->be)) {
    audit_sink_count_drop(a, s, e->seq, ENOMEM, "write");
    return 0;
  }
  memcpy(s->bb + s->bblen, s->line, n);
  s->bblen += n;
  struct bentry *b = &s->be[s->nbe++];
  b->end = s->bblen;
  b->seq = e->seq;
  memcpy(b->hash, hash, AUDIT_HEX);
  if (s->bblen >= BATCH_MAX)
    audit_file_flush(s);
  else if (!s->flush_t.slot)
    cl_timer_start(s->loop, &s->flush_t, cl_now_ns(), batch_timer);
  return 1;
}

int audit_file_write(audit *a, asink *base, const slot *e) {
  sink *s = (sink *)base;
  if (s->batch) {
    /* Anchors, reports and everything after a failure take the one-record path below. */
    if (s->fd >= 0 && !s->pendlen && !s->failing && !s->need_newline && e->seq != s->anchor_seq &&
        e->seq != s->base.force_seq)
      return batch_add(a, s, e);
    audit_file_flush(s); /* what came before goes first */
  }
  if (s->fd < 0) {
    audit_sink_count_drop(a, s, e->seq, s->fail_err ? s->fail_err : EBADF, "open");
    s->want_reopen = 1;
    s->base.has_pending = 1;
    return 0;
  }
  if (s->pendlen) { /* the file's anchor first */
    int err = write_line(s, s->pend, s->pendlen);
    if (err) {
      if (e->seq != s->pend_seq) audit_sink_count_drop(a, s, e->seq, err, "write");
      return 0;
    }
    memcpy(s->head, s->pend_hash, AUDIT_HEX);
    s->file_records++;
    s->written++;
    s->bytes += s->pendlen;
    s->last_seq = s->pend_seq;
    s->pendlen = 0;
    if (s->sy) audit_syncer_wrote(s->sy, s->written);
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
    audit_sink_count_drop(a, s, e->seq, ENOMEM, "write");
    return 0;
  }
  int err = write_line(s, s->line, n);
  if (err) {
    if (e->seq == s->anchor_seq) { /* a new file's anchor: keep it, it must come first */
      if (n > s->pendcap) {
        char *np = realloc(s->pend, n);
        if (!np) {
          audit_sink_count_drop(a, s, e->seq, err, "write");
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
    audit_sink_count_drop(a, s, e->seq, err, "write");
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
  if (s->sy) audit_syncer_wrote(s->sy, s->written);
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
int audit_file_open(sink *s, int find_prev, const char **msg) {
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
void audit_file_anchor(lua_State *L, audit *a, sink *s) {
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
    const char *code = strerrorname_np(err); /* "ENOSPC": what to search for */
    if (code) {
      lua_pushstring(L, code);
      lua_setfield(L, -2, "code");
    }
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

void audit_file_rotate(lua_State *L, audit *a, sink *s, const char *reason) {
  int err = 0;
  audit_file_flush(s);
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
  err = audit_file_open(s, 0, &msg);
  if (s->sy) {
    /* The worker syncs the old file (per policy) and closes its own copy. */
    audit_syncer_set_fd(s);
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
  audit_file_anchor(L, a, s);
}

void audit_file_pending(lua_State *L, audit *a, asink *base) {
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
    audit_file_rotate(L, a, s, "rotate");
  }
  if (s->want_reopen && s->fd < 0 && cl_now_ns() >= s->next_retry) {
    s->want_reopen = 0;
    char head[AUDIT_HEX];
    memcpy(head, s->head, AUDIT_HEX);
    uint64_t prev_seq = s->last_seq;
    const char *msg;
    int err = audit_file_open(s, 0, &msg);
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
    if (s->sy) audit_syncer_set_fd(s);
    audit_file_anchor(L, a, s);
  }
}
