/*
 * Streams: non-blocking fds driven by the loop (pipes of child processes, Unix sockets, the
 * runtime's own stdin/stdout). Reads are buffered for line access; every buffer has a cap so a
 * peer can never make the runtime hold more than it allows (a line longer than the cap is
 * skipped and reported, and reading goes on with the next line).
 */
#include "clawlua.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define STREAM_MT        "clawlua.stream"
#define CHUNK            65536
#define DEFAULT_MAX_LINE ((size_t)1 << 20)
#define DEFAULT_MAX_ALL  ((size_t)64 << 20)

int cl_entry_redirect(lua_State *L, const char *name);

struct cl_stream {
  int fd;
  int mode;
  int own;           /* close fd with the stream (a borrowed fd is watched through a dup) */
  int restore_flags; /* file status flags to put back on close (borrowed fds), or -1 */
  int closed, eof;
  int skipping; /* dropping the rest of an over-long line */
  cl_watch watch;
  char *buf;
  size_t off, len, cap;
  size_t max_line;
  double timeout;
  char name[40];
};

static cl_stream *check_stream(lua_State *L) {
  cl_stream *s = luaL_checkudata(L, 1, STREAM_MT);
  if (s->closed) luaL_error(L, "attempt to use a closed stream");
  return s;
}

int cl_stream_fd(cl_stream *s) {
  return s->closed ? -1 : s->fd;
}

static void stream_release(cl_stream *s) {
  if (s->closed) return;
  s->closed = 1; /* first, so anything woken below sees a closed stream */
  cl_watch_stop(&s->watch);
  if (s->restore_flags >= 0) fcntl(s->fd, F_SETFL, s->restore_flags);
  if (s->own) close(s->fd);
  s->fd = -1;
  free(s->buf);
  s->buf = NULL;
  s->off = s->len = s->cap = 0;
}

static cl_stream *stream_push(lua_State *L, int fd, int mode, int own, const char *name) {
  cl_stream *s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  s->fd = -1;
  s->closed = 1; /* closed until set up, so a failure below leaves nothing to release */
  s->restore_flags = -1;
  luaL_setmetatable(L, STREAM_MT);
  s->mode = mode;
  s->own = own;
  s->max_line = DEFAULT_MAX_LINE;
  s->timeout = -1;
  snprintf(s->name, sizeof s->name, "%s", name ? name : "fd");
  if (!own) {
    /* A borrowed fd is watched through a private dup: epoll keys on the fd number, so the
     * owner may watch it too, and closing the stream closes only the dup. O_NONBLOCK lives in
     * the shared file description, so the original flags are put back on close. */
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK)) s->restore_flags = fl;
    fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) {
      lua_pop(L, 1);
      return NULL;
    }
    s->own = own = 1;
  }
  cl_set_nonblock(fd, 1);
  int err = cl_watch_start(cl_loop_get(L), &s->watch, fd, 0, NULL);
  if (err) {
    if (s->restore_flags >= 0) fcntl(fd, F_SETFL, s->restore_flags);
    if (own) close(fd);
    lua_pop(L, 1);
    errno = err;
    return NULL;
  }
  s->fd = fd;
  s->closed = 0;
  return s;
}

cl_stream *cl_stream_new(lua_State *L, int fd, int mode, const char *name) {
  cl_stream *s = stream_push(L, fd, mode, 1, name);
  if (!s) luaL_error(L, "stream %s: cannot watch fd %d: %s", name, fd, strerror(errno));
  return s;
}

/* ------------------------------------------------------------------------------------------ */
/* Reading                                                                                    */

