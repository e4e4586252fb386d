/*
 * The JSON encoder of clawlua.json: Lua values into one buffer, strict (json.encode) or lenient
 * (audit records: what cannot be encoded becomes a placeholder, long strings are cut).
 */
#include "json_int.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Encoder                                                                                     */

typedef struct strbuf {
  cl_buf buf;
  int busy; /* the per-state scratch buffer is in use (an encode inside __tojson) */
} strbuf;

static const char SCRATCH_KEY = 's';   /* registry: a strbuf reused across encodes */
static const char ARRAY_KEY = 'a';     /* registry: the json.array metatable, also by address */
static const char OBJECT_KEY = 'o';    /* registry: the json.object metatable, also by address */
#define SCRATCH_KEEP ((size_t)1 << 20) /* larger scratch buffers are freed after use */

static int strbuf_gc(lua_State *L) {
  strbuf *b = lua_touserdata(L, 1);
  free(b->buf.p);
  b->buf.p = NULL;
  return 0;
}

typedef struct encoder {
  lua_State *L;
  cl_buf *b;
  int depth, max_depth;
  size_t max_size;
  int pretty, sort_keys;
  /* The marker metatables, looked up when the first table with a metatable is met (most
   * encodes meet none): 0 for the array marker, 1 for the object marker, 2 for neither. */
  const void *markers[2];
  int have_markers;
  /* Lenient mode (audit records): what cannot be encoded becomes a "<placeholder>" string,
   * invalid UTF-8 becomes U+FFFD, strings longer than max_string are cut with a marker. */
  int lenient;
  size_t max_string;
  long replaced;           /* placeholders and cuts made in lenient mode */
  const char *const *skip; /* keys of the outermost object left out (NULL: none) */
  cl_json_keys *keys;      /* cached JSON of the outermost object's keys (NULL: none) */
  int too_large;           /* failed for the size limit */
  int path_hi;             /* path[0 .. path_hi-1] have been written (the rest reads as [0]) */
  const char *err;
  size_t lim; /* min(buffer capacity, max_size): the fast paths check only this */
  /* Not cleared per encode (written before they are read): */
  char errbuf[160];
  /* The path to the value being encoded, for error messages. */
  struct {
    const char *key;
    size_t keylen;
    lua_Integer index;
  } path[64];
} encoder;

static int enc_grow(encoder *e, size_t need) {
  cl_buf *b = e->b;
  if (b->n + need > e->max_size) {
    snprintf(e->errbuf, sizeof e->errbuf, "output larger than the limit of %zu bytes", e->max_size);
    e->err = e->errbuf;
    e->too_large = 1;
    return 0;
  }
  if (b->n + need > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + need) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      e->err = "out of memory";
      return 0;
    }
    b->p = p;
    b->cap = cap;
  }
  e->lim = b->cap < e->max_size ? b->cap : e->max_size;
  return 1;
}

static inline int put(encoder *e, const char *s, size_t n) {
  if (e->b->n + n > e->lim && !enc_grow(e, n)) return 0;
  memcpy(e->b->p + e->b->n, s, n);
  e->b->n += n;
  return 1;
}

static inline int putc_(encoder *e, char c) {
  if (e->b->n + 1 > e->lim && !enc_grow(e, 1)) return 0;
  e->b->p[e->b->n++] = c;
  return 1;
}

static void describe_path(encoder *e, char *out, size_t outlen) {
  size_t o = 0;
  o += (size_t)snprintf(out + o, outlen - o, "$");
  int n = e->depth < 64 ? e->depth : 64;
  for (int i = 0; i < n && o < outlen; i++) {
    if (i >= e->path_hi)
      o += (size_t)snprintf(out + o, outlen - o, "[0]");
    else if (e->path[i].key)
      o += (size_t)snprintf(out + o, outlen - o, ".%.*s",
                            (int)(e->path[i].keylen > 40 ? 40 : e->path[i].keylen), e->path[i].key);
    else
      o += (size_t)snprintf(out + o, outlen - o, "[%lld]", (long long)e->path[i].index);
  }
}

