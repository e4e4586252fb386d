/*
 * Audit records as text: a one-pass scanner that finds the top-level fields of a record (a ring
 * record or a line of a JSONL file) without building a Lua table, the human-readable form used
 * by the stderr sink and `clawlua audit tail`, and a streaming reader for JSONL files.
 *
 * The scanner is what lets file queries filter lines before decoding them, and verify check a
 * line's chain fields without parsing its detail. It accepts any JSON object but never reads
 * past the bytes it is given: a file may hold anything, tampered or torn lines included.
 *
 * The reader holds at most one chunk plus one line (a line longer than the largest possible
 * record is skipped and counted), so reading a file of any size takes bounded memory. A final
 * line without its newline is a torn write (a crash in the middle of write(2)): it is skipped
 * and counted, except in follow mode where it may still be completed.
 */
#include "audit_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define READER_MT      "clawlua.audit_reader"
#define CHUNK          65536
#define DEFAULT_BUDGET (1 << 20)

/* ------------------------------------------------------------------------------------------ */
/* Scanning                                                                                   */

static const char *skip_ws(const char *p, const char *e) {
  while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
  return p;
}

/* p at the opening quote; returns the position after the closing quote, or NULL. */
static const char *skip_string(const char *p, const char *e) {
  for (p++; p < e; p++) {
    if (*p == '\\') {
      p++;
      continue;
    }
    if (*p == '"') return p + 1;
  }
  return NULL;
}

static const char *skip_value(const char *p, const char *e) {
  if (p >= e) return NULL;
  if (*p == '"') return skip_string(p, e);
  if (*p == '{' || *p == '[') {
    int depth = 0;
    while (p < e) {
      char c = *p;
      if (c == '"') {
        p = skip_string(p, e);
        if (!p) return NULL;
        continue;
      }
      if (c == '{' || c == '[') {
        if (++depth > 1000) return NULL;
      } else if (c == '}' || c == ']') {
        if (--depth == 0) return p + 1;
      }
      p++;
    }
    return NULL;
  }
  const char *s = p;
  while (p < e && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t' && *p != '\r' &&
         *p != '\n')
    p++;
  return p > s ? p : NULL;
}

static int key_is(const char *k, size_t kl, const char *name) {
  return strlen(name) == kl && memcmp(k, name, kl) == 0;
}

static int parse_number(const char *s, size_t n, double *out) {
  char buf[48];
  if (n == 0 || n >= sizeof buf) return 0;
  memcpy(buf, s, n);
  buf[n] = 0;
  char *end;
  double d = strtod(buf, &end);
  if (*end || !isfinite(d)) return 0;
  *out = d;
  return 1;
}

static int parse_integer(const char *s, size_t n, long long *out) {
  char buf[32];
  if (n == 0 || n >= sizeof buf) return 0;
  memcpy(buf, s, n);
  buf[n] = 0;
  char *end;
  errno = 0;
  long long v = strtoll(buf, &end, 10);
  if (*end || errno) return 0;
  *out = v;
  return 1;
}

