/*
 * The JSON decoder of clawlua.json: one pass from text straight onto the Lua stack, with exact
 * integers, strict UTF-8, depth and size limits, and errors located by byte.
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
/* Decoder                                                                                     */

typedef struct decoder {
  lua_State *L;
  const char *start, *p, *end;
  int depth, max_depth;
  int array_mt; /* stack index of the array metatable */
  const char *err;
  const char *errpos;
  char errbuf[96];
} decoder;

static int dec_fail(decoder *d, const char *at, const char *msg) {
  if (!d->err) {
    d->err = msg;
    d->errpos = at;
  }
  return 0;
}

static int dec_unexpected(decoder *d, const char *at) {
  if (at >= d->end) return dec_fail(d, at, "unexpected end of input");
  unsigned char c = (unsigned char)*at;
  if (c >= 0x20 && c < 0x7f)
    snprintf(d->errbuf, sizeof d->errbuf, "unexpected character '%c'", c);
  else
    snprintf(d->errbuf, sizeof d->errbuf, "unexpected byte 0x%02x", c);
  return dec_fail(d, at, d->errbuf);
}

static inline void skip_ws(decoder *d) {
  const char *p = d->p, *e = d->end;
  while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
  d->p = p;
}

static int hex4(const char *p, unsigned *out) {
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p[i];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f')
      v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
      v |= (unsigned)(c - 'A' + 10);
    else
      return 0;
  }
  *out = v;
  return 1;
}