static int enc_fail(encoder *e, const char *what) {
  if (e->err) return 0;
  char path[96];
  describe_path(e, path, sizeof path);
  snprintf(e->errbuf, sizeof e->errbuf, "%s at %s", what, path);
  e->err = e->errbuf;
  return 0;
}

static const char hexdig[] = "0123456789abcdef";

static int enc_string(encoder *e, const char *s, size_t len);

/* A value that cannot be encoded: an error, or in lenient mode a placeholder string. */
static int enc_bad(encoder *e, const char *what, const char *placeholder) {
  if (!e->lenient) return enc_fail(e, what);
  e->replaced++;
  return enc_string(e, placeholder, strlen(placeholder));
}

/* 1 for bytes that end a run of plain ASCII: controls, '"', '\\' and non-ASCII. */
static const unsigned char special[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
};

/* Whether any of the 8 bytes at p is special (a control, '"', '\\' or non-ASCII): the plain runs
 * of a string are scanned a word at a time. */
static inline int special8(const unsigned char *p) {
  const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
  uint64_t w;
  memcpy(&w, p, 8);
  uint64_t quote = w ^ (ones * '"'), bslash = w ^ (ones * '\\');
  uint64_t lt_space = (w - ones * 0x20) & ~w;
  uint64_t zq = (quote - ones) & ~quote, zb = (bslash - ones) & ~bslash;
  return ((w | lt_space | zq | zb) & highs) != 0;
}

/* Whether the len bytes at p need no escaping (short strings: most keys and values). */
static inline int plain(const unsigned char *p, size_t len) {
  size_t i = 0;
  for (; i + 8 <= len; i += 8)
    if (special8(p + i)) return 0;
  for (; i < len; i++)
    if (special[p[i]]) return 0;
  return 1;
}