static int is_hex64(const char *s) {
  for (int i = 0; i < AUDIT_HEX; i++) {
    char c = s[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return 0;
  }
  return 1;
}

/* The chain fields as the sink writes them: exactly the last bytes of the line. */
static void find_chain(const char *s, size_t n, recview *v) {
  if (n < AUDIT_CHAIN_SUFFIX + 2) return;
  const char *t = s + n - AUDIT_CHAIN_SUFFIX;
  if (memcmp(t, ",\"prev\":\"", 9) != 0) return;
  if (memcmp(t + 9 + AUDIT_HEX, "\",\"hash\":\"", 10) != 0) return;
  if (memcmp(s + n - 2, "\"}", 2) != 0) return;
  if (!is_hex64(t + 9) || !is_hex64(t + 19 + AUDIT_HEX)) return;
  v->prev = t + 9;
  v->hash = t + 19 + AUDIT_HEX;
  v->body_end = (size_t)(t - s);
}

int audit_scan(const char *s, size_t n, recview *v) {
  memset(v, 0, sizeof *v);
  const char *p = s, *e = s + n;
  p = skip_ws(p, e);
  if (p >= e || *p != '{') return 0;
  p = skip_ws(p + 1, e);
  if (p < e && *p == '}') {
    p++;
  } else {
    for (;;) {
      if (p >= e || *p != '"') return 0;
      const char *kend = skip_string(p, e);
      if (!kend) return 0;
      const char *k = p + 1;
      size_t kl = (size_t)(kend - 1 - k);
      p = skip_ws(kend, e);
      if (p >= e || *p != ':') return 0;
      p = skip_ws(p + 1, e);
      const char *vs = p, *ve = skip_value(p, e);
      if (!ve) return 0;
      size_t vl = (size_t)(ve - vs);
      int str = *vs == '"';
      if (key_is(k, kl, "detail")) {
        v->detail = vs;
        v->detail_len = vl;
      } else if (key_is(k, kl, "kind") && str) {
        v->kind = vs + 1;
        v->kind_len = vl - 2;
      } else if (key_is(k, kl, "sandbox") && str) {
        v->sandbox = vs + 1;
        v->sandbox_len = vl - 2;
      } else if (key_is(k, kl, "pid")) {
        long long x;
        if (parse_integer(vs, vl, &x)) v->pid = (lua_Integer)x;
      } else if (key_is(k, kl, "seq")) {
        long long x;
        if (parse_integer(vs, vl, &x) && x >= 0) {
          v->seq = (uint64_t)x;
          v->has_seq = 1;
        }
      } else if (key_is(k, kl, "time")) {
        v->has_time = parse_number(vs, vl, &v->time);
      } else if (key_is(k, kl, "mono")) {
        parse_number(vs, vl, &v->mono);
      } else if (key_is(k, kl, "truncated")) {
        v->truncated = vl == 4 && memcmp(vs, "true", 4) == 0;
      }
      p = skip_ws(ve, e);
      if (p < e && *p == ',') {
        p = skip_ws(p + 1, e);
        continue;
      }
      if (p < e && *p == '}') {
        p++;
        break;
      }
      return 0;
    }
  }
  if (skip_ws(p, e) != e) return 0;
  find_chain(s, n, v);
  return 1;
}

static unsigned hexval(char c) {
  if (c >= '0' && c <= '9') return (unsigned)(c - '0');
  if (c >= 'a' && c <= 'f') return (unsigned)(c - 'a' + 10);
  if (c >= 'A' && c <= 'F') return (unsigned)(c - 'A' + 10);
  return 16;
}

/* Decodes the raw contents of a JSON string into out (at least n bytes); returns the length. */
static size_t unescape(const char *s, size_t n, char *out) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c != '\\' || i + 1 >= n) {
      out[o++] = c;
      continue;
    }
    c = s[++i];
    switch (c) {
    case 'b':
      out[o++] = '\b';
      break;
    case 'f':
      out[o++] = '\f';
      break;
    case 'n':
      out[o++] = '\n';
      break;
    case 'r':
      out[o++] = '\r';
      break;
    case 't':
      out[o++] = '\t';
      break;
    case 'u': {
      unsigned cp = 0;
      if (i + 4 >= n) return o;
      for (int k = 1; k <= 4; k++) cp = cp * 16 + hexval(s[i + (size_t)k]);
      i += 4;
      if (cp >= 0xd800 && cp < 0xdc00 && i + 6 < n && s[i + 1] == '\\' && s[i + 2] == 'u') {
        unsigned lo = 0;
        for (int k = 3; k <= 6; k++) lo = lo * 16 + hexval(s[i + (size_t)k]);
        if (lo >= 0xdc00 && lo < 0xe000) {
          cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          i += 6;
        }
      }
      if (cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000)) cp = 0xfffd;
      if (cp < 0x80) {
        out[o++] = (char)cp;
      } else if (cp < 0x800) {
        out[o++] = (char)(0xc0 | (cp >> 6));
        out[o++] = (char)(0x80 | (cp & 0x3f));
      } else if (cp < 0x10000) {
        out[o++] = (char)(0xe0 | (cp >> 12));
        out[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[o++] = (char)(0x80 | (cp & 0x3f));
      } else {
        out[o++] = (char)(0xf0 | (cp >> 18));
        out[o++] = (char)(0x80 | ((cp >> 12) & 0x3f));
        out[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[o++] = (char)(0x80 | (cp & 0x3f));
      }
      break;
    }
    default:
      out[o++] = c;
      break; /* \" \\ \/ */
    }
  }
  return o;
}

