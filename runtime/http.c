/*
 * clawlua.http: HTTP over libcurl's multi interface, driven by the loop. curl tells us which
 * sockets to watch (socket callback) and when to call it back (timer callback); the loop does
 * the waiting. Many requests from many tasks share one multi handle and its connection cache.
 *
 * Each request is a userdata on the stack of the waiting call: a cancelled task aborts its
 * transfer at once (the wait's abort hook), and a collected one cannot outlive its easy handle.
 */
#include "clawlua.h"

#include "curl_lazy.h"
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#define REQ_MT            "clawlua.http.request"
#define DEFAULT_MAX_BODY  ((size_t)64 << 20)
#define MAX_HEADER_BYTES  ((size_t)256 << 10)
#define STREAM_HIGH_WATER ((size_t)1 << 20)

int cl_entry_redirect(lua_State *L, const char *name);

static const char CTX_KEY = 'h';

typedef struct http_ctx {
  CURLM *multi;
  cl_loop *loop;
  cl_timer timer;
  int in_action; /* curl is running: do not re-enter it from a callback */
} http_ctx;

typedef struct sockwatch {
  cl_watch watch;
  http_ctx *ctx;
  curl_socket_t fd;
} sockwatch;

/* CURLINFO_PRIVATE of every transfer in the shared multi handle points at one of these two:
 * a Lua request (ext == 0) or a C caller's transfer (cl_http_add). */
typedef struct ext_xfer {
  int ext;
  cl_http_done_fn done;
  void *arg;
} ext_xfer;

typedef struct req {
  int ext; /* 0 */
  CURL *easy;
  http_ctx *ctx;
  struct curl_slist *headers;
  int in_multi;
  int done;
  CURLcode result;
  int too_large, headers_too_large;
  int streaming, paused;
  char *body;
  size_t body_len, body_cap, max_body;
  char *hdr;
  size_t hdr_len, hdr_cap;
  cl_wait *w;
  char errbuf[CURL_ERROR_SIZE];
} req;

/* ------------------------------------------------------------------------------------------ */
/* curl <-> loop                                                                              */

static void check_done(http_ctx *ctx) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(ctx->multi, &left))) {
    if (m->msg != CURLMSG_DONE) continue;
    int *tag = NULL;
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&tag);
    CURLcode res = m->data.result;
    CURL *easy = m->easy_handle;
    curl_multi_remove_handle(ctx->multi, easy);
    if (!tag) continue;
    if (*tag) { /* a C caller's transfer: hand it back */
      ext_xfer *x = (ext_xfer *)tag;
      curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
      cl_http_done_fn done = x->done;
      void *arg = x->arg;
      free(x);
      done(arg, (int)res);
      continue;
    }
    req *r = (req *)tag;
    r->in_multi = 0;
    r->done = 1;
    r->result = res;
    if (r->w) {
      cl_wait *w = r->w;
      r->w = NULL;
      cl_wait_wake(w, 0);
    }
  }
}

static void socket_action(http_ctx *ctx, curl_socket_t fd, int flags) {
  int running;
  ctx->in_action++;
  curl_multi_socket_action(ctx->multi, fd, flags, &running);
  ctx->in_action--;
  check_done(ctx);
}

static void on_sock(cl_watch *w, uint32_t events) {
  sockwatch *sw = w->data;
  int flags = 0;
  if (events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP)) flags |= CURL_CSELECT_IN;
  if (events & EPOLLOUT) flags |= CURL_CSELECT_OUT;
  if (events & EPOLLERR) flags |= CURL_CSELECT_ERR;
  socket_action(sw->ctx, sw->fd, flags);
}

static int sock_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp) {
  http_ctx *ctx = userp;
  sockwatch *sw = socketp;
  if (what == CURL_POLL_REMOVE) {
    if (sw) {
      cl_watch_stop(&sw->watch);
      curl_multi_assign(ctx->multi, s, NULL);
      free(sw);
    }
    return 0;
  }
  uint32_t ev = 0;
  if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) ev |= EPOLLIN;
  if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) ev |= EPOLLOUT;
  if (!sw) {
    sw = calloc(1, sizeof *sw);
    if (!sw) return -1;
    if (cl_watch_start(ctx->loop, &sw->watch, s, ev, on_sock) != 0) {
      free(sw);
      return -1;
    }
    sw->watch.data = sw;
    sw->ctx = ctx;
    sw->fd = s;
    curl_multi_assign(ctx->multi, s, sw);
  } else if (cl_watch_modify(&sw->watch, ev) != 0) {
    return -1;
  }
  return 0;
}