static int enc_string(encoder *e, const char *s, size_t len) {
  /* Short plain strings: one bounds check and one copy. */
  if (len <= 32 && e->b->n + len + 2 <= e->lim && (!e->max_string || len <= e->max_string) &&
      plain((const unsigned char *)s, len)) {
    char *o = e->b->p + e->b->n;
    o[0] = '"';
    memcpy(o + 1, s, len);
    o[len + 1] = '"';
    e->b->n += len + 2;
    return 1;
  }
  size_t cut = 0;
  if (e->lenient && e->max_string && len > e->max_string) {
    cut = len - e->max_string;
    len = e->max_string;
    while (len > 0 && ((unsigned char)s[len] & 0xC0) == 0x80) len--, cut++; /* whole chars */
    e->replaced++;
  }
  if (e->b->n + len + 2 > e->lim && !enc_grow(e, len + 2)) return 0;
  e->b->p[e->b->n++] = '"';
  const unsigned char *p = (const unsigned char *)s, *end = p + len, *run = p;
  while (p < end) {
    while (end - p >= 8 && !special8(p)) p += 8;
    while (p < end && !special[*p]) p++;
    if (p == end) break;
    unsigned c = *p;
    if (c >= 0x80) {
      /* Common 2- and 3-byte forms inline (no overlong or surrogate possible for these leads). */
      if (c >= 0xC2 && c <= 0xDF && end - p >= 2 && (p[1] & 0xC0) == 0x80) {
        p += 2;
        continue;
      }
      if (((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) && end - p >= 3 &&
          (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80) {
        p += 3;
        continue;
      }
      size_t n = utf8_len(p, end);
      if (n) {
        p += n;
        continue;
      }
      if (!e->lenient) return enc_fail(e, "invalid UTF-8 in string");
      if (!put(e, (const char *)run, (size_t)(p - run)) || !put(e, "\xef\xbf\xbd", 3)) return 0;
      e->replaced++;
      run = ++p;
      continue;
    }
    if (!put(e, (const char *)run, (size_t)(p - run))) return 0;
    char esc[6] = {'\\', 0};
    size_t n = 2;
    switch (c) {
    case '"':
      esc[1] = '"';
      break;
    case '\\':
      esc[1] = '\\';
      break;
    case '\n':
      esc[1] = 'n';
      break;
    case '\r':
      esc[1] = 'r';
      break;
    case '\t':
      esc[1] = 't';
      break;
    case '\b':
      esc[1] = 'b';
      break;
    case '\f':
      esc[1] = 'f';
      break;
    default:
      esc[1] = 'u';
      esc[2] = '0';
      esc[3] = '0';
      esc[4] = hexdig[c >> 4];
      esc[5] = hexdig[c & 15];
      n = 6;
    }
    if (!put(e, esc, n)) return 0;
    p++;
    run = p;
  }
  if (!put(e, (const char *)run, (size_t)(p - run))) return 0;
  if (cut) {
    char mark[48];
    int n = snprintf(mark, sizeof mark, "...[truncated %zu bytes]", cut);
    if (!put(e, mark, (size_t)n)) return 0;
  }
  return putc_(e, '"');
}

static int enc_integer(encoder *e, lua_Integer v) {
  char tmp[24];
  char *q = tmp + sizeof tmp;
  uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
  do {
    *--q = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  if (v < 0) *--q = '-';
  return put(e, q, (size_t)(tmp + sizeof tmp - q));
}

static int enc_float(encoder *e, lua_Number v) {
  if (isnan(v) || isinf(v))
    return enc_bad(e, "cannot encode NaN or infinity",
                   isnan(v) ? "<nan>" : (v > 0 ? "<inf>" : "<-inf>"));
  char tmp[40];
  int n = 0;
  /* Shortest of %.15g..%.17g that reads back as the same double. */
  for (int prec = 15; prec <= 17; prec++) {
    n = snprintf(tmp, sizeof tmp, "%.*g", prec, v);
    if (prec == 17 || strtod_l(tmp, NULL, c_locale()) == v) break;
  }
  /* Keep floats floats: 1.0 is written "1.0", so it decodes as a float again. */
  if (!strpbrk(tmp, ".eEn")) {
    tmp[n++] = '.';
    tmp[n++] = '0';
  }
  for (int i = 0; i < n; i++) /* a locale with ',' as decimal point */
    if (tmp[i] == ',') tmp[i] = '.';
  return put(e, tmp, (size_t)n);
}

static int enc_newline(encoder *e) {
  if (!e->pretty) return 1;
  if (!enc_grow(e, 1 + (size_t)e->depth * 2)) return 0;
  putc_(e, '\n');
  for (int i = 0; i < e->depth; i++) put(e, "  ", 2);
  return 1;
}

static int enc_value(encoder *e, int idx);

/* Pops the metatable on top of the stack; says which marker it is (0 array, 1 object, 2 none). */
static int marker_of(encoder *e) {
  lua_State *L = e->L;
  if (!e->have_markers) { /* the registry keeps them alive: their addresses stay valid */
    lua_rawgetp(L, LUA_REGISTRYINDEX, &ARRAY_KEY);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &OBJECT_KEY);
    e->markers[0] = lua_istable(L, -2) ? lua_topointer(L, -2) : NULL;
    e->markers[1] = lua_istable(L, -1) ? lua_topointer(L, -1) : NULL;
    e->have_markers = 1;
    lua_pop(L, 2);
  }
  const void *mt = lua_topointer(L, -1);
  lua_pop(L, 1);
  return mt == e->markers[0] ? 0 : mt == e->markers[1] ? 1 : 2;
}

/* Records the key or index of the current level (depth was already incremented). */
static void enc_push_path(encoder *e, const char *key, size_t keylen, lua_Integer index) {
  int i = e->depth - 1;
  if (i >= 0 && i < 64) {
    for (; e->path_hi <= i; e->path_hi++) { /* entries skipped over read as zero */
      e->path[e->path_hi].key = NULL;
      e->path[e->path_hi].keylen = 0;
      e->path[e->path_hi].index = 0;
    }
    e->path[i].key = key;
    e->path[i].keylen = keylen;
    e->path[i].index = index;
  }
}

static int enc_array(encoder *e, int idx, lua_Integer n) {
  lua_State *L = e->L;
  if (!putc_(e, '[')) return 0;
  e->depth++;
  for (lua_Integer i = 1; i <= n; i++) {
    if (i > 1 && !putc_(e, ',')) return 0;
    if (!enc_newline(e)) return 0;
    enc_push_path(e, NULL, 0, i);
    lua_rawgeti(L, idx, i);
    if (!enc_value(e, lua_gettop(L))) return 0;
    lua_pop(L, 1);
  }
  e->depth--;
  if (n > 0 && !enc_newline(e)) return 0;
  return putc_(e, ']');
}

static int enc_key(encoder *e, int kidx) {
  lua_State *L = e->L;
  size_t kl;
  const char *k;
  if (lua_type(L, kidx) == LUA_TSTRING) {
    k = lua_tolstring(L, kidx, &kl);
    enc_push_path(e, k, kl, 0);
    return enc_string(e, k, kl);
  }
  if (lua_isinteger(L, kidx)) { /* a json.object with integer keys: write them as strings */
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%lld", (long long)lua_tointeger(L, kidx));
    enc_push_path(e, NULL, 0, lua_tointeger(L, kidx));
    return enc_string(e, tmp, (size_t)n);
  }
  char what[64];
  snprintf(what, sizeof what, "cannot encode a %s key", luaL_typename(L, kidx));
  if (e->lenient) {
    char ph[40];
    snprintf(ph, sizeof ph, "<%s key>", luaL_typename(L, kidx));
    enc_push_path(e, NULL, 0, 0);
    e->replaced++;
    return enc_string(e, ph, strlen(ph));
  }
  e->depth--; /* the path names the object, not a member */
  enc_fail(e, what);
  e->depth++;
  return 0;
}

static int key_cmp(const void *a, const void *b) {
  const struct {
    const char *s;
    size_t n;
    int ref;
  } *x = a, *y = b;
  size_t m = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->s, y->s, m);
  return c ? c : (x->n > y->n) - (x->n < y->n);
}

static lua_Integer table_shape(encoder *e, int idx, int *bad);
static int shape_error(encoder *e, int bad);

/* A key of the outermost object that the caller lifted out (audit: sandbox, vm, pid). */
static int skipped(const encoder *e, const char *k, size_t n) {
  if (!e->skip || e->depth != 1) return 0;
  for (const char *const *p = e->skip; *p; p++)
    if (strncmp(*p, k, n) == 0 && (*p)[n] == 0) return 1;
  return 0;
}

/* Writes "key": for the string at stack index kidx, from the key cache when it is there. */
static int put_key_cached(encoder *e, const char *k, size_t n, int kidx) {
  if (n > CL_JSON_KEY_MAX) return enc_string(e, k, n) && put(e, ":", 1);
  uintptr_t h = (uintptr_t)k;
  h = ((h >> 4) ^ (h >> 12)) % CL_JSON_KEYS; /* Lua strings are 16-byte aligned objects */
  cl_json_key *c = &e->keys->e[h];
  if (c->p != k || c->n != n) {
    if (!plain((const unsigned char *)k, n)) return enc_string(e, k, n) && put(e, ":", 1);
    lua_State *L = e->L;
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, e->keys) != LUA_TTABLE) { /* the keys' anchors */
      lua_pop(L, 1);
      lua_createtable(L, CL_JSON_KEYS, 0);
      lua_pushvalue(L, -1);
      lua_rawsetp(L, LUA_REGISTRYINDEX, e->keys);
    }
    lua_pushvalue(L, kidx);
    lua_rawseti(L, -2, (lua_Integer)h + 1); /* the key it replaces may go */
    lua_pop(L, 1);
    c->p = k;
    c->n = (uint8_t)n;
    c->json[0] = '"';
    memcpy(c->json + 1, k, n);
    c->json[n + 1] = '"';
    c->json[n + 2] = ':';
    c->jl = (uint8_t)(n + 3);
  }
  /* A fixed-size copy (a few vector moves; a variable one became `rep movs`), then advance. */
  if (e->b->n + sizeof c->json > e->lim) return put(e, c->json, c->jl);
  memcpy(e->b->p + e->b->n, c->json, sizeof c->json);
  e->b->n += c->jl;
  return 1;
}

