/*
 * The hash chain of audit log files and its verifier.
 *
 * A file sink writes each record as the ring holds it, with two fields appended before the
 * closing brace: "prev", the hash of the record written before it, and "hash" =
 * SHA-256(prev as 64 hex digits || the record without its chain fields). The hash covers the
 * exact bytes on the line (no re-serialisation is needed to check it), and each record commits
 * to every record before it. The first record of every file is an "audit.anchor" event whose
 * prev is the hash of the last record of the previous file, or 64 zeros (genesis) for a new
 * chain, so a rotated set of files is one chain.
 *
 * verify reads a file once, in bounded memory, and classifies every break of the chain:
 *   modified   the record does not match its hash (or, its hash recomputed, no longer links)
 *   deleted    the record a line links to is missing
 *   inserted   a line that is not part of the chain (a forged branch, a copy of another line)
 *   reordered  a line that links to a record found later (or earlier) in the file
 *   malformed  a line that is not a chained record at all
 *   anchor     the file does not start where the previous file ended
 * A break is classified with the WINDOW lines on each side of it: records moved further than
 * that are reported as a deletion plus an insertion. A torn final line (a crash in the middle of
 * a write) is reported, not counted as tampering: the chain verifies up to the last whole
 * record. What no chain can show without a copy of its head kept elsewhere: records cut from
 * the end of the newest file, or a file rewritten from some point on with hashes recomputed.
 */
#include "audit_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sha256.h"

#define VERIFIER_MT "clawlua.audit_verifier"
#define WINDOW      1024
#define WCAP        (2 * WINDOW + 2)
#define MAX_ISSUES  1000
#define CHUNK       65536

const char audit_genesis[AUDIT_HEX + 1] =
    "0000000000000000000000000000000000000000000000000000000000000000";

/* ------------------------------------------------------------------------------------------ */
/* Hashing                                                                                    */

int audit_chain_hash(const char *prev_hex, const char *body, size_t body_len, const char *tail,
                     size_t tail_len, char *hex) {
  static const char digits[] = "0123456789abcdef";
  cl_sha256_ctx ctx;
  unsigned char out[CL_SHA256_LEN];
  cl_sha256_init(&ctx);
  cl_sha256_update(&ctx, prev_hex, AUDIT_HEX);
  cl_sha256_update(&ctx, body, body_len);
  if (tail_len) cl_sha256_update(&ctx, tail, tail_len);
  cl_sha256_final(&ctx, out);
  for (int i = 0; i < CL_SHA256_LEN; i++) {
    hex[2 * i] = digits[out[i] >> 4];
    hex[2 * i + 1] = digits[out[i] & 15];
  }
  return 1;
}

