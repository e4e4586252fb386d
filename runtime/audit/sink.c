/*
 * Audit sinks, the Lua face: audit.sink{...} and the sink handle (stats, sync, rotate, close),
 * the stderr sink, and the benchmark hooks of tests/bench/audit.lua. The file sink itself is
 * sink_file.c (see there for the write, chain, fsync and rotation rules).
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

static const char *const fsync_names[] = {"never", "interval", "always", NULL};

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
  return CL_CHECK_OPEN(L, 1, sink, closed, SINK_MT, "audit_sink");
}

static void sink_release(sink *s) {
  if (s->closed) return;
  s->closed = 1;
  s->base.active = 0;
  if (s->a) audit_remove_sink(s->a, &s->base);
  if (s->type == T_FILE) {
    audit_file_flush(s);
    audit_syncer_stop(s);
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
  free(s->bb);
  free(s->be);
  s->path = s->line = s->pend = s->obuf = s->bb = NULL;
  s->be = NULL;
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
  if (s->type == T_FILE && !s->closed) audit_file_flush_report(L, s); /* the file as it is */
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
  audit_file_flush_report(L, s);
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
  audit_file_rotate(L, a, s, "rotate");
  if (s->rotations == rot) return cl_failf(L, s->fail_err, "audit sink rotate %s: failed", s->path);
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: audit.sink{path=, max_bytes=, keep=, fsync=, fsync_interval=, mode=, filter=, batch=} or
 * audit.sink{type="stderr", color=, filter=} -> sink | nil, err, errno */
int audit_sink_open(lua_State *L) {
  static const char *const fields[] = {"type",  "path",           "max_bytes", "keep",
                                       "fsync", "fsync_interval", "mode",      "filter",
                                       "color", "batch",          NULL};
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
  int batch = cl_opt_boolean(L, 1, "batch", 0);
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
  } else if (batch) {
    cl_field_error(L, "batch", "a stderr sink writes no batches");
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
    s->batch = batch;
    s->loop = cl_loop_get(L);
    s->policy = policy;
    s->keep = (int)keep;
    s->mode = (int)mode;
    const char *msg;
    int err = audit_file_open(s, 1, &msg);
    if (err) {
      free(s->path);
      s->path = NULL;
      if (msg) return cl_failf(L, err, "audit.sink %s: %s", path, msg);
      return cl_failf(L, err, "audit.sink %s: %s", path, strerror(err));
    }
    s->closed = 0;
    err = audit_syncer_start(s, policy, interval);
    if (!err) err = audit_syncer_set_fd(s);
    if (err) {
      sink_release(s);
      return cl_failf(L, err, "audit.sink %s: fsync worker: %s", path, strerror(err));
    }
    if (cl_watch_start(cl_loop_get(L), &s->evwatch, s->sy->evfd, EPOLLIN, audit_on_synced) != 0) {
      err = errno;
      sink_release(s);
      return cl_failf(L, err, "audit.sink %s: %s", path, strerror(err));
    }
    s->evwatch.data = s;
    s->base.write = audit_file_write;
    s->base.pending = audit_file_pending;
  }
  s->base.active = 1;
  audit_add_sink(a, &s->base);
  anchor(L, a, 3);
  if (t == T_FILE) audit_file_anchor(L, a, s);
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
    if (i == n - 1 && s->type == T_FILE) audit_file_flush(s); /* a batch left: part of the run */
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
  static const cl_class cls = {SINK_MT, methods, sink_close, NULL};
  cl_class_register(L, &cls);
}