#define SORT_FAST_MAX 64 /* objects up to this many keys are sorted without a second lookup */

typedef struct skey {
  const char *s;
  size_t n;
  int vi; /* stack index of the value */
} skey;

static inline int skey_less(const skey *x, const skey *y) {
  /* Keys mostly differ in their first byte (Lua strings end in a NUL, so [0] is always there). */
  unsigned char a = (unsigned char)x->s[0], b = (unsigned char)y->s[0];
  if (a != b && a && b) return a < b;
  size_t m = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->s, y->s, m);
  return c ? c < 0 : x->n < y->n;
}

/* Sorted object members in one traversal: each value stays on the stack (with its key, which
 * anchors the key's bytes) while keys are insertion-sorted, so no key is hashed and looked up a
 * second time and nothing is allocated. Returns -1, with nothing written and the stack as it
 * was, when this cannot apply (a key that is not a string, or more than SORT_FAST_MAX keys). */
static int enc_sorted_fast(encoder *e, int idx, int *first) {
  lua_State *L = e->L;
  int base = lua_gettop(L);
  if (!lua_checkstack(L, 2 * SORT_FAST_MAX + 4)) return -1;
  skey keys[SORT_FAST_MAX];
  size_t cnt = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING || cnt == SORT_FAST_MAX) {
      lua_settop(L, base);
      return -1;
    }
    skey k;
    k.s = lua_tolstring(L, -2, &k.n);
    if (skipped(e, k.s, k.n)) {
      lua_pop(L, 1);
      continue;
    }
    k.vi = lua_gettop(L);
    size_t i = cnt++;
    for (; i > 0 && skey_less(&k, &keys[i - 1]); i--) keys[i] = keys[i - 1];
    keys[i] = k;
    lua_pushvalue(L, -2); /* the key again, for lua_next */
  }
  for (size_t i = 0; i < cnt; i++) {
    if (!*first && !putc_(e, ',')) return 0;
    *first = 0;
    if (e->pretty && !enc_newline(e)) return 0;
    enc_push_path(e, keys[i].s, keys[i].n, 0);
    if (e->keys && e->depth == 1) {
      if (!put_key_cached(e, keys[i].s, keys[i].n, keys[i].vi - 1)) return 0;
    } else if (!enc_string(e, keys[i].s, keys[i].n) ||
               !put(e, e->pretty ? ": " : ":", e->pretty ? 2 : 1)) {
      return 0;
    }
    if (!enc_value(e, keys[i].vi)) return 0;
  }
  lua_settop(L, base);
  return 1;
}