/* Checks a scanned line's own hash: SHA-256(prev || line without the chain fields || "}"). */
static int line_hash_ok(const char *line, const recview *v) {
  char hex[AUDIT_HEX];
  if (!audit_chain_hash(v->prev, line, v->body_end, "}", 1, hex)) return 0;
  return memcmp(hex, v->hash, AUDIT_HEX) == 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Verifier                                                                                   */

enum {
  F_MALFORMED = 1,
  F_BADHASH = 2,
  F_ANCHOR = 4,
  F_PREPLACED = 8,
  F_WAITING = 16,
  F_MEMBER = 32
};
enum { I_MODIFIED, I_DELETED, I_INSERTED, I_REORDERED, I_MALFORMED, I_ANCHOR };
static const char *const issue_names[] = {"modified",  "deleted",   "inserted",
                                          "reordered", "malformed", "anchor"};

typedef struct ventry {
  lua_Integer line; /* 0: empty slot */
  uint64_t seq;
  int has_seq;
  unsigned flags;
  char hash[AUDIT_HEX], prev[AUDIT_HEX];
} ventry;

typedef struct issue {
  lua_Integer line;
  uint64_t seq;
  int has_seq, kind;
  char msg[200];
} issue;

typedef struct verifier {
  int fd, closed, eof, done;
  char *buf;
  size_t off, len, cap;
  int skipping;
  lua_Integer lineno;      /* lines read */
  lua_Integer next_decide; /* next line to classify */
  ventry win[WCAP];
  /* the chain so far */
  int have_last, last_badhash;
  lua_Integer last_malformed_line;
  int nwaiting; /* lines waiting in the window for the record they follow */
  char last_hash[AUDIT_HEX];
  lua_Integer last_line;
  uint64_t last_seq;
  int last_has_seq;
  /* the previous file, when verifying a rotated set */
  int has_expect;
  char expect[AUDIT_HEX];
  /* results */
  issue *issues;
  size_t nissues;
  lua_Integer total_issues, records, malformed, torn_bytes;
  int torn, first_anchor, first_genesis;
  char first_prev[AUDIT_HEX];
  uint64_t first_seq, max_seq;
  int have_first;
} verifier;

static ventry *get(verifier *v, lua_Integer line) {
  if (line <= 0) return NULL;
  ventry *e = &v->win[line % WCAP];
  return e->line == line ? e : NULL;
}

static void add_issue(verifier *v, const ventry *e, int kind, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void add_issue(verifier *v, const ventry *e, int kind, const char *fmt, ...) {
  v->total_issues++;
  if (v->nissues >= MAX_ISSUES) return;
  if (!v->issues) {
    v->issues = calloc(MAX_ISSUES, sizeof *v->issues);
    if (!v->issues) return;
  }
  issue *is = &v->issues[v->nissues++];
  is->line = e->line;
  is->seq = e->seq;
  is->has_seq = e->has_seq;
  is->kind = kind;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(is->msg, sizeof is->msg, fmt, ap);
  va_end(ap);
}

/* Nearest other line in the window whose hash is hex; `before`: only lines before x. */
static ventry *find_hash(verifier *v, const char *hex, lua_Integer x, int before) {
  ventry *best = NULL;
  lua_Integer bestd = 0;
  for (int i = 0; i < WCAP; i++) {
    ventry *e = &v->win[i];
    if (!e->line || e->line == x || (e->flags & F_MALFORMED)) continue;
    if (before && e->line > x) continue;
    if (memcmp(e->hash, hex, AUDIT_HEX) != 0) continue;
    lua_Integer d = e->line > x ? e->line - x : x - e->line;
    if (!best || d < bestd) {
      best = e;
      bestd = d;
    }
  }
  return best;
}

static void seq_desc(const ventry *e, char *out, size_t n) {
  if (e->has_seq)
    snprintf(out, n, "seq %llu", (unsigned long long)e->seq);
  else
    snprintf(out, n, "no seq");
}

static void accept(verifier *v, ventry *e) {
  for (;;) {
    if (e->flags & F_WAITING) v->nwaiting--;
    e->flags |= F_MEMBER;
    e->flags &= ~(unsigned)F_WAITING;
    v->have_last = 1;
    memcpy(v->last_hash, e->hash, AUDIT_HEX);
    v->last_line = e->line;
    v->last_seq = e->seq;
    v->last_has_seq = e->has_seq;
    v->last_badhash = (e->flags & F_BADHASH) != 0;
    v->records++;
    /* A line seen earlier that was waiting for this one follows it now. */
    ventry *w = NULL;
    for (int i = 0; v->nwaiting > 0 && i < WCAP; i++) {
      ventry *c = &v->win[i];
      if (c->line && (c->flags & F_WAITING) && memcmp(c->prev, e->hash, AUDIT_HEX) == 0) {
        w = c;
        break;
      }
    }
    if (!w) return;
    e = w;
  }
}

static void decide_first(verifier *v, ventry *e) {
  memcpy(v->first_prev, e->prev, AUDIT_HEX);
  v->first_anchor = (e->flags & F_ANCHOR) != 0;
  v->first_genesis = memcmp(e->prev, audit_genesis, AUDIT_HEX) == 0;
  if (!(e->flags & F_ANCHOR)) {
    add_issue(v, e, I_DELETED,
              "the first record is not an audit.anchor: records were removed from the start "
              "of the file");
  } else if (v->has_expect && !v->first_genesis && memcmp(e->prev, v->expect, AUDIT_HEX) != 0) {
    /* (an anchor with the genesis link starts a chain of its own: a different log) */
    add_issue(v, e, I_ANCHOR,
              "the file does not continue the previous file: its anchor links to %.12s..., the "
              "previous file ends with %.12s... (a file between them is missing, or the "
              "previous one was cut or changed)",
              e->prev, v->expect);
  }
  accept(v, e);
}

static void decide(verifier *v, lua_Integer x) {
  ventry *e = get(v, x);
  if (!e) return;
  char sd[48], ld[48];
  if (e->flags & F_MALFORMED) {
    add_issue(v, e, I_MALFORMED, "not a chained audit record");
    v->last_malformed_line = x;
    return;
  }
  if (e->flags & F_PREPLACED) return; /* accepted already, where it belongs */
  int after_malformed = v->last_malformed_line == x - 1;
  if (e->flags & F_BADHASH) add_issue(v, e, I_MODIFIED, "the record does not match its hash");
  if (!v->have_last) {
    decide_first(v, e);
    return;
  }
  if (memcmp(e->prev, v->last_hash, AUDIT_HEX) == 0 || (e->flags & F_BADHASH)) {
    accept(v, e);
    return;
  }
  /* The chain breaks before this line. */
  ventry *dup = find_hash(v, e->hash, x, 1);
  if (dup) {
    add_issue(v, e, I_INSERTED, "a copy of line %lld", (long long)dup->line);
    return;
  }
  ventry *p = find_hash(v, e->prev, x, 0);
  if (p && p->line > x) {
    if (memcmp(p->prev, v->last_hash, AUDIT_HEX) == 0 &&
        !(p->flags & (F_PREPLACED | F_WAITING | F_MEMBER))) {
      seq_desc(p, sd, sizeof sd);
      add_issue(v, p, I_REORDERED, "belongs before line %lld (after line %lld)", (long long)x,
                (long long)v->last_line);
      p->flags |= F_PREPLACED;
      accept(v, p);
      accept(v, e);
    } else {
      seq_desc(p, sd, sizeof sd);
      add_issue(v, e, I_REORDERED, "belongs after line %lld (%s)", (long long)p->line, sd);
      e->flags |= F_WAITING;
      v->nwaiting++;
    }
    return;
  }
  if (p && (p->flags & F_MEMBER)) {
    /* Lines after p in the chain were not part of it: a forged branch. */
    for (lua_Integer l = p->line + 1; l < x; l++) {
      ventry *m = get(v, l);
      if (!m || !(m->flags & F_MEMBER) || (m->flags & F_PREPLACED)) continue;
      m->flags &= ~(unsigned)F_MEMBER;
      v->records--;
      add_issue(v, m, I_INSERTED, "not part of the chain: the record after line %lld is line %lld",
                (long long)p->line, (long long)x);
    }
    accept(v, e);
    return;
  }
  if (p) {
    add_issue(v, e, I_REORDERED, "links to line %lld, which is out of place", (long long)p->line);
    accept(v, e);
    return;
  }
  /* Nothing in reach links here: what it follows is gone. */
  if (v->last_badhash || after_malformed) { /* explained by the damaged line before it */
    accept(v, e);
    return;
  }
  ventry last = {0};
  last.seq = v->last_seq;
  last.has_seq = v->last_has_seq;
  seq_desc(&last, ld, sizeof ld);
  if (v->last_has_seq && e->has_seq && e->seq == v->last_seq + 1) {
    ventry *l = get(v, v->last_line);
    ventry fake = {0};
    fake.line = v->last_line;
    fake.seq = v->last_seq;
    fake.has_seq = 1;
    add_issue(v, l ? l : &fake, I_MODIFIED,
              "rewritten with a recomputed hash: line %lld links to a different record",
              (long long)x);
  } else if (v->last_has_seq && e->has_seq && e->seq == v->last_seq + 2) {
    add_issue(v, e, I_DELETED,
              "records missing before this line: the previous record is line %lld (%s); "
              "seq %llu is not in the file",
              (long long)v->last_line, ld, (unsigned long long)v->last_seq + 1);
  } else if (v->last_has_seq && e->has_seq && e->seq > v->last_seq + 2) {
    add_issue(v, e, I_DELETED,
              "records missing before this line: the previous record is line %lld (%s); "
              "seq %llu..%llu are not in the file",
              (long long)v->last_line, ld, (unsigned long long)v->last_seq + 1,
              (unsigned long long)e->seq - 1);
  } else {
    add_issue(v, e, I_DELETED,
              "records missing before this line: the previous record is line %lld (%s)",
              (long long)v->last_line, ld);
  }
  accept(v, e);
}

static void take_line(verifier *v, const char *line, size_t n, int malformed) {
  lua_Integer x = ++v->lineno;
  ventry *e = &v->win[x % WCAP];
  if (e->line && (e->flags & F_WAITING)) v->nwaiting--; /* its record never came */
  memset(e, 0, sizeof *e);
  e->line = x;
  recview rv;
  if (malformed || !audit_scan(line, n, &rv) || !rv.prev) {
    e->flags = F_MALFORMED;
    v->malformed++;
  } else {
    memcpy(e->hash, rv.hash, AUDIT_HEX);
    memcpy(e->prev, rv.prev, AUDIT_HEX);
    e->seq = rv.seq;
    e->has_seq = rv.has_seq;
    if (rv.has_seq) {
      if (!v->have_first) {
        v->first_seq = rv.seq;
        v->have_first = 1;
      }
      if (rv.seq > v->max_seq) v->max_seq = rv.seq;
    }
    if (rv.kind && rv.kind_len == 12 && memcmp(rv.kind, "audit.anchor", 12) == 0)
      e->flags |= F_ANCHOR;
    if (!line_hash_ok(line, &rv)) e->flags |= F_BADHASH;
  }
  while (v->next_decide <= x - WINDOW) decide(v, v->next_decide++);
}

static verifier *check_verifier(lua_State *L) {
  return CL_CHECK_OPEN(L, 1, verifier, closed, VERIFIER_MT, "audit_verifier");
}

static void verifier_release(verifier *v) {
  if (v->closed) return;
  v->closed = 1;
  if (v->fd >= 0) close(v->fd);
  v->fd = -1;
  free(v->buf);
  v->buf = NULL;
  free(v->issues);
  v->issues = NULL;
}

/* Lua: verifier:step([max_lines]) -> true when the whole file is done, false to call again;
 * nil, err, errno on a read error. */
static int verifier_step(lua_State *L) {
  verifier *v = check_verifier(L);
  lua_Integer max = luaL_optinteger(L, 2, 100000);
  lua_Integer start = v->lineno;
  while (!v->done) {
    if (v->lineno - start >= max) {
      lua_pushboolean(L, 0);
      return 1;
    }
    char *nl = v->len > v->off ? memchr(v->buf + v->off, '\n', v->len - v->off) : NULL;
    if (nl) {
      char *line = v->buf + v->off;
      size_t n = (size_t)(nl - line);
      v->off += n + 1;
      if (v->skipping) {
        v->skipping = 0;
        take_line(v, "", 0, 1);
        continue;
      }
      take_line(v, line, n, 0);
      continue;
    }
    if (v->eof) {
      if (v->len > v->off || v->skipping) { /* an unfinished last line */
        v->torn = 1;
        v->torn_bytes = (lua_Integer)(v->len - v->off);
      }
      v->len = v->off = 0;
      while (v->next_decide <= v->lineno) decide(v, v->next_decide++);
      v->done = 1;
      break;
    }
    if (v->off > 0) {
      memmove(v->buf, v->buf + v->off, v->len - v->off);
      v->len -= v->off;
      v->off = 0;
    }
    if (v->len == v->cap) {
      size_t ncap = v->cap ? v->cap * 2 : CHUNK;
      if (ncap > AUDIT_MAX_LINE + CHUNK) {
        v->skipping = 1; /* longer than any record: malformed, skip to its end */
        v->len = 0;
      } else {
        char *nb = realloc(v->buf, ncap);
        if (!nb) return cl_fail(L, "audit.verify", ENOMEM);
        v->buf = nb;
        v->cap = ncap;
      }
    }
    ssize_t r;
    do r = read(v->fd, v->buf + v->len, v->cap - v->len);
    while (r < 0 && errno == EINTR);
    if (r < 0) return cl_fail(L, "audit.verify", errno);
    if (r == 0) v->eof = 1;
    v->len += (size_t)r;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int cmp_issue(const void *pa, const void *pb) {
  const issue *a = pa, *b = pb;
  if (a->line != b->line) return a->line < b->line ? -1 : 1;
  return a->kind - b->kind;
}

/* Lua: verifier:result() -> {ok=, lines=, records=, issues={{line=, seq=, kind=, message=}},
 * issues_total=, torn=, torn_bytes=, first_seq=, last_seq=, last_hash=, anchor={...}} */
static int verifier_result(lua_State *L) {
  verifier *v = check_verifier(L);
  if (!v->done) return luaL_error(L, "audit verifier: result() before the file was read");
  if (v->nissues) qsort(v->issues, v->nissues, sizeof *v->issues, cmp_issue);
  lua_createtable(L, 0, 12);
  lua_pushboolean(L, v->total_issues == 0);
  lua_setfield(L, -2, "ok");
  lua_pushinteger(L, v->lineno);
  lua_setfield(L, -2, "lines");
  lua_pushinteger(L, v->records);
  lua_setfield(L, -2, "records");
  lua_pushinteger(L, v->total_issues);
  lua_setfield(L, -2, "issues_total");
  lua_pushboolean(L, v->torn);
  lua_setfield(L, -2, "torn");
  lua_pushinteger(L, v->torn_bytes);
  lua_setfield(L, -2, "torn_bytes");
  if (v->have_first) {
    lua_pushinteger(L, (lua_Integer)v->first_seq);
    lua_setfield(L, -2, "first_seq");
    lua_pushinteger(L, (lua_Integer)v->max_seq);
    lua_setfield(L, -2, "last_seq");
  }
  if (v->have_last) {
    lua_pushlstring(L, v->last_hash, AUDIT_HEX);
    lua_setfield(L, -2, "last_hash");
    lua_createtable(L, 0, 4);
    lua_pushlstring(L, v->first_prev, AUDIT_HEX);
    lua_setfield(L, -2, "prev");
    lua_pushboolean(L, v->first_anchor);
    lua_setfield(L, -2, "present");
    lua_pushboolean(L, v->first_genesis);
    lua_setfield(L, -2, "genesis");
    lua_pushboolean(L, v->has_expect && !v->first_genesis);
    lua_setfield(L, -2, "checked");
    lua_setfield(L, -2, "anchor");
  }
  lua_createtable(L, (int)v->nissues, 0);
  for (size_t i = 0; i < v->nissues; i++) {
    const issue *is = &v->issues[i];
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, is->line);
    lua_setfield(L, -2, "line");
    if (is->has_seq) {
      lua_pushinteger(L, (lua_Integer)is->seq);
      lua_setfield(L, -2, "seq");
    }
    lua_pushstring(L, issue_names[is->kind]);
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, is->msg);
    lua_setfield(L, -2, "message");
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "issues");
  return 1;
}

static int verifier_close(lua_State *L) {
  verifier_release(luaL_checkudata(L, 1, VERIFIER_MT));
  return 0;
}

static int is_hex_string(const char *s, size_t n) {
  if (n != AUDIT_HEX) return 0;
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
  return 1;
}

/* Lua: audit._verifier(path, [{prev=hex}]) -> verifier | nil, err, errno. prev: the hash of the
 * last record of the file before this one in a rotated set. */
int audit_verifier_open(lua_State *L) {
  static const char *const fields[] = {"prev", NULL};
  const char *path = luaL_checkstring(L, 1);
  const char *prev = NULL;
  size_t plen = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    cl_check_fields(L, 2, fields);
    prev = cl_opt_string(L, 2, "prev", NULL);
    if (prev) {
      plen = strlen(prev);
      if (!is_hex_string(prev, plen)) cl_field_error(L, "prev", "64 lowercase hex digits expected");
    }
  }
  verifier *v = lua_newuserdatauv(L, sizeof *v, 0);
  memset(v, 0, sizeof *v);
  v->fd = -1;
  v->closed = 1;
  v->next_decide = 1;
  v->last_malformed_line = -1;
  luaL_setmetatable(L, VERIFIER_MT);
  if (prev) {
    v->has_expect = 1;
    memcpy(v->expect, prev, AUDIT_HEX);
  }
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return cl_failf(L, err, "%s: %s", path, strerror(err));
  }
  struct stat st;
  if (fstat(fd, &st) < 0 || S_ISDIR(st.st_mode)) {
    int err = S_ISDIR(st.st_mode) ? EISDIR : errno;
    close(fd);
    return cl_failf(L, err, "%s: %s", path, strerror(err));
  }
  v->buf = malloc(CHUNK);
  if (!v->buf) {
    close(fd);
    return cl_fail(L, "audit.verify", ENOMEM);
  }
  v->cap = CHUNK;
  v->fd = fd;
  v->closed = 0;
  return 1;
}

