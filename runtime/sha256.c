/*
 * SHA-256 as FIPS 180-4 specifies it (why our own: sha256.h). Two block functions: the
 * portable one below, and one on the x86 SHA extensions (SHA-NI), picked once by CPUID. The
 * extensions do two rounds per instruction: about 4x the portable code per block, which is
 * what keeps a hash-chained audit sink close to a raw write(2).
 */
#include "sha256.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CL_SHA_NI 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline uint32_t ror(uint32_t x, int n) {
  return (x >> n) | (x << (32 - n));
}

static void blocks_portable(uint32_t h[8], const unsigned char *p, size_t n) {
  for (; n; n--, p += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
      w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 |
             (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
      uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
      uint32_t t1 = k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
      uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      k = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
  }
}

#ifdef CL_SHA_NI
#define SHA_NI_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* Four rounds: the schedule words m plus their constants, two rounds per sha256rnds2. */
SHA_NI_TARGET static inline void rounds4(__m128i *abef, __m128i *cdgh, __m128i m, int g) {
  __m128i wk = _mm_add_epi32(m, _mm_loadu_si128((const __m128i *)&K[4 * g]));
  *cdgh = _mm_sha256rnds2_epu32(*cdgh, *abef, wk);
  *abef = _mm_sha256rnds2_epu32(*abef, *cdgh, _mm_shuffle_epi32(wk, 0x0E));
}

/* W[t..t+3] from the four words groups before: a = W[t-16..], b = W[t-12..], c = W[t-8..],
 * d = W[t-4..] (W[t-7..t-4] is c and d shifted by one word). */
SHA_NI_TARGET static inline __m128i schedule(__m128i a, __m128i b, __m128i c, __m128i d) {
  __m128i t = _mm_add_epi32(_mm_sha256msg1_epu32(a, b), _mm_alignr_epi8(d, c, 4));
  return _mm_sha256msg2_epu32(t, d);
}

SHA_NI_TARGET static void blocks_shani(uint32_t h[8], const unsigned char *p, size_t n) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  /* The instructions keep the state as ABEF and CDGH (lane 3 first). */
  __m128i dcba = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);
  __m128i hgfe = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);
  __m128i abef = _mm_alignr_epi8(dcba, hgfe, 8);
  __m128i cdgh = _mm_blend_epi16(hgfe, dcba, 0xF0);
  for (; n; n--, p += 64) {
    __m128i abef0 = abef, cdgh0 = cdgh;
    __m128i m0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 0)), bswap);
    __m128i m1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16)), bswap);
    __m128i m2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 32)), bswap);
    __m128i m3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 48)), bswap);
    rounds4(&abef, &cdgh, m0, 0);
    rounds4(&abef, &cdgh, m1, 1);
    rounds4(&abef, &cdgh, m2, 2);
    rounds4(&abef, &cdgh, m3, 3);
    for (int g = 4; g < 16; g += 4) {
      m0 = schedule(m0, m1, m2, m3);
      rounds4(&abef, &cdgh, m0, g);
      m1 = schedule(m1, m2, m3, m0);
      rounds4(&abef, &cdgh, m1, g + 1);
      m2 = schedule(m2, m3, m0, m1);
      rounds4(&abef, &cdgh, m2, g + 2);
      m3 = schedule(m3, m0, m1, m2);
      rounds4(&abef, &cdgh, m3, g + 3);
    }
    abef = _mm_add_epi32(abef, abef0);
    cdgh = _mm_add_epi32(cdgh, cdgh0);
  }
  __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
  __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
  _mm_storeu_si128((__m128i *)&h[0], _mm_blend_epi16(feba, dchg, 0xF0));
  _mm_storeu_si128((__m128i *)&h[4], _mm_alignr_epi8(dchg, feba, 8));
}

static int cpu_has_shani(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3)) return 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  return (b & bit_SHA) != 0;
}
#endif

typedef void (*blocks_fn)(uint32_t h[8], const unsigned char *p, size_t n);

/* CLAWLUA_SHA256=portable forces the portable code (the tests check both against the same
 * vectors on a machine that has the extensions). */
static blocks_fn pick_blocks(void) {
#ifdef CL_SHA_NI
  const char *force = getenv("CLAWLUA_SHA256");
  if (!(force && strcmp(force, "portable") == 0) && cpu_has_shani()) return blocks_shani;
#endif
  return blocks_portable;
}

static void blocks(uint32_t h[8], const unsigned char *p, size_t n) {
  static _Atomic(blocks_fn) fn;
  blocks_fn f = atomic_load_explicit(&fn, memory_order_relaxed);
  if (!f) {
    f = pick_blocks();
    atomic_store_explicit(&fn, f, memory_order_relaxed);
  }
  f(h, p, n);
}

const char *cl_sha256_impl(void) {
  return pick_blocks() == blocks_portable ? "portable" : "sha-ni";
}

void cl_sha256_init(cl_sha256_ctx *c) {
  static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  memcpy(c->h, iv, sizeof iv);
  c->total = 0;
  c->nbuf = 0;
}

void cl_sha256_update(cl_sha256_ctx *c, const void *data, size_t len) {
  const unsigned char *p = data;
  c->total += len;
  if (c->nbuf) {
    size_t n = 64 - c->nbuf < len ? 64 - c->nbuf : len;
    memcpy(c->buf + c->nbuf, p, n);
    c->nbuf += n;
    p += n;
    len -= n;
    if (c->nbuf < 64) return;
    blocks(c->h, c->buf, 1);
    c->nbuf = 0;
  }
  if (len >= 64) {
    blocks(c->h, p, len / 64);
    p += len / 64 * 64;
    len %= 64;
  }
  memcpy(c->buf, p, len);
  c->nbuf = len;
}

void cl_sha256_final(cl_sha256_ctx *c, unsigned char out[CL_SHA256_LEN]) {
  uint64_t bits = c->total * 8;
  c->buf[c->nbuf++] = 0x80;
  if (c->nbuf > 56) {
    memset(c->buf + c->nbuf, 0, 64 - c->nbuf);
    blocks(c->h, c->buf, 1);
    c->nbuf = 0;
  }
  memset(c->buf + c->nbuf, 0, 56 - c->nbuf);
  for (int i = 0; i < 8; i++) c->buf[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
  blocks(c->h, c->buf, 1);
  for (int i = 0; i < 8; i++) {
    out[4 * i] = (unsigned char)(c->h[i] >> 24);
    out[4 * i + 1] = (unsigned char)(c->h[i] >> 16);
    out[4 * i + 2] = (unsigned char)(c->h[i] >> 8);
    out[4 * i + 3] = (unsigned char)c->h[i];
  }
}

void cl_sha256(const void *data, size_t len, unsigned char out[CL_SHA256_LEN]) {
  cl_sha256_ctx c;
  cl_sha256_init(&c);
  cl_sha256_update(&c, data, len);
  cl_sha256_final(&c, out);
}