/* Does the raw JSON string s (n bytes) decode to the C string want? */
static int json_str_eq(const char *s, size_t n, const char *want) {
  if (!memchr(s, '\\', n)) return strlen(want) == n && memcmp(s, want, n) == 0;
  char buf[4 * AUDIT_SANDBOX_MAX];
  if (n > sizeof buf) return 0;
  size_t m = unescape(s, n, buf);
  return strlen(want) == m && memcmp(buf, want, m) == 0;
}

int audit_view_matches(const afilter *f, const recview *v) {
  if (f->after_seq && (!v->has_seq || v->seq <= f->after_seq)) return 0;
  if (f->kind && (!v->kind || !audit_kind_matches(f, v->kind, v->kind_len))) return 0;
  if (f->sandbox && (!v->sandbox || !json_str_eq(v->sandbox, v->sandbox_len, f->sandbox))) return 0;
  if (f->pid && f->pid != v->pid) return 0;
  if (f->since >= 0 && (!v->has_time || v->time < f->since)) return 0;
  if (f->until >= 0 && (!v->has_time || v->time > f->until)) return 0;
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* The human form: 2025-11-29T12:00:00.123Z #17 seccomp.kill [jail-7] pid=42 syscall=ptrace   */

typedef struct out {
  char *p;
  size_t n, max;
  int full;
} out;

static void put(out *o, const char *s, size_t n) {
  if (o->full) return;
  size_t room = o->max - o->n;
  if (n > room) {
    size_t k = room;
    while (k > 0 && ((unsigned char)s[k] & 0xc0) == 0x80) k--; /* whole characters */
    n = k;
    o->full = 1;
  }
  memcpy(o->p + o->n, s, n);
  o->n += n;
}

static void puts_(out *o, const char *s) {
  put(o, s, strlen(s));
}

/* Copies text for a terminal: control characters (an escape sequence planted in a tampered
 * file) become '?'. */
static void put_safe(out *o, const char *s, size_t n) {
  if (o->full) return;
  size_t i = 0;
  for (; i < n && o->n < o->max; i++) {
    unsigned char c = (unsigned char)s[i];
    o->p[o->n++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
  }
  if (i < n) { /* cut: not in the middle of a character */
    while (o->n > 0 && ((unsigned char)s[i] & 0xc0) == 0x80 && i > 0) {
      o->n--;
      i--;
    }
    o->full = 1;
  }
}

static const char *kind_color(const char *k, size_t n) {
  static const struct {
    const char *ns;
    const char *color;
  } colors[] = {
      {"seccomp", "\033[1;31m"}, {"fw", "\033[1;33m"},     {"vm", "\033[1;36m"},
      {"jail", "\033[1;35m"},    {"policy", "\033[1;34m"}, {"audit", "\033[2m"},
  };
  for (size_t i = 0; i < CL_ARRAY_LEN(colors); i++) {
    size_t l = strlen(colors[i].ns);
    if (n >= l && memcmp(k, colors[i].ns, l) == 0 && (n == l || k[l] == '.'))
      return colors[i].color;
  }
  return "\033[1m";
}

/* A string value is shown bare when that is unambiguous. */
static int bare_ok(const char *s, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (c == ' ' || c == '"' || c == '\\' || c == '=' || (unsigned char)c < 0x20) return 0;
  }
  return 1;
}

static void format_detail(out *o, const char *d, size_t n) {
  const char *p = d, *e = d + n;
  p = skip_ws(p, e);
  if (p >= e || *p != '{') {
    put(o, " ", 1);
    put_safe(o, d, n);
    return;
  }
  p = skip_ws(p + 1, e);
  while (p < e && *p == '"') {
    const char *kend = skip_string(p, e);
    if (!kend) return;
    const char *q = skip_ws(kend, e);
    if (q >= e || *q != ':') return;
    const char *vs = skip_ws(q + 1, e), *ve = skip_value(vs, e);
    if (!ve) return;
    put(o, " ", 1);
    put_safe(o, p + 1, (size_t)(kend - p - 2));
    put(o, "=", 1);
    if (*vs == '"' && bare_ok(vs + 1, (size_t)(ve - vs - 2)))
      put_safe(o, vs + 1, (size_t)(ve - vs - 2));
    else
      put_safe(o, vs, (size_t)(ve - vs));
    p = skip_ws(ve, e);
    if (p < e && *p == ',') p = skip_ws(p + 1, e);
  }
}

size_t audit_format(const recview *v, int color, char *buf, size_t max) {
  out o = {buf, 0, max > 4 ? max - 4 : 0, 0};
  char tmp[96];
  if (v->has_time) {
    time_t t = (time_t)v->time; /* times are positive: the cast is floor() */
    struct tm tm;
    gmtime_r(&t, &tm);
    int ms = (int)((v->time - (double)t) * 1000.0);
    if (ms > 999) ms = 999;
    size_t l = strftime(tmp, sizeof tmp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(tmp + l, sizeof tmp - l, ".%03dZ ", ms);
    if (color) puts_(&o, "\033[2m");
    puts_(&o, tmp);
    if (color) puts_(&o, "\033[0m");
  }
  if (v->has_seq) {
    snprintf(tmp, sizeof tmp, "#%llu ", (unsigned long long)v->seq);
    puts_(&o, tmp);
  }
  const char *k = v->kind ? v->kind : "?";
  size_t kl = v->kind ? v->kind_len : 1;
  if (color) puts_(&o, kind_color(k, kl));
  put_safe(&o, k, kl);
  if (color) puts_(&o, "\033[0m");
  if (v->sandbox) {
    put(&o, " [", 2);
    put_safe(&o, v->sandbox, v->sandbox_len);
    put(&o, "]", 1);
  }
  if (v->pid) {
    snprintf(tmp, sizeof tmp, " pid=%lld", (long long)v->pid);
    puts_(&o, tmp);
  }
  if (v->detail) format_detail(&o, v->detail, v->detail_len);
  if (v->truncated) puts_(&o, " (truncated)");
  size_t n = o.n;
  if (o.full) {            /* mark the cut (put() cut on a character boundary) */
    buf[n++] = (char)0xe2; /* U+2026 ... */
    buf[n++] = (char)0x80;
    buf[n++] = (char)0xa6;
  }
  return n;
}

/* Lua: audit.format(line_or_event, [{color=false, max=1024}]) -> string */
int audit_l_format(lua_State *L) {
  static const char *const fields[] = {"color", "max", NULL};
  int color = 0;
  lua_Integer max = 1024;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    cl_check_fields(L, 2, fields);
    color = cl_opt_boolean(L, 2, "color", 0);
    max = cl_opt_integer(L, 2, "max", 1024);
    if (max < 16 || max > 1 << 20) cl_field_error(L, "max", "must be 16..1048576");
  }
  size_t n;
  const char *s;
  if (lua_type(L, 1) == LUA_TTABLE) {
    cl_buf b = {0};
    cl_json_lenient o = {.max_depth = 16, .sort_keys = 1};
    int r = cl_json_encode_lenient(L, 1, &b, &o, NULL);
    if (r > 0) lua_pushlstring(L, b.p ? b.p : "", b.n);
    free(b.p);
    if (r < 0) lua_pushliteral(L, "json: output larger than the limit");
    if (r <= 0) return lua_error(L);
    s = lua_tolstring(L, -1, &n);
  } else {
    s = luaL_checklstring(L, 1, &n);
  }
  while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r')) n--;
  recview v;
  if (!audit_scan(s, n, &v)) return cl_failf(L, EINVAL, "audit.format: not an audit record");
  char *buf = lua_newuserdatauv(L, (size_t)max + 8, 0);
  size_t len = audit_format(&v, color, buf, (size_t)max + 4);
  lua_pushlstring(L, buf, len);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Reading JSONL files                                                                        */

typedef struct reader {
  int fd;
  int closed;
  int follow, raw;
  char *buf;
  size_t off, len, cap;
  int skipping; /* inside a line longer than AUDIT_MAX_LINE */
  off_t pos;    /* file offset of buf[len] */
  dev_t dev;
  ino_t ino;
  lua_Integer lineno;
  lua_Integer lines, matched, malformed, torn, too_long, reopened, gaps;
  int have_hash;
  char last_hash[AUDIT_HEX]; /* of the last record read: finds the file that continues it */
  afilter f;
} reader;

static reader *check_reader(lua_State *L) {
  return CL_CHECK_OPEN(L, 1, reader, closed, READER_MT, "audit_reader");
}

static void reader_release(reader *r) {
  if (r->closed) return;
  r->closed = 1;
  if (r->fd >= 0) close(r->fd);
  r->fd = -1;
  free(r->buf);
  r->buf = NULL;
}

static int reader_close(lua_State *L) {
  reader_release(luaL_checkudata(L, 1, READER_MT));
  lua_pushboolean(L, 1);
  return 1;
}

/* Does the file on fd begin with a record chained to hash? 1: yes; 0: no; -1: its first line
 * is not all there yet (a sink made it a moment ago), so it cannot tell. */
static int starts_after(int fd, const char *hash) {
  char buf[8192];
  ssize_t n = pread(fd, buf, sizeof buf, 0);
  if (n < 0) return 0;
  char *nl = memchr(buf, '\n', (size_t)n);
  if (!nl) return n < (ssize_t)sizeof buf ? -1 : 0;
  recview v;
  if (!audit_scan(buf, (size_t)(nl - buf), &v) || !v.prev) return 0;
  return memcmp(v.prev, hash, AUDIT_HEX) == 0;
}

/* Opens path again after a rotation or truncation (follow mode). 1 when reopened. */
static int reader_reopen(lua_State *L, reader *r) {
  const char *path = NULL;
  lua_getiuservalue(L, 1, 2);
  path = lua_tostring(L, -1);
  lua_pop(L, 1); /* the path string stays anchored in the user value */
  struct stat st, cur;
  if (!path || stat(path, &st) < 0) return 0;
  if (fstat(r->fd, &cur) < 0) return 0;
  if (st.st_dev == r->dev && st.st_ino == r->ino) {
    if (st.st_size >= r->pos) return 0;
    /* Truncated. When only the unfinished line went (a sink cut a torn record when it opened
     * the file again), carry on from there; otherwise start over. */
    size_t pend = r->len - r->off;
    off_t start = r->pos - (off_t)pend;
    r->off = r->len = 0;
    r->skipping = 0;
    r->pos = st.st_size >= start ? start : 0;
    if (pend) r->torn++;
    lseek(r->fd, r->pos, SEEK_SET);
    return 1;
  }
  /* Rotated (or replaced). The old file may have grown between our end-of-file and the
   * rotation: read it to its end first, or its last records (and the chain through the files
   * rotated since) would be skipped. */
  if (cur.st_size > r->pos) return 1;
  /* Several rotations may have happened since the last look: the file
   * that continues ours is the one whose anchor links to our last record, be it path or one of
   * path.1, path.2, ... */
  int fd = -1, unfinished = 0, hole = 0;
  if (r->have_hash) {
    char name[PATH_MAX];
    for (int i = 0; i <= 1000 && fd < 0; i++) {
      if (i == 0)
        snprintf(name, sizeof name, "%s", path);
      else
        snprintf(name, sizeof name, "%s.%d", path, i);
      int c = open(name, O_RDONLY | O_CLOEXEC);
      if (c < 0) {
        /* A rotation moves path.N to path.N+1 from the top down, so while it runs one number
         * is missing: look one further before taking it for the end. */
        if (i == 0) continue;
        if (hole) break;
        hole = 1;
        continue;
      }
      hole = 0;
      struct stat cs;
      int after = 0;
      if (fstat(c, &cs) == 0 && !(cs.st_dev == r->dev && cs.st_ino == r->ino))
        after = starts_after(c, r->last_hash);
      if (after > 0) {
        fd = c;
        st = cs;
      } else {
        if (after < 0) unfinished = 1;
        close(c);
      }
    }
  }
  /* A file without its first record yet may be the one that continues ours: look again at the
   * next call rather than jump to whatever path is now. Jumping lost whole files when the
   * writer filled and rotated that file meanwhile (the new one at path did not chain). */
  if (fd < 0 && unfinished) return 0;
  if (fd < 0) {
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    if (fstat(fd, &st) < 0 || (st.st_dev == r->dev && st.st_ino == r->ino)) {
      close(fd);
      return 0;
    }
    if (r->have_hash) r->gaps++; /* what came between was rotated away before we got to it */
  }
  if (r->len > r->off) r->torn++; /* the old file ended in an unfinished line */
  close(r->fd);
  r->fd = fd;
  r->dev = st.st_dev;
  r->ino = st.st_ino;
  r->pos = 0;
  r->off = r->len = 0;
  r->skipping = 0;
  r->lineno = 0;
  r->reopened++;
  return 1;
}

/* Reads more into the buffer. 1: got bytes; 0: EOF; -1: error (errno). */
static int reader_fill(reader *r) {
  if (r->off > 0) {
    memmove(r->buf, r->buf + r->off, r->len - r->off);
    r->len -= r->off;
    r->off = 0;
  }
  if (r->len == r->cap) { /* one line fills the buffer: grow up to the longest record */
    size_t ncap = r->cap ? r->cap * 2 : CHUNK;
    if (ncap > AUDIT_MAX_LINE + CHUNK) ncap = AUDIT_MAX_LINE + CHUNK;
    if (ncap <= r->cap) { /* over the limit: drop what we have and skip to the newline */
      r->skipping = 1;
      r->len = 0;
    } else {
      char *nb = realloc(r->buf, ncap);
      if (!nb) return -1;
      r->buf = nb;
      r->cap = ncap;
    }
  }
  ssize_t n;
  do n = read(r->fd, r->buf + r->len, r->cap - r->len);
  while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  if (n == 0) return 0;
  r->len += (size_t)n;
  r->pos += n;
  return 1;
}

/* Lua: reader:next([budget]) -> event|line, lineno | false (budget spent, call again) | nil
 * (end of file; in follow mode: nothing more yet) | nil, err, errno */
static int reader_next(lua_State *L) {
  reader *r = check_reader(L);
  lua_Integer budget = luaL_optinteger(L, 2, DEFAULT_BUDGET);
  size_t scanned = 0;
  for (;;) {
    char *nl = r->len > r->off ? memchr(r->buf + r->off, '\n', r->len - r->off) : NULL;
    if (!nl) {
      if (scanned >= (size_t)budget) {
        lua_pushboolean(L, 0);
        return 1;
      }
      int rc = reader_fill(r);
      if (rc < 0) return cl_fail(L, "audit.reader", errno);
      if (rc > 0) {
        scanned += CHUNK;
        continue;
      }
      /* End of the data there is now. */
      if (r->follow) {
        if (reader_reopen(L, r)) continue;
        return 0;
      }
      if (r->len > r->off || r->skipping) { /* a final line without newline: torn */
        if (!r->skipping) r->torn++;
        r->off = r->len = 0;
        r->skipping = 0;
      }
      return 0;
    }
    char *line = r->buf + r->off;
    size_t n = (size_t)(nl - line);
    r->off += n + 1;
    r->lineno++;
    if (r->skipping) {
      r->skipping = 0;
      r->too_long++;
      continue;
    }
    scanned += n + 1;
    r->lines++;
    if (n > 0 && line[n - 1] == '\r') n--;
    if (n == 0) continue;
    recview v;
    if (!audit_scan(line, n, &v)) {
      r->malformed++;
      continue;
    }
    if (v.hash) {
      memcpy(r->last_hash, v.hash, AUDIT_HEX);
      r->have_hash = 1;
    }
    if (!audit_view_matches(&r->f, &v)) {
      if (scanned >= (size_t)budget) {
        lua_pushboolean(L, 0);
        return 1;
      }
      continue;
    }
    r->matched++;
    if (r->raw) {
      lua_pushlstring(L, line, n);
    } else if (!cl_json_decode(L, line, n)) {
      lua_pop(L, 2); /* scanned but not valid JSON after all (bad escapes, bad UTF-8) */
      r->malformed++;
      r->matched--;
      continue;
    }
    lua_pushinteger(L, r->lineno);
    return 2;
  }
}

static int reader_stats(lua_State *L) {
  reader *r = luaL_checkudata(L, 1, READER_MT);
  lua_createtable(L, 0, 7);
  lua_pushinteger(L, r->lines);
  lua_setfield(L, -2, "lines");
  lua_pushinteger(L, r->matched);
  lua_setfield(L, -2, "matched");
  lua_pushinteger(L, r->malformed);
  lua_setfield(L, -2, "malformed");
  lua_pushinteger(L, r->torn);
  lua_setfield(L, -2, "torn");
  lua_pushinteger(L, r->too_long);
  lua_setfield(L, -2, "too_long");
  lua_pushinteger(L, r->reopened);
  lua_setfield(L, -2, "reopened");
  lua_pushinteger(L, r->gaps);
  lua_setfield(L, -2, "gaps");
  lua_pushinteger(L, r->lineno);
  lua_setfield(L, -2, "lineno");
  return 1;
}

/* Lua: audit.reader(path, [{filter=, follow=false, raw=false, from="start"|"end"}]) -> reader
 * or nil, err, errno. The filter is the one of audit.events, without limit. */
int audit_reader_open(lua_State *L) {
  static const char *const fields[] = {"filter", "follow", "raw", "from", NULL};
  static const char *const filter_fields[] = {"kind",  "sandbox", "vm",        "pid",
                                              "since", "until",   "after_seq", NULL};
  const char *path = luaL_checkstring(L, 1);
  int follow = 0, raw = 0, at_end = 0;
  lua_settop(L, 2);
  if (!lua_isnil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    cl_check_fields(L, 2, fields);
    follow = cl_opt_boolean(L, 2, "follow", 0);
    raw = cl_opt_boolean(L, 2, "raw", 0);
    const char *from = cl_opt_string(L, 2, "from", "start");
    if (strcmp(from, "end") == 0)
      at_end = 1;
    else if (strcmp(from, "start") != 0)
      cl_field_error(L, "from", "\"start\" or \"end\" expected");
    lua_getfield(L, 2, "filter");
  } else {
    lua_pushnil(L);
  }
  /* stack: path, opts, filter */
  reader *r = lua_newuserdatauv(L, sizeof *r, 2);
  memset(r, 0, sizeof *r);
  r->fd = -1;
  r->closed = 1;
  luaL_setmetatable(L, READER_MT);
  /* A private copy of the filter keeps the strings the reader points to alive. */
  lua_newtable(L);
  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
  }
  audit_read_filter(L, -1, &r->f, filter_fields);
  lua_setiuservalue(L, -2, 1);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 2);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return cl_failf(L, err, "audit.reader %s: %s", path, strerror(err));
  }
  struct stat st;
  if (fstat(fd, &st) < 0 || S_ISDIR(st.st_mode)) {
    int err = S_ISDIR(st.st_mode) ? EISDIR : errno;
    close(fd);
    return cl_failf(L, err, "audit.reader %s: %s", path, strerror(err));
  }
  r->buf = malloc(CHUNK);
  if (!r->buf) {
    close(fd);
    return cl_fail(L, "audit.reader", ENOMEM);
  }
  r->fd = fd;
  r->closed = 0;
  r->cap = CHUNK;
  r->follow = follow;
  r->raw = raw;
  r->dev = st.st_dev;
  r->ino = st.st_ino;
  if (at_end) r->pos = lseek(fd, 0, SEEK_END);
  return 1;
}

void audit_record_register(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"next", reader_next},
      {"stats", reader_stats},
      {"close", reader_close},
      {NULL, NULL},
  };
  static const cl_class cls = {READER_MT, methods, reader_close, NULL};
  cl_class_register(L, &cls);
}