/* Lua: audit._file_head(path) -> {seq=, kind=, prev=, hash=} of the first line ({} when the
 * file is empty or its first line is not a record) | nil, err, errno */
int audit_l_head(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return cl_failf(L, err, "%s: %s", path, strerror(err));
  }
  /* The first line, read in growing pieces: an anchor is short, a first record may not be. */
  size_t cap = 4096, len = 0;
  char *buf = malloc(cap);
  char *nl = NULL;
  int err = buf ? 0 : ENOMEM;
  while (!err && !nl) {
    if (len == cap) {
      if (cap >= (size_t)AUDIT_MAX_LINE * 2) break;
      char *nb = realloc(buf, cap * 2);
      if (!nb) {
        err = ENOMEM;
        break;
      }
      buf = nb;
      cap *= 2;
    }
    ssize_t r = read(fd, buf + len, cap - len);
    if (r < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    if (r == 0) break;
    nl = memchr(buf + len, '\n', (size_t)r);
    len += (size_t)r;
  }
  close(fd);
  if (err) {
    free(buf);
    return cl_failf(L, err, "%s: %s", path, strerror(err));
  }
  lua_newtable(L);
  recview v;
  if (nl && audit_scan(buf, (size_t)(nl - buf), &v)) {
    if (v.has_seq) {
      lua_pushinteger(L, (lua_Integer)v.seq);
      lua_setfield(L, -2, "seq");
    }
    if (v.kind) {
      lua_pushlstring(L, v.kind, v.kind_len);
      lua_setfield(L, -2, "kind");
    }
    if (v.prev) {
      lua_pushlstring(L, v.prev, AUDIT_HEX);
      lua_setfield(L, -2, "prev");
      lua_pushlstring(L, v.hash, AUDIT_HEX);
      lua_setfield(L, -2, "hash");
    }
  }
  free(buf);
  return 1;
}

void audit_chain_register(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"step", verifier_step},
      {"result", verifier_result},
      {"close", verifier_close},
      {NULL, NULL},
  };
  static const cl_class cls = {VERIFIER_MT, methods, verifier_close, NULL};
  cl_class_register(L, &cls);
}
