/*
 * Private header of clawlua.json (json.c: the Lua module; json_decode.c: text -> Lua values;
 * json_encode.c: Lua values -> text). One-way flow: json.c calls the decoder and the encoder,
 * which call nothing above them and not each other; both use what is here.
 */
#ifndef CLAWLUA_JSON_INT_H
#define CLAWLUA_JSON_INT_H

#include "clawlua.h"

#include <locale.h>

#define ARRAY_MT  "clawlua.json.array"
#define OBJECT_MT "clawlua.json.object"
#define BUF_MT    "clawlua.json.buffer"

#define DEFAULT_MAX_DEPTH 128
#define DEFAULT_MAX_SIZE  ((size_t)64 << 20)
#define HARD_MAX_DEPTH    10000

/* The C locale for number conversions (one per file that uses it, made on first use). */
static inline locale_t c_locale(void) {
  static locale_t loc;
  if (!loc) loc = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
  return loc;
}

/* ------------------------------------------------------------------------------------------ */
/* UTF-8                                                                                       */

/* Length of the valid UTF-8 sequence at p (p < end), or 0 if invalid. */
static inline size_t utf8_len(const unsigned char *p, const unsigned char *end) {
  unsigned c = p[0];
  if (c < 0x80) return 1;
  size_t avail = (size_t)(end - p);
  if (c >= 0xC2 && c <= 0xDF) {
    if (avail < 2 || (p[1] & 0xC0) != 0x80) return 0;
    return 2;
  }
  if (c >= 0xE0 && c <= 0xEF) {
    if (avail < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0; /* overlong */
    if (c == 0xED && p[1] > 0x9F) return 0; /* surrogates */
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (avail < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
      return 0;
    if (c == 0xF0 && p[1] < 0x90) return 0; /* overlong */
    if (c == 0xF4 && p[1] > 0x8F) return 0; /* above U+10FFFF */
    return 4;
  }
  return 0;
}

/* json_decode.c: decodes s and pushes the value, or nil and "json: <reason> at byte N" (0). */
int cl_json_decode_with(lua_State *L, const char *s, size_t len, int max_depth, size_t max_size);

/* json_encode.c */
/* Encodes the value at idx; pushes the string, or nil and the message (returns 0). */
int cl_json_encode_with(lua_State *L, int idx, int pretty, int sort_keys, int max_depth,
                        size_t max_size);
/* The marker metatables and the scratch buffer, in the registry. */
void cl_json_encoder_register(lua_State *L);

#endif