static size_t put_utf8(char *o, unsigned cp) {
  if (cp < 0x80) {
    o[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (char)(0xE0 | (cp >> 12));
    o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  o[0] = (char)(0xF0 | (cp >> 18));
  o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  o[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* Decodes the escape at *qp (a backslash with at least one byte after it) into b and moves *qp
 * past it. Returns NULL, or what is wrong with the escape (which starts at the old *qp). */
static const char *dec_escape(luaL_Buffer *b, const char **qp, const char *e) {
  static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
  const char *q = *qp;
  const char *k = memchr(from, q[1], sizeof from - 1);
  if (k) {
    luaL_addchar(b, to[k - from]);
    *qp = q + 2;
    return NULL;
  }
  if (q[1] != 'u') return "invalid escape in string";
  unsigned cp, lo;
  if (e - q < 6 || !hex4(q + 2, &cp)) return "invalid \\u escape";
  q += 6;
  if (cp >= 0xD800 && cp <= 0xDBFF) {
    if (e - q < 6 || q[0] != '\\' || q[1] != 'u' || !hex4(q + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
      return "invalid UTF-16 surrogate pair in \\u escape";
    q += 6;
    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
  } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
    return "lone UTF-16 surrogate in \\u escape";
  }
  char out[4];
  luaL_addlstring(b, out, put_utf8(out, cp));
  *qp = q;
  return NULL;
}

/* Parses the string whose opening quote is at d->p and pushes it. */
static int dec_string(decoder *d) {
  const char *p = d->p + 1, *e = d->end;
  const char *q = p;
  /* Fast path: no escapes. */
  while (q < e) {
    unsigned char c = (unsigned char)*q;
    if (c == '"') {
      lua_pushlstring(d->L, p, (size_t)(q - p));
      d->p = q + 1;
      return 1;
    }
    if (c == '\\') break;
    if (c < 0x20) return dec_fail(d, q, "control character in string");
    if (c < 0x80) {
      q++;
      continue;
    }
    size_t n = utf8_len((const unsigned char *)q, (const unsigned char *)e);
    if (!n) return dec_fail(d, q, "invalid UTF-8 in string");
    q += n;
  }
  if (q >= e) return dec_fail(d, d->p, "unterminated string");
  /* Slow path: escapes. */
  luaL_Buffer b;
  luaL_buffinit(d->L, &b);
  luaL_addlstring(&b, p, (size_t)(q - p));
  while (q < e) {
    unsigned char c = (unsigned char)*q;
    if (c == '"') {
      luaL_pushresult(&b);
      d->p = q + 1;
      return 1;
    }
    if (c < 0x20) {
      luaL_pushresult(&b);
      lua_pop(d->L, 1);
      return dec_fail(d, q, "control character in string");
    }
    if (c == '\\') {
      if (q + 1 >= e) break;
      const char *at = q, *err = dec_escape(&b, &q, e);
      if (err) {
        luaL_pushresult(&b);
        lua_pop(d->L, 1);
        return dec_fail(d, at, err);
      }
      continue;
    }
    if (c < 0x80) {
      luaL_addchar(&b, (char)c);
      q++;
      continue;
    }
    size_t n = utf8_len((const unsigned char *)q, (const unsigned char *)e);
    if (!n) {
      luaL_pushresult(&b);
      lua_pop(d->L, 1);
      return dec_fail(d, q, "invalid UTF-8 in string");
    }
    luaL_addlstring(&b, q, n);
    q += n;
  }
  luaL_pushresult(&b);
  lua_pop(d->L, 1);
  return dec_fail(d, d->p, "unterminated string");
}

static int dec_number(decoder *d) {
  const char *p = d->p, *e = d->end, *s = p;
  int neg = 0, isfloat = 0;
  if (p < e && *p == '-') {
    neg = 1;
    p++;
  }
  if (p >= e) return dec_unexpected(d, p);
  if (*p == '0') {
    p++;
    if (p < e && *p >= '0' && *p <= '9') return dec_fail(d, p, "leading zero in number");
  } else if (*p >= '1' && *p <= '9') {
    while (p < e && *p >= '0' && *p <= '9') p++;
  } else {
    return dec_unexpected(d, p);
  }
  const char *intend = p;
  if (p < e && *p == '.') {
    isfloat = 1;
    p++;
    if (p >= e || *p < '0' || *p > '9') return dec_fail(d, p, "digit expected after '.'");
    while (p < e && *p >= '0' && *p <= '9') p++;
  }
  if (p < e && (*p == 'e' || *p == 'E')) {
    isfloat = 1;
    p++;
    if (p < e && (*p == '+' || *p == '-')) p++;
    if (p >= e || *p < '0' || *p > '9') return dec_fail(d, p, "digit expected in exponent");
    while (p < e && *p >= '0' && *p <= '9') p++;
  }
  d->p = p;
  if (!isfloat) {
    /* Exact int64 when it fits; accumulate negatively so INT64_MIN fits too. */
    int64_t v = 0;
    int ok = 1;
    for (const char *q = s + neg; q < intend; q++) {
      int dgt = *q - '0';
      if (__builtin_mul_overflow(v, 10, &v) || __builtin_sub_overflow(v, dgt, &v)) {
        ok = 0;
        break;
      }
    }
    if (ok && !neg && v == INT64_MIN) ok = 0;
    if (ok) {
      lua_pushinteger(d->L, neg ? v : -v);
      return 1;
    }
  }
  char tmp[64];
  size_t len = (size_t)(p - s);
  char *buf = len < sizeof tmp ? tmp : malloc(len + 1);
  if (!buf) return dec_fail(d, s, "out of memory");
  memcpy(buf, s, len);
  buf[len] = 0;
  double v = strtod_l(buf, NULL, c_locale());
  if (buf != tmp) free(buf);
  /* Beyond the double range (1e400): no value stands for it, and infinity would not encode
   * back (found by fuzz_json). Underflow to 0 or a subnormal keeps the nearest value. */
  if (isinf(v)) return dec_fail(d, s, "number out of range");
  lua_pushnumber(d->L, v);
  return 1;
}

static int dec_value(decoder *d);

static int dec_enter(decoder *d) {
  if (++d->depth > d->max_depth) {
    snprintf(d->errbuf, sizeof d->errbuf, "nesting deeper than %d", d->max_depth);
    return dec_fail(d, d->p, d->errbuf);
  }
  if (!lua_checkstack(d->L, 4)) return dec_fail(d, d->p, "Lua stack overflow");
  return 1;
}

static int dec_array(decoder *d) {
  if (!dec_enter(d)) return 0;
  lua_State *L = d->L;
  lua_createtable(L, 4, 0);
  lua_pushvalue(L, d->array_mt);
  lua_setmetatable(L, -2);
  d->p++;
  skip_ws(d);
  if (d->p < d->end && *d->p == ']') {
    d->p++;
    d->depth--;
    return 1;
  }
  for (lua_Integer i = 1;; i++) {
    if (!dec_value(d)) return 0;
    lua_rawseti(L, -2, i);
    skip_ws(d);
    if (d->p >= d->end) return dec_fail(d, d->p, "unexpected end of input in array");
    if (*d->p == ',') {
      d->p++;
      continue;
    }
    if (*d->p == ']') {
      d->p++;
      d->depth--;
      return 1;
    }
    return dec_unexpected(d, d->p);
  }
}

static int dec_object(decoder *d) {
  if (!dec_enter(d)) return 0;
  lua_State *L = d->L;
  lua_createtable(L, 0, 4);
  d->p++;
  skip_ws(d);
  if (d->p < d->end && *d->p == '}') {
    d->p++;
    d->depth--;
    return 1;
  }
  for (;;) {
    skip_ws(d);
    if (d->p >= d->end) return dec_fail(d, d->p, "unexpected end of input in object");
    if (*d->p != '"') {
      if (*d->p == '}') return dec_fail(d, d->p, "trailing comma in object");
      return dec_fail(d, d->p, "object key must be a string");
    }
    if (!dec_string(d)) return 0;
    skip_ws(d);
    if (d->p >= d->end || *d->p != ':') {
      lua_pop(L, 1);
      if (d->p >= d->end) return dec_fail(d, d->p, "unexpected end of input in object");
      return dec_fail(d, d->p, "':' expected after object key");
    }
    d->p++;
    if (!dec_value(d)) {
      lua_pop(L, 1);
      return 0;
    }
    lua_rawset(L, -3);
    skip_ws(d);
    if (d->p >= d->end) return dec_fail(d, d->p, "unexpected end of input in object");
    if (*d->p == ',') {
      d->p++;
      continue;
    }
    if (*d->p == '}') {
      d->p++;
      d->depth--;
      return 1;
    }
    return dec_unexpected(d, d->p);
  }
}

static int dec_literal(decoder *d, const char *word, size_t n) {
  if ((size_t)(d->end - d->p) < n || memcmp(d->p, word, n) != 0) return dec_unexpected(d, d->p);
  d->p += n;
  return 1;
}

/* Pushes the next value, or returns 0 with nothing pushed (partial containers are popped by
 * their callers' failure path through lua_settop in decode()). */
static int dec_value(decoder *d) {
  skip_ws(d);
  if (d->p >= d->end) return dec_fail(d, d->p, "unexpected end of input");
  switch (*d->p) {
  case '{':
    return dec_object(d);
  case '[':
    return dec_array(d);
  case '"':
    return dec_string(d);
  case 't':
    if (!dec_literal(d, "true", 4)) return 0;
    lua_pushboolean(d->L, 1);
    return 1;
  case 'f':
    if (!dec_literal(d, "false", 5)) return 0;
    lua_pushboolean(d->L, 0);
    return 1;
  case 'n':
    if (!dec_literal(d, "null", 4)) return 0;
    lua_pushlightuserdata(d->L, CL_JSON_NULL);
    return 1;
  default:
    if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9')) return dec_number(d);
    return dec_unexpected(d, d->p);
  }
}

int cl_json_decode_with(lua_State *L, const char *s, size_t len, int max_depth, size_t max_size) {
  int top = lua_gettop(L);
  if (len > max_size) {
    lua_pushnil(L);
    lua_pushfstring(L, "json: input of %I bytes is larger than the limit of %I bytes",
                    (lua_Integer)len, (lua_Integer)max_size);
    return 0;
  }
  luaL_getmetatable(L, ARRAY_MT);
  decoder d = {.L = L,
               .start = s,
               .p = s,
               .end = s + len,
               .max_depth = max_depth,
               .array_mt = lua_gettop(L)};
  int ok = dec_value(&d);
  if (ok) {
    skip_ws(&d);
    if (d.p < d.end) ok = dec_fail(&d, d.p, "trailing characters after the value");
  }
  if (!ok) {
    lua_settop(L, top);
    lua_pushnil(L);
    lua_pushfstring(L, "json: %s at byte %I", d.err, (lua_Integer)(d.errpos - s) + 1);
    return 0;
  }
  lua_remove(L, top + 1);
  return 1;
}

int cl_json_decode(lua_State *L, const char *s, size_t len) {
  return cl_json_decode_with(L, s, len, DEFAULT_MAX_DEPTH, DEFAULT_MAX_SIZE);
}