/* Reads more into the buffer. Returns bytes read, 0 at EOF, -1 for EAGAIN, -2 with errno. */
static ssize_t fill(cl_stream *s, size_t want) {
  if (s->off > 0 && s->off == s->len) s->off = s->len = 0;
  if (s->cap - s->len < want) {
    if (s->off > 0) { /* compact first */
      memmove(s->buf, s->buf + s->off, s->len - s->off);
      s->len -= s->off;
      s->off = 0;
    }
    if (s->cap - s->len < want) {
      size_t cap = s->cap ? s->cap : CHUNK;
      while (cap - s->len < want) cap *= 2;
      char *nb = realloc(s->buf, cap);
      if (!nb) {
        errno = ENOMEM;
        return -2;
      }
      s->buf = nb;
      s->cap = cap;
    }
  }
  for (;;) {
    ssize_t n = read(s->fd, s->buf + s->len, s->cap - s->len);
    if (n > 0) {
      s->len += (size_t)n;
      return n;
    }
    if (n == 0) {
      s->eof = 1;
      return 0;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return -1;
    return -2;
  }
}

/* Suspends the current operation until the fd is ready; the wait lives at stack index widx
 * (created on the first suspension). */
static int stream_wait(lua_State *L, cl_stream *s, int widx, int dir, lua_KFunction k) {
  cl_wait *w;
  if (lua_gettop(L) < widx) {
    lua_settop(L, widx - 1);
    w = cl_wait_push(L);
    w->deadline = cl_deadline(s->timeout);
  } else {
    w = lua_touserdata(L, widx);
  }
  return cl_watch_wait(L, w, &s->watch, dir, k, widx);
}

/* Returns 1 to continue (the wait was satisfied), or pushes a result and returns its count
 * negated-and-offset. Used at the top of every continuation. */
static int resumed(lua_State *L, lua_KContext ctx, cl_stream **sp, const char *op, int *nret) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  cl_stream *s = lua_touserdata(L, 1);
  *sp = s;
  if (s->closed) {
    *nret = cl_failf(L, EBADF, "%s %s: stream closed", op, s->name);
    return 0;
  }
  if (w->state == CL_WAIT_TIMEOUT) {
    *nret = cl_timed_out(L);
    return 0;
  }
  return 1;
}

static int do_read(lua_State *L, cl_stream *s);
static int read_k(lua_State *L, int status, lua_KContext ctx) {
  cl_stream *s;
  int n;
  if (!resumed(L, ctx, &s, "read", &n)) return n;
  return do_read(L, s);
}

static int do_read(lua_State *L, cl_stream *s) {
  size_t want = (size_t)luaL_optinteger(L, 2, CHUNK);
  if (s->len > s->off) {
    size_t n = s->len - s->off < want ? s->len - s->off : want;
    lua_pushlstring(L, s->buf + s->off, n);
    s->off += n;
    return 1;
  }
  if (s->eof) return 0;
  ssize_t r = fill(s, want < CHUNK ? CHUNK : want);
  if (r == -1) return stream_wait(L, s, 3, 0, read_k);
  if (r == -2) return cl_fail(L, "read", errno);
  if (r == 0) return 0;
  size_t n = s->len - s->off < want ? s->len - s->off : want;
  lua_pushlstring(L, s->buf + s->off, n);
  s->off += n;
  return 1;
}

/* Lua: s:read([max=65536]) -> data | nothing at EOF | nil, err, code */
static int l_read(lua_State *L) {
  cl_stream *s = check_stream(L);
  if (!(s->mode & CL_STREAM_READ)) return luaL_error(L, "stream %s is not readable", s->name);
  lua_Integer want = luaL_optinteger(L, 2, CHUNK);
  luaL_argcheck(L, want > 0 && want <= (1 << 30), 2, "size out of range");
  lua_settop(L, 2);
  return do_read(L, s);
}

static int do_read_line(lua_State *L, cl_stream *s);
static int read_line_k(lua_State *L, int status, lua_KContext ctx) {
  cl_stream *s;
  int n;
  if (!resumed(L, ctx, &s, "read_line", &n)) return n;
  return do_read_line(L, s);
}

static int do_read_line(lua_State *L, cl_stream *s) {
  size_t max = (size_t)luaL_optinteger(L, 2, (lua_Integer)s->max_line);
  for (;;) {
    char *start = s->buf ? s->buf + s->off : NULL;
    size_t avail = start ? s->len - s->off : 0;
    char *nl = start && avail ? memchr(start, '\n', avail) : NULL;
    if (s->skipping) {
      if (nl) {
        s->off += (size_t)(nl - start) + 1;
        s->skipping = 0;
        return cl_failf(L, E2BIG, "read_line %s: line longer than %I bytes (skipped)", s->name,
                        (lua_Integer)max);
      }
      s->off = s->len = 0; /* drop what we have of the long line */
    } else if (nl) {
      size_t n = (size_t)(nl - start);
      s->off += n + 1;
      if (n > max)
        return cl_failf(L, E2BIG, "read_line %s: line longer than %I bytes", s->name,
                        (lua_Integer)max);
      if (n > 0 && start[n - 1] == '\r') n--;
      lua_pushlstring(L, start, n);
      return 1;
    } else if (avail > max) {
      s->skipping = 1;
      continue;
    } else if (s->eof) {
      if (avail == 0) return 0;
      lua_pushlstring(L, start, avail); /* the last line had no newline */
      s->off = s->len;
      return 1;
    }
    ssize_t r = fill(s, CHUNK);
    if (r == -1) return stream_wait(L, s, 3, 0, read_line_k);
    if (r == -2) return cl_fail(L, "read_line", errno);
    if (r == 0 && s->skipping) {
      s->skipping = 0;
      return cl_failf(L, E2BIG, "read_line %s: line longer than %I bytes (skipped)", s->name,
                      (lua_Integer)max);
    }
  }
}