/* With strict set (an unmarked table whose length is 0, taken for an object in one pass), a
 * key that is not a string means the table is no object: say why. */
static int enc_object(encoder *e, int idx, int strict) {
  lua_State *L = e->L;
  if (!putc_(e, '{')) return 0;
  e->depth++;
  int first = 1;
  int fast = e->sort_keys ? enc_sorted_fast(e, idx, &first) : -1;
  if (fast == 0) return 0;
  if (fast > 0) {
    /* written */
  } else if (e->sort_keys) {
    /* Large objects: collect string keys, sort them bytewise, then look each value up. */
    typedef struct {
      const char *s;
      size_t n;
      int ref;
    } key;
    size_t cnt = 0, cap = 16;
    key *keys = malloc(cap * sizeof *keys);
    if (!keys) return enc_fail(e, "out of memory");
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      lua_pop(L, 1);
      if (lua_type(L, -1) != LUA_TSTRING) {
        char what[80];
        snprintf(what, sizeof what, "cannot sort a %s key (sort_keys needs string keys)",
                 luaL_typename(L, -1));
        free(keys);
        lua_pop(L, 1);
        return enc_fail(e, what);
      }
      if (skipped(e, lua_tostring(L, -1), lua_rawlen(L, -1))) continue;
      if (cnt == cap) {
        key *nk = realloc(keys, (cap *= 2) * sizeof *keys);
        if (!nk) {
          free(keys);
          lua_pop(L, 1);
          return enc_fail(e, "out of memory");
        }
        keys = nk;
      }
      keys[cnt].s = lua_tolstring(L, -1, &keys[cnt].n); /* anchored by the table */
      cnt++;
    }
    qsort(keys, cnt, sizeof *keys, key_cmp);
    for (size_t i = 0; i < cnt; i++) {
      if (!first && !putc_(e, ',')) {
        free(keys);
        return 0;
      }
      first = 0;
      if (!enc_newline(e)) {
        free(keys);
        return 0;
      }
      enc_push_path(e, keys[i].s, keys[i].n, 0);
      if (!enc_string(e, keys[i].s, keys[i].n) ||
          !put(e, e->pretty ? ": " : ":", e->pretty ? 2 : 1)) {
        free(keys);
        return 0;
      }
      lua_pushlstring(L, keys[i].s, keys[i].n);
      lua_rawget(L, idx);
      if (!enc_value(e, lua_gettop(L))) {
        free(keys);
        return 0;
      }
      lua_pop(L, 1);
    }
    free(keys);
  } else {
    int vi = lua_gettop(L) + 2, ki = vi - 1; /* where lua_next leaves key and value */
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      if (lua_type(L, ki) == LUA_TSTRING && skipped(e, lua_tostring(L, ki), lua_rawlen(L, ki))) {
        lua_pop(L, 1);
        continue;
      }
      if (!first && !putc_(e, ',')) return 0;
      first = 0;
      if (e->pretty && !enc_newline(e)) return 0;
      if (lua_type(L, ki) == LUA_TSTRING) { /* the common case, inline */
        size_t kl;
        const char *k = lua_tolstring(L, ki, &kl);
        enc_push_path(e, k, kl, 0);
        if (!enc_string(e, k, kl)) return 0;
      } else if (strict && lua_isinteger(L, ki)) {
        int bad = 0;
        lua_pop(L, 2);
        e->depth--;
        table_shape(e, idx, &bad);
        return shape_error(e, bad ? bad : 2);
      } else if (!enc_key(e, ki)) {
        return 0;
      }
      if (!put(e, e->pretty ? ": " : ":", e->pretty ? 2 : 1)) return 0;
      if (!enc_value(e, vi)) return 0;
      lua_pop(L, 1);
    }
  }
  e->depth--;
  if (!first && !enc_newline(e)) return 0;
  return putc_(e, '}');
}