static void on_timer(cl_timer *t) {
  http_ctx *ctx = (http_ctx *)((char *)t - offsetof(http_ctx, timer));
  socket_action(ctx, CURL_SOCKET_TIMEOUT, 0);
}

static int timer_cb(CURLM *m, long timeout_ms, void *userp) {
  http_ctx *ctx = userp;
  if (timeout_ms < 0) {
    cl_timer_stop(&ctx->timer);
    return 0;
  }
  cl_timer_start(ctx->loop, &ctx->timer, cl_now_ns() + (uint64_t)timeout_ms * 1000000u, on_timer);
  return 0;
}

static void ctx_close(void *arg) {
  http_ctx *ctx = arg;
  cl_timer_stop(&ctx->timer);
  curl_multi_cleanup(ctx->multi); /* removes the remaining sockets through sock_cb */
  free(ctx);
}

static http_ctx *get_ctx(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &CTX_KEY);
  http_ctx *ctx = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (ctx) return ctx;
  char err[256];
  if (cl_curl_load(err, sizeof err)) return (luaL_error(L, "http: %s", err), NULL);
  ctx = calloc(1, sizeof *ctx);
  if (!ctx) return (luaL_error(L, "http: out of memory"), NULL);
  ctx->loop = cl_loop_get(L);
  ctx->multi = curl_multi_init();
  if (!ctx->multi) {
    free(ctx);
    return (luaL_error(L, "http: curl_multi_init failed"), NULL);
  }
  curl_multi_setopt(ctx->multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
  curl_multi_setopt(ctx->multi, CURLMOPT_SOCKETDATA, ctx);
  curl_multi_setopt(ctx->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
  curl_multi_setopt(ctx->multi, CURLMOPT_TIMERDATA, ctx);
  cl_loop_atclose(ctx->loop, ctx_close, ctx);
  lua_pushlightuserdata(L, ctx);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &CTX_KEY);
  return ctx;
}

/* ------------------------------------------------------------------------------------------ */
/* Request objects                                                                            */

static int grow(char **buf, size_t *cap, size_t need) {
  if (need <= *cap) return 1;
  size_t c = *cap ? *cap : 16384;
  while (c < need) c *= 2;
  char *p = realloc(*buf, c);
  if (!p) return 0;
  *buf = p;
  *cap = c;
  return 1;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *ud) {
  req *r = ud;
  size_t n = size * nmemb;
  if (r->streaming) {
    if (r->body_len >= STREAM_HIGH_WATER) { /* the task has not taken the last chunk yet */
      r->paused = 1;
      return CURL_WRITEFUNC_PAUSE;
    }
  } else if (r->body_len + n > r->max_body) {
    r->too_large = 1;
    return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
  }
  if (!grow(&r->body, &r->body_cap, r->body_len + n)) return 0;
  memcpy(r->body + r->body_len, data, n);
  r->body_len += n;
  if (r->streaming && r->w) {
    cl_wait *w = r->w;
    r->w = NULL;
    cl_wait_wake(w, 0);
  }
  return n;
}

static size_t header_cb(char *data, size_t size, size_t nmemb, void *ud) {
  req *r = ud;
  size_t n = size * nmemb;
  if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) r->hdr_len = 0; /* a new response (redirect) */
  if (r->hdr_len + n > MAX_HEADER_BYTES) {
    r->headers_too_large = 1;
    return 0;
  }
  if (!grow(&r->hdr, &r->hdr_cap, r->hdr_len + n)) return 0;
  memcpy(r->hdr + r->hdr_len, data, n);
  r->hdr_len += n;
  return n;
}

static void req_release(req *r) {
  if (r->easy) {
    if (r->in_multi) curl_multi_remove_handle(r->ctx->multi, r->easy);
    r->in_multi = 0;
    curl_easy_cleanup(r->easy);
    r->easy = NULL;
  }
  curl_slist_free_all(r->headers);
  r->headers = NULL;
  free(r->body);
  free(r->hdr);
  r->body = r->hdr = NULL;
  r->body_len = r->hdr_len = r->body_cap = r->hdr_cap = 0;
  r->w = NULL;
}