/* Lua: s:read_line([max]) -> line (without "\n" / "\r\n") | nothing at EOF | nil, err, code */
static int l_read_line(lua_State *L) {
  cl_stream *s = check_stream(L);
  if (!(s->mode & CL_STREAM_READ)) return luaL_error(L, "stream %s is not readable", s->name);
  lua_Integer max = luaL_optinteger(L, 2, (lua_Integer)s->max_line);
  luaL_argcheck(L, max > 0 && max <= ((lua_Integer)1 << 31), 2, "size out of range");
  lua_settop(L, 2);
  return do_read_line(L, s);
}

static int do_read_all(lua_State *L, cl_stream *s);
static int read_all_k(lua_State *L, int status, lua_KContext ctx) {
  cl_stream *s;
  int n;
  if (!resumed(L, ctx, &s, "read_all", &n)) return n;
  return do_read_all(L, s);
}

static int do_read_all(lua_State *L, cl_stream *s) {
  size_t max = (size_t)luaL_optinteger(L, 2, (lua_Integer)DEFAULT_MAX_ALL);
  while (!s->eof) {
    if (s->len - s->off > max)
      return cl_failf(L, E2BIG, "read_all %s: more than %I bytes", s->name, (lua_Integer)max);
    ssize_t r = fill(s, CHUNK);
    if (r == -1) return stream_wait(L, s, 3, 0, read_all_k);
    if (r == -2) return cl_fail(L, "read_all", errno);
  }
  size_t avail = s->len - s->off;
  if (avail > max)
    return cl_failf(L, E2BIG, "read_all %s: more than %I bytes", s->name, (lua_Integer)max);
  lua_pushlstring(L, s->buf ? s->buf + s->off : "", avail);
  s->off = s->len = 0;
  return 1;
}