/* Classifies a plain table: returns n >= 0 for an array 1..n, -1 for an object. */
static lua_Integer table_shape(encoder *e, int idx, int *bad) {
  lua_State *L = e->L;
  lua_Integer n = (lua_Integer)lua_rawlen(L, idx), count = 0;
  int has_int = 0, has_other = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_isinteger(L, -1)) {
      lua_Integer k = lua_tointeger(L, -1);
      has_int = 1;
      if (k < 1 || k > n) *bad = 1;
      count++;
    } else {
      has_other = 1;
    }
  }
  if (has_int && has_other) *bad = 2;
  if (has_int && !has_other && count != n) *bad = 1;
  if (*bad) return -1;
  return has_int ? n : -1;
}

static int enc_table(encoder *e, int idx) {
  lua_State *L = e->L;
  if (e->depth >= e->max_depth) {
    char what[64];
    snprintf(what, sizeof what, "nesting deeper than %d (a cycle?)", e->max_depth);
    return enc_bad(e, what, "<too deep>");
  }
  if (!lua_checkstack(L, 6)) return enc_fail(e, "Lua stack overflow");
  if (lua_getmetatable(L, idx)) {
    int m = marker_of(e);
    int is_array = m == 0, is_object = m == 1;
    if (is_array) return enc_array(e, idx, (lua_Integer)lua_rawlen(L, idx));
    if (is_object) return enc_object(e, idx, 0);
  }
  /* No array part: an object, checked while it is written (one traversal, not two). In lenient
   * sorted mode a key that is not a string fails the object whatever its shape, so the shape
   * pass is skipped there too. */
  if (lua_rawlen(L, idx) == 0) {
    if (!e->lenient) return enc_object(e, idx, 1);
    if (e->sort_keys) return enc_object(e, idx, 0);
  }
  int bad = 0;
  lua_Integer n = table_shape(e, idx, &bad);
  if (bad && e->lenient) return enc_object(e, idx, 0); /* keys become strings */
  if (bad) return shape_error(e, bad);
  if (n > 0) return enc_array(e, idx, n);
  return enc_object(e, idx, 0);
}