static int req_gc(lua_State *L) {
  req_release(lua_touserdata(L, 1));
  return 0;
}

/* The waiting task was cancelled: stop the transfer now, not when the request is collected. */
static void on_abort(cl_wait *w) {
  req *r = w->data;
  r->w = NULL;
  if (r->easy && r->in_multi) {
    curl_multi_remove_handle(r->ctx->multi, r->easy);
    r->in_multi = 0;
  }
}

/* Pushes the response headers as a table of lower-cased names (repeats joined with ", "). */
static void push_headers(lua_State *L, req *r) {
  lua_newtable(L);
  size_t i = 0;
  int first = 1;
  while (i < r->hdr_len) {
    char *line = r->hdr + i;
    char *nl = memchr(line, '\n', r->hdr_len - i);
    size_t len = nl ? (size_t)(nl - line) : r->hdr_len - i;
    i += len + 1;
    if (len && line[len - 1] == '\r') len--;
    if (first) {
      first = 0;
      continue;
    } /* the status line */
    char *colon = memchr(line, ':', len);
    if (!colon || colon == line) continue;
    size_t kl = (size_t)(colon - line);
    char key[256];
    if (kl >= sizeof key) continue;
    for (size_t k = 0; k < kl; k++) key[k] = (char)tolower((unsigned char)line[k]);
    char *v = colon + 1, *ve = line + len;
    while (v < ve && (*v == ' ' || *v == '\t')) v++;
    while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
    lua_pushlstring(L, key, kl);
    if (lua_rawget(L, -2) == LUA_TSTRING) {
      lua_pushliteral(L, ", ");
      lua_pushlstring(L, v, (size_t)(ve - v));
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushlstring(L, v, (size_t)(ve - v));
    }
    lua_pushlstring(L, key, kl);
    lua_insert(L, -2);
    lua_rawset(L, -3);
  }
}

/* A transport error: nil, message, libcurl's code (a number: CURLcode / CURLMcode, no errno). */
static int curl_fail(lua_State *L, int code, const char *fmt, const char *a, const char *b) {
  lua_pushnil(L);
  lua_pushfstring(L, fmt, a, b);
  lua_pushinteger(L, code);
  return 3;
}

static int finish(lua_State *L, req *r) {
  lua_getfield(L, 1, "url");
  const char *url = lua_tostring(L, -1); /* anchored by the option table */
  lua_pop(L, 1);
  if (r->too_large)
    return cl_failf(L, E2BIG, "http: response body from %s larger than %I bytes", url,
                    (lua_Integer)r->max_body);
  if (r->headers_too_large)
    return cl_failf(L, E2BIG, "http: response headers from %s larger than %I bytes", url,
                    (lua_Integer)MAX_HEADER_BYTES);
  if (r->result == CURLE_OPERATION_TIMEDOUT) return cl_timed_out(L);
  if (r->result != CURLE_OK) {
    const char *msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->result);
    return curl_fail(L, (int)r->result, "http: %s (%s)", msg, url);
  }
  long status = 0;
  char *eff = NULL;
  double total = 0;
  curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &eff);
  curl_easy_getinfo(r->easy, CURLINFO_TOTAL_TIME, &total);
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, status);
  lua_setfield(L, -2, "status");
  push_headers(L, r);
  lua_setfield(L, -2, "headers");
  if (!r->streaming) {
    lua_pushlstring(L, r->body ? r->body : "", r->body_len);
    lua_setfield(L, -2, "body");
  }
  lua_pushstring(L, eff ? eff : url);
  lua_setfield(L, -2, "url");
  lua_pushnumber(L, total);
  lua_setfield(L, -2, "elapsed");
  req_release(r);
  return 1;
}

static int request_k(lua_State *L, int status, lua_KContext ctx);

static int after_chunk_k(lua_State *L, int status, lua_KContext ctx) {
  req *r = lua_touserdata(L, (int)ctx - 1);
  if (status != LUA_OK && status != LUA_YIELD) { /* on_chunk raised: stop the transfer now */
    req_release(r);
    return lua_error(L);
  }
  int stop = lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (stop) {
    req_release(r);
    lua_getfield(L, 1, "url");
    return cl_failf(L, ECANCELED, "http: stopped by on_chunk (%s)", lua_tostring(L, -1));
  }
  return request_k(L, LUA_OK, ctx);
}

