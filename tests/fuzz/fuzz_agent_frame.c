/*
 * The guest-agent frame format of runtime/guest/proto.h, as both ends read it: the input is a
 * byte stream of frames. Each header is decoded with cla_header_get; a frame it accepts has its
 * payload copied into a heap block of exactly that size (so ASan sees any read past the frame)
 * and walked with cla_tlv_next. The oracle: a reference walk written here independently must
 * agree item by item, every value must lie inside the payload, integer TLVs decode only at 8
 * bytes, and the frame re-encoded with cla_header_put / cla_put* must give the input bytes back.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guest/proto.h"

__attribute__((noreturn)) static void fail(const char *what) {
  fprintf(stderr, "fuzz_agent_frame: %s\n", what);
  abort();
}

/* Reference: 1 item at *off, 0 at the end, -1 when it overruns. */
static int ref_next(const unsigned char *p, size_t len, size_t *off, uint16_t *tag, size_t *vlen) {
  if (*off == len) return 0;
  if (len - *off < 6) return -1;
  *tag = (uint16_t)(p[*off] | (p[*off + 1] << 8));
  uint64_t l = 0;
  for (int i = 0; i < 4; i++) l |= (uint64_t)p[*off + 2 + i] << (8 * i);
  if (l > len - *off - 6) return -1;
  *vlen = (size_t)l;
  *off += 6 + (size_t)l;
  return 1;
}

static void check_payload(const unsigned char *pl, uint32_t len) {
  unsigned char *copy = malloc(len ? len : 1);
  unsigned char *re = malloc(len ? len : 1);
  if (!copy || !re) fail("out of memory");
  memcpy(copy, pl, len);
  cla_tlv t;
  cla_tlv_init(&t, copy, len);
  size_t off = 0, roff = 0;
  for (;;) {
    uint16_t tag = 0;
    size_t vlen = 0;
    size_t start = off;
    int want = ref_next(copy, len, &off, &tag, &vlen);
    int got = cla_tlv_next(&t);
    if (got != want) fail("cla_tlv_next disagrees with the reference walk");
    if (got <= 0) break;
    if (t.tag != tag || t.len != vlen || t.val != copy + start + 6)
      fail("cla_tlv_next returned another item than the reference walk");
    if (t.val < copy || t.val + t.len > copy + len) fail("TLV value outside the payload");
    uint64_t v = 0;
    int is_int = cla_tlv_u64(&t, &v);
    if (is_int != (t.len == 8)) fail("cla_tlv_u64 accepted a value that is not 8 bytes");
    /* Re-encode the item. */
    cla_put16(re + roff, t.tag);
    cla_put32(re + roff + 2, t.len);
    if (is_int)
      cla_put64(re + roff + 6, v);
    else
      memcpy(re + roff + 6, t.val, t.len);
    roff += 6 + t.len;
  }
  if (memcmp(re, copy, roff) != 0) fail("re-encoded TLVs differ from the payload");
  free(copy);
  free(re);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  size_t off = 0;
  while (size - off >= CLA_HEADER) {
    unsigned char hdr[CLA_HEADER];
    memcpy(hdr, data + off, CLA_HEADER);
    cla_header h;
    int ok = cla_header_get(hdr, &h);
    uint32_t len = cla_get32(hdr + 8);
    if (ok != (cla_get16(hdr) == CLA_MAGIC && len <= CLA_MAX_PAYLOAD))
      fail("cla_header_get accepted a bad header or refused a good one");
    if (!ok) break;
    unsigned char back[CLA_HEADER];
    cla_header_put(back, h.type, h.id, h.len);
    if (memcmp(back, hdr, CLA_HEADER) != 0) fail("header does not re-encode to its bytes");
    off += CLA_HEADER;
    if (h.len > size - off) break; /* a truncated frame: a reader waits for more */
    check_payload(data + off, h.len);
    off += h.len;
  }
  return 0;
}