static int shape_error(encoder *e, int bad) {
  if (bad == 1) return enc_fail(e, "cannot encode an array with holes or keys below 1");
  return enc_fail(e, "cannot encode a table with both integer and string keys");
}

static int enc_value(encoder *e, int idx) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return put(e, "null", 4);
  case LUA_TBOOLEAN:
    return lua_toboolean(L, idx) ? put(e, "true", 4) : put(e, "false", 5);
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) return enc_integer(e, lua_tointeger(L, idx));
    return enc_float(e, lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    return enc_string(e, s, n);
  }
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == CL_JSON_NULL) return put(e, "null", 4);
    break;
  case LUA_TTABLE:
    if (!lua_getmetatable(L, idx)) return enc_table(e, idx);
    if (marker_of(e) < 2) return enc_table(e, idx);
    __attribute__((fallthrough)); /* another metatable may have __tojson */
  case LUA_TUSERDATA:
    if (luaL_getmetafield(L, idx, "__tojson") != LUA_TNIL) {
      if (e->depth >= e->max_depth) return enc_fail(e, "nesting too deep in __tojson");
      lua_pushvalue(L, idx);
      lua_call(L, 1, 1);
      if (lua_type(L, -1) == LUA_TUSERDATA) {
        lua_pop(L, 1);
        return enc_fail(e, "__tojson returned a userdata");
      }
      e->depth++;
      int ok = enc_value(e, lua_gettop(L));
      e->depth--;
      lua_pop(L, 1);
      return ok;
    }
    if (lua_type(L, idx) == LUA_TTABLE) return enc_table(e, idx);
    break;
  default:
    break;
  }
  char what[64], ph[40];
  snprintf(what, sizeof what, "cannot encode a %s value", luaL_typename(L, idx));
  snprintf(ph, sizeof ph, "<%s>", luaL_typename(L, idx));
  return enc_bad(e, what, ph);
}

/* Runs the encoder on the value at idx, appending to out. On failure out->n is restored and the
 * message is pushed (returns 0), or for the size limit -1 with the message pushed unless
 * quiet_size (a caller that retries smaller makes no garbage per attempt); on success the stack
 * is as it was. */
static int run_encoder(lua_State *L, int idx, cl_buf *out, int pretty, int sort_keys, int max_depth,
                       size_t max_size, size_t lenient_max_string, const char *const *skip,
                       cl_json_keys *keys, long *replaced, int quiet_size) {
  idx = lua_absindex(L, idx);
  int base = lua_gettop(L);
  size_t start = out->n;
  encoder e;
  memset(&e, 0, offsetof(encoder, errbuf)); /* the path (1.5 kB) is written before it is read */
  e.L = L;
  e.b = out;
  e.pretty = pretty;
  e.sort_keys = sort_keys;
  e.max_depth = max_depth;
  e.max_size = max_size;
  e.lim = out->cap < max_size ? out->cap : max_size;
  e.lenient = lenient_max_string > 0;
  e.max_string = lenient_max_string == (size_t)-1 ? 0 : lenient_max_string;
  e.skip = skip;
  e.keys = keys;
  int ok = enc_value(&e, idx);
  if (replaced) *replaced = e.replaced;
  lua_settop(L, base);
  if (!ok) {
    out->n = start;
    if (e.too_large && quiet_size) return -1;
    lua_pushfstring(L, "json: %s", e.err ? e.err : "encoding failed");
    return e.too_large ? -1 : 0;
  }
  return 1;
}