/* Waits for the transfer; in streaming mode hands each chunk to on_chunk on the way. */
static int request_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  req *r = lua_touserdata(L, (int)ctx - 1);
  if (r->streaming && r->body_len > 0) {
    lua_getfield(L, 1, "on_chunk");
    lua_pushlstring(L, r->body, r->body_len);
    r->body_len = 0;
    if (r->paused && r->easy) {
      r->paused = 0;
      curl_easy_pause(r->easy, CURLPAUSE_CONT);
    }
    return after_chunk_k(L, lua_pcallk(L, 1, 1, 0, ctx, after_chunk_k), ctx);
  }
  if (r->done) return finish(L, r);
  r->w = w;
  w->external = 1;
  return cl_wait_suspend(L, w, request_k, ctx);
}

static CURLcode set_method(CURL *e, const char *method, int has_body) {
  if (strcmp(method, "GET") == 0)
    return has_body ? curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method)
                    : curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  if (strcmp(method, "HEAD") == 0) return curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  if (strcmp(method, "POST") == 0 && has_body) return CURLE_OK;
  return curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
}

/* The request's headers (name = value, or "Name: value" lines), read before the easy handle
 * exists, so a bad field raises with nothing to release but r. */
static void read_headers(lua_State *L, req *r) {
  if (lua_getfield(L, 1, "headers") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "headers", "table expected");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      const char *line;
      if (lua_type(L, -2) == LUA_TSTRING) {
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
          cl_field_error(L, "headers", "string values expected");
        line = lua_pushfstring(L, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
      } else if (lua_type(L, -1) == LUA_TSTRING) {
        line = lua_pushstring(L, lua_tostring(L, -1));
      } else {
        cl_field_error(L, "headers", "name = value or \"Name: value\" entries expected");
      }
      if (strpbrk(line, "\r\n")) cl_field_error(L, "headers", "line breaks in a header");
      struct curl_slist *nl = curl_slist_append(r->headers, line);
      if (!nl) luaL_error(L, "http: out of memory");
      r->headers = nl;
      lua_pop(L, 2);
    }
  }
  lua_pop(L, 1);
}

/* Lua: http.request{url=, method="GET", headers={name=value}|{"Name: value"}, body=,
 * timeout=, connect_timeout=, unix_socket=, max_body=, follow=false, insecure=false,
 * keepalive=true, on_chunk=function(chunk) end} -> {status=, headers=, body=, url=, elapsed=} |
 * nil, err, code */