/* Lua: s:read_all([max=64 MiB]) -> everything up to EOF | nil, err, code */
static int l_read_all(lua_State *L) {
  cl_stream *s = check_stream(L);
  if (!(s->mode & CL_STREAM_READ)) return luaL_error(L, "stream %s is not readable", s->name);
  lua_Integer max = luaL_optinteger(L, 2, (lua_Integer)DEFAULT_MAX_ALL);
  luaL_argcheck(L, max >= 0, 2, "size out of range");
  lua_settop(L, 2);
  return do_read_all(L, s);
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                    */

static int write_wait_progress(lua_State *L, cl_stream *s, size_t off);
static int write_k(lua_State *L, int status, lua_KContext ctx) {
  cl_stream *s;
  int n;
  if (!resumed(L, ctx, &s, "write", &n)) return n;
  cl_wait *w = lua_touserdata(L, (int)ctx);
  return write_wait_progress(L, s, (size_t)w->aux[0]);
}

/* Lua: s:write(data, ...) writes everything -> true | nil, err, code */
static int l_write(lua_State *L) {
  cl_stream *s = check_stream(L);
  if (!(s->mode & CL_STREAM_WRITE)) return luaL_error(L, "stream %s is not writable", s->name);
  int n = lua_gettop(L);
  for (int i = 2; i <= n; i++) luaL_checklstring(L, i, NULL);
  if (n == 1) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (n > 2) lua_concat(L, n - 1);
  lua_settop(L, 2);
  return write_wait_progress(L, s, 0);
}

/* Writes from offset off; progress survives a suspension in the wait's aux[0] (index 3). */
static int write_wait_progress(lua_State *L, cl_stream *s, size_t off) {
  size_t len;
  const char *data = lua_tolstring(L, 2, &len);
  while (off < len) {
    ssize_t n = write(s->fd, data + off, len - off);
    if (n >= 0) {
      off += (size_t)n;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      cl_wait *w;
      if (lua_gettop(L) < 3) {
        w = cl_wait_push(L);
        w->deadline = cl_deadline(s->timeout);
      } else {
        w = lua_touserdata(L, 3);
      }
      w->aux[0] = (intptr_t)off;
      return cl_watch_wait(L, w, &s->watch, 1, write_k, 3);
    }
    return cl_fail(L, "write", errno);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* The rest                                                                                   */

static int l_close(lua_State *L) {
  cl_stream *s = luaL_checkudata(L, 1, STREAM_MT);
  stream_release(s);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_gc(lua_State *L) {
  stream_release(luaL_checkudata(L, 1, STREAM_MT));
  return 0;
}

static int l_fileno(lua_State *L) {
  lua_pushinteger(L, check_stream(L)->fd);
  return 1;
}

static int l_is_closed(lua_State *L) {
  lua_pushboolean(L, ((cl_stream *)luaL_checkudata(L, 1, STREAM_MT))->closed);
  return 1;
}

/* Lua: s:set_timeout(seconds|nil) applies to every later operation; nil: none. */
static int l_set_timeout(lua_State *L) {
  cl_stream *s = check_stream(L);
  s->timeout = lua_isnoneornil(L, 2) ? -1 : luaL_checknumber(L, 2);
  lua_settop(L, 1);
  return 1;
}

/* Lua: s:set_max_line(bytes) */
static int l_set_max_line(lua_State *L) {
  cl_stream *s = check_stream(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n > 0 && n <= ((lua_Integer)1 << 31), 2, "size out of range");
  s->max_line = (size_t)n;
  lua_settop(L, 1);
  return 1;
}

/* Lua: s:buffered() -> bytes read from the fd but not yet returned */
static int l_buffered(lua_State *L) {
  cl_stream *s = check_stream(L);
  lua_pushinteger(L, (lua_Integer)(s->len - s->off));
  return 1;
}

static int l_tostring(lua_State *L) {
  cl_stream *s = luaL_checkudata(L, 1, STREAM_MT);
  if (s->closed)
    lua_pushfstring(L, "clawlua.stream (%s, closed)", s->name);
  else
    lua_pushfstring(L, "clawlua.stream (%s, fd %d)", s->name, s->fd);
  return 1;
}

static int lines_k(lua_State *L, int status, lua_KContext ctx) {
  if (lua_isnil(L, 1) && !lua_isnil(L, 2)) return lua_error(L); /* an error mid-iteration */
  lua_settop(L, 1);
  return 1;
}

/* Calls s:read_line(max) with a continuation, so that inside a task the read yields to the
 * loop like any other wait (a plain lua_call would not be yieldable and would fall back to
 * running a nested loop). */
static int lines_iter(lua_State *L) {
  lua_settop(L, 0);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_getfield(L, 1, "read_line");
  lua_insert(L, 1);
  lua_callk(L, 2, 2, 0, lines_k);
  return lines_k(L, LUA_OK, 0);
}

/* Lua: for line in s:lines([max]) do ... end (raises on read errors) */
static int l_lines(lua_State *L) {
  check_stream(L);
  lua_settop(L, 2);
  lua_pushcclosure(L, lines_iter, 2);
  return 1;
}

static int mode_of(lua_State *L, int idx) {
  const char *m = luaL_optstring(L, idx, "r");
  if (strcmp(m, "r") == 0) return CL_STREAM_READ;
  if (strcmp(m, "w") == 0) return CL_STREAM_WRITE;
  if (strcmp(m, "rw") == 0) return CL_STREAM_READ | CL_STREAM_WRITE;
  return luaL_argerror(L, idx, "mode must be \"r\", \"w\" or \"rw\"");
}

/* Lua: stream.fdopen(fd, mode, [{own=false, name=}]) wraps an existing fd. */
static int l_fdopen(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  int mode = mode_of(L, 2);
  static const char *const fields[] = {"own", "name", NULL};
  if (lua_istable(L, 3)) cl_check_fields(L, 3, fields);
  int own = cl_opt_boolean(L, 3, "own", 0);
  const char *name = cl_opt_string(L, 3, "name", NULL);
  struct stat st;
  if (fstat(fd, &st) < 0) return cl_fail(L, "fdopen", errno);
  char buf[24];
  if (!name) {
    snprintf(buf, sizeof buf, "fd %d", fd);
    name = buf;
  }
  if (!stream_push(L, fd, mode, own, name)) return cl_fail(L, "fdopen", errno);
  return 1;
}

/* Lua: stream.pipe() -> reader, writer */
static int l_pipe(lua_State *L) {
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) return cl_fail(L, "pipe", errno);
  if (!stream_push(L, p[0], CL_STREAM_READ, 1, "pipe")) {
    int err = errno;
    close(p[1]);
    return cl_fail(L, "pipe", err);
  }
  if (!stream_push(L, p[1], CL_STREAM_WRITE, 1, "pipe")) return cl_fail(L, "pipe", errno);
  return 2;
}

static int connect_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  cl_stream *s = lua_touserdata(L, (int)ctx - 1);
  if (w->state == CL_WAIT_TIMEOUT) {
    stream_release(s);
    return cl_timed_out(L);
  }
  int err = 0;
  socklen_t len = sizeof err;
  if (s->closed || getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  if (err) {
    const char *path = lua_tostring(L, 1);
    stream_release(s);
    return cl_failf(L, err, "connect %s: %s", path, strerror(err));
  }
  lua_pushvalue(L, (int)ctx - 1);
  return 1;
}

/* Lua: stream.connect_unix(path, [timeout]) -> stream | nil, err, code */
static int l_connect_unix(lua_State *L) {
  size_t plen;
  const char *path = luaL_checklstring(L, 1, &plen);
  double timeout = luaL_optnumber(L, 2, -1);
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (plen >= sizeof sa.sun_path)
    return cl_failf(L, ENAMETOOLONG, "connect %s: path longer than %I bytes", path,
                    (lua_Integer)(sizeof sa.sun_path - 1));
  memcpy(sa.sun_path, path, plen);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return cl_fail(L, "socket", errno);
  lua_settop(L, 2);
  cl_stream *s = stream_push(L, fd, CL_STREAM_READ | CL_STREAM_WRITE, 1, "unix");
  if (!s) return cl_fail(L, "connect", errno);
  snprintf(s->name, sizeof s->name, "%s", path);
  int r;
  do r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  while (r < 0 && errno == EINTR);
  if (r == 0) return 1;
  if (errno != EINPROGRESS && errno != EAGAIN) {
    int err = errno;
    stream_release(s);
    return cl_failf(L, err, "connect %s: %s", path, strerror(err));
  }
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return cl_watch_wait(L, w, &s->watch, 1, connect_k, lua_gettop(L));
}

/* Lua: stream.socketpair() -> a, b (connected Unix stream sockets) */
static int l_socketpair(lua_State *L) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
    return cl_fail(L, "socketpair", errno);
  if (!stream_push(L, sv[0], CL_STREAM_READ | CL_STREAM_WRITE, 1, "socketpair")) {
    int err = errno;
    close(sv[1]);
    return cl_fail(L, "socketpair", err);
  }
  if (!stream_push(L, sv[1], CL_STREAM_READ | CL_STREAM_WRITE, 1, "socketpair"))
    return cl_fail(L, "socketpair", errno);
  return 2;
}

/* Lua: stream.stdin() / stream.stdout() / stream.stderr(): the runtime's own stdio (one
 * stream each per Lua state; the fd is not closed with it and its flags are restored). */
static int std_stream(lua_State *L, int fd, int mode, const char *name) {
  lua_pushvalue(L, lua_upvalueindex(1));
  if (lua_rawgeti(L, -1, fd) == LUA_TUSERDATA) {
    cl_stream *s = lua_touserdata(L, -1);
    if (!s->closed) return 1;
  }
  lua_pop(L, 1);
  if (!stream_push(L, fd, mode, 0, name)) return cl_fail(L, name, errno);
  lua_pushvalue(L, -1);
  lua_rawseti(L, -3, fd);
  return 1;
}

static int l_stdin(lua_State *L) {
  return std_stream(L, 0, CL_STREAM_READ, "stdin");
}
static int l_stdout(lua_State *L) {
  return std_stream(L, 1, CL_STREAM_WRITE, "stdout");
}
static int l_stderr(lua_State *L) {
  return std_stream(L, 2, CL_STREAM_WRITE, "stderr");
}

/* Lua: stream.isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

static const luaL_Reg methods[] = {
    {"read", l_read},
    {"read_line", l_read_line},
    {"read_all", l_read_all},
    {"lines", l_lines},
    {"write", l_write},
    {"close", l_close},
    {"fileno", l_fileno},
    {"is_closed", l_is_closed},
    {"set_timeout", l_set_timeout},
    {"set_max_line", l_set_max_line},
    {"buffered", l_buffered},
    {NULL, NULL},
};

static const luaL_Reg funcs[] = {
    {"fdopen", l_fdopen},         {"pipe", l_pipe},     {"connect_unix", l_connect_unix},
    {"socketpair", l_socketpair}, {"isatty", l_isatty}, {NULL, NULL},
};

int luaopen_clawlua_stream(lua_State *L) {
  if (cl_entry_redirect(L, "stream")) return 1;
  static const luaL_Reg meta[] = {{"__tostring", l_tostring}, {NULL, NULL}};
  static const cl_class cls = {STREAM_MT, methods, l_gc, meta};
  cl_class_register(L, &cls);
  luaL_newlib(L, funcs);
  lua_newtable(L); /* the stdio streams, by fd */
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, l_stdin, 1);
  lua_setfield(L, -3, "stdin");
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, l_stdout, 1);
  lua_setfield(L, -3, "stdout");
  lua_pushcclosure(L, l_stderr, 1);
  lua_setfield(L, -2, "stderr");
  return 1;
}