/* Encodes the value at idx; on success pushes the string, else pushes nil + message. */
int cl_json_encode_with(lua_State *L, int idx, int pretty, int sort_keys, int max_depth,
                        size_t max_size) {
  idx = lua_absindex(L, idx);
  /* Reuse the state's scratch buffer (no malloc per call), unless a nested encode holds it. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SCRATCH_KEY);
  strbuf *b = lua_touserdata(L, -1);
  if (!b || b->busy) {
    lua_pop(L, 1);
    b = lua_newuserdatauv(L, sizeof *b, 0);
    memset(b, 0, sizeof *b);
    luaL_setmetatable(L, BUF_MT);
  }
  b->busy = 1;
  b->buf.n = 0;
  int ok = run_encoder(L, idx, &b->buf, pretty, sort_keys, max_depth, max_size, 0, NULL, NULL, NULL,
                       0) > 0;
  b->busy = 0;
  if (ok)
    lua_pushlstring(L, b->buf.p ? b->buf.p : "", b->buf.n);
  else
    lua_pushnil(L);
  if (b->buf.cap > SCRATCH_KEEP) {
    free(b->buf.p);
    b->buf.p = NULL;
    b->buf.cap = 0;
  }
  /* [buffer, message] or [buffer, string] -> [nil, message] or [string] */
  if (ok) {
    lua_remove(L, -2);
    return 1;
  }
  lua_replace(L, -3);
  return 0;
}

const char *cl_json_encode(lua_State *L, int idx, size_t *len) {
  if (!cl_json_encode_with(L, idx, 0, 0, DEFAULT_MAX_DEPTH, DEFAULT_MAX_SIZE)) {
    lua_remove(L, -2); /* leave just the message */
    return NULL;
  }
  return lua_tolstring(L, -1, len);
}

int cl_json_encode_lenient(lua_State *L, int idx, cl_buf *out, const cl_json_lenient *opts,
                           long *replaced) {
  long r = 0;
  size_t max_string = opts->max_string ? opts->max_string : (size_t)-1;
  size_t max_size = opts->max_size ? out->n + opts->max_size : DEFAULT_MAX_SIZE;
  int ok = run_encoder(L, idx, out, 0, opts->sort_keys, opts->max_depth, max_size, max_string,
                       opts->skip, opts->keys, &r, 1);
  if (ok == 0 && opts->skip && lua_istable(L, idx)) {
    /* Lifting keys out of a table the encoder could not take whole (mixed keys, say): encode a
     * shallow copy without them instead, as if the caller had made it. */
    lua_pop(L, 1);
    idx = lua_absindex(L, idx);
    lua_newtable(L);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      size_t kl;
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kl) : NULL;
      int skip = 0;
      for (const char *const *p = opts->skip; k && *p && !skip; p++)
        skip = strlen(*p) == kl && memcmp(*p, k, kl) == 0;
      if (skip) {
        lua_pop(L, 1);
        continue;
      }
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
    ok = run_encoder(L, -1, out, 0, opts->sort_keys, opts->max_depth, max_size, max_string, NULL,
                     opts->keys, &r, 1);
    lua_remove(L, ok == 0 ? -2 : -1); /* the copy (a message, if any, stays) */
  }
  if (replaced) *replaced = r;
  return ok;
}

void cl_json_encoder_register(lua_State *L) {
  luaL_newmetatable(L, ARRAY_MT);
  lua_pushliteral(L, "json.array");
  lua_setfield(L, -2, "__name");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &ARRAY_KEY);
  luaL_newmetatable(L, OBJECT_MT);
  lua_pushliteral(L, "json.object");
  lua_setfield(L, -2, "__name");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &OBJECT_KEY);
  static const cl_class cls = {BUF_MT, NULL, strbuf_gc, NULL};
  cl_class_register(L, &cls);
  strbuf *scratch = lua_newuserdatauv(L, sizeof *scratch, 0);
  memset(scratch, 0, sizeof *scratch);
  luaL_setmetatable(L, BUF_MT);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &SCRATCH_KEY);
}