static int l_request(lua_State *L) {
  static const char *const fields[] = {"url",     "method",          "headers",     "body",
                                       "timeout", "connect_timeout", "unix_socket", "max_body",
                                       "follow",  "insecure",        "on_chunk",    "keepalive",
                                       NULL};
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  cl_check_fields(L, 1, fields);
  const char *url = cl_opt_string(L, 1, "url", NULL);
  if (!url) return cl_field_error(L, "url", "missing");
  const char *method = cl_opt_string(L, 1, "method", NULL);
  size_t body_len = 0;
  const char *body = NULL;
  if (lua_getfield(L, 1, "body") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TSTRING) cl_field_error(L, "body", "string expected");
    body = lua_tolstring(L, -1, &body_len);
  }
  lua_pop(L, 1);
  if (!method) method = body ? "POST" : "GET";
  for (const char *m = method; *m; m++)
    if (!isupper((unsigned char)*m))
      return cl_field_error(L, "method", "upper-case token expected");
  /* Seconds; nil: no limit; 0: nothing that needs the network can finish, so it times out. */
  double timeout = cl_opt_number(L, 1, "timeout", -1);
  double ctimeout = cl_opt_number(L, 1, "connect_timeout", -1);
  if (timeout < 0 && timeout != -1) cl_field_error(L, "timeout", "non-negative seconds expected");
  if (ctimeout < 0 && ctimeout != -1)
    cl_field_error(L, "connect_timeout", "non-negative seconds expected");
  const char *unix_socket = cl_opt_string(L, 1, "unix_socket", NULL);
  lua_Integer max_body = cl_opt_integer(L, 1, "max_body", (lua_Integer)DEFAULT_MAX_BODY);
  if (max_body < 0) cl_field_error(L, "max_body", "must not be negative");
  int follow = cl_opt_boolean(L, 1, "follow", 0);
  int insecure = cl_opt_boolean(L, 1, "insecure", 0);
  int keepalive = cl_opt_boolean(L, 1, "keepalive", 1);
  int t = lua_getfield(L, 1, "on_chunk");
  if (t != LUA_TNIL && t != LUA_TFUNCTION) cl_field_error(L, "on_chunk", "function expected");
  int streaming = t == LUA_TFUNCTION;
  lua_pop(L, 1);

  http_ctx *ctx = get_ctx(L);
  req *r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  luaL_setmetatable(L, REQ_MT);
  r->ctx = ctx;
  r->max_body = (size_t)max_body;
  r->streaming = streaming;

  read_headers(L, r);

  r->easy = curl_easy_init();
  if (!r->easy) return luaL_error(L, "http: curl_easy_init failed");
  CURL *e = r->easy;
  curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
  if (r->headers) curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
  if (body) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, body);
  }
  if (set_method(e, method, body != NULL) != CURLE_OK)
    return luaL_error(L, "http: cannot set method %s", method);
  /* curl reads 0 as "no limit": the shortest limit it has stands for 0. */
  if (timeout >= 0)
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout < 0.001 ? 1L : (long)(timeout * 1000));
  if (ctimeout >= 0)
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ctimeout < 0.001 ? 1L : (long)(ctimeout * 1000));
  if (unix_socket) curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, unix_socket);
  if (follow) {
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L);
  }
  if (!keepalive) { /* a connection of its own, closed when the transfer ends */
    curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L);
    curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 1L);
  }
  if (insecure) {
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  CURLMcode mc = curl_multi_add_handle(ctx->multi, e);
  if (mc != CURLM_OK) {
    req_release(r);
    return curl_fail(L, (int)mc, "http: %s (%s)", curl_multi_strerror(mc), url);
  }
  r->in_multi = 1;
  cl_wait *w = cl_wait_push(L);
  w->data = r;
  w->on_abort = on_abort;
  w->external = 1;
  r->w = w;
  return cl_wait_suspend(L, w, request_k, lua_gettop(L));
}

int cl_http_add(lua_State *L, void *easy, cl_http_done_fn done, void *arg) {
  http_ctx *ctx = get_ctx(L);
  ext_xfer *x = malloc(sizeof *x);
  if (!x) return ENOMEM;
  x->ext = 1;
  x->done = done;
  x->arg = arg;
  curl_easy_setopt(easy, CURLOPT_PRIVATE, (char *)x);
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  CURLMcode mc = curl_multi_add_handle(ctx->multi, easy);
  if (mc != CURLM_OK) {
    curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
    free(x);
    return EIO;
  }
  return 0;
}

void cl_http_remove(lua_State *L, void *easy) {
  int *tag = NULL;
  curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&tag);
  if (!tag || !*tag) return; /* finished (handed back) or never added */
  http_ctx *ctx = get_ctx(L);
  curl_multi_remove_handle(ctx->multi, easy);
  curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
  free(tag);
}

/* Lua: http.escape(s) percent-encodes a URL component. */
static int l_escape(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  char err[256];
  if (cl_curl_load(err, sizeof err)) return luaL_error(L, "http: %s", err);
  char *out = curl_easy_escape(NULL, s, (int)n);
  if (!out) return luaL_error(L, "http: out of memory");
  lua_pushstring(L, out);
  curl_free(out);
  return 1;
}

static const luaL_Reg funcs[] = {
    {"request", l_request},
    {"escape", l_escape},
    {NULL, NULL},
};

/* Lua: http.curl_version() -> the version of libcurl (loads it) | nil, err */
static int l_curl_version(lua_State *L) {
  char err[256];
  if (cl_curl_load(err, sizeof err)) return cl_failf(L, ENOENT, "http: %s", err);
  lua_pushstring(L, curl_version_info(CURLVERSION_NOW)->version);
  return 1;
}

int luaopen_clawlua_http(lua_State *L) {
  if (cl_entry_redirect(L, "http")) return 1;
  /* libcurl is loaded by the first request (curl_lazy.h), not here. */
  static const luaL_Reg meta[] = {{"__gc", req_gc}, {NULL, NULL}};
  static const cl_class cls = {REQ_MT, NULL, NULL, meta};
  cl_class_register(L, &cls);
  luaL_newlib(L, funcs);
  lua_pushcfunction(L, l_curl_version);
  lua_setfield(L, -2, "curl_version");
  return 1;
}
