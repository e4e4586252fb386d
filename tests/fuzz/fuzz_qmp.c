/*
 * fuzz_qmp: QEMU's QMP stream as the host reads it (runtime/vm/qemu.c, cl_qmp_input): the input
 * (after a byte that seeds the read sizes) arrives in reads of 1..64 bytes. Oracle: the line
 * buffer never holds a newline nor fills up (room for the next read); a stored reply is JSON text
 * (a "return") or a string (an "error" desc) and answers the id we wait for, 2; the greeting and
 * the capabilities answer (id 1) are what make QMP ready. At start-up, a message of over 1 MiB
 * is dropped whole (its tail is not read as a line) and the connection goes on.
 */
#include <cjson/cJSON.h>

#include "fuzz_vm.h"

static void reset(vm *v) {
  v->qin_len = 0;
  v->qin_skip = 0;
  v->qmp_greeted = v->qmp_ready = 0;
  v->qmp_have_reply = v->qmp_error = 0;
  v->qmp_next_id = 1;
  v->qmp_wait_id = 2;
  free(v->qmp_reply);
  v->qmp_reply = NULL;
}

static void feed(vm *v, const char *p, size_t n) {
  while (n) {
    size_t room = QMP_IN_CAP - 1 - v->qin_len;
    if (room == 0) fz_abort("qmp", "the line buffer is full: the next read would be of 0 bytes");
    size_t k = n < room ? n : room;
    memcpy(v->qin + v->qin_len, p, k);
    cl_qmp_input(v, k);
    p += k;
    n -= k;
  }
}

/* A QMP message of over 1 MiB (a string that holds a would-be reply), then a real reply. */
static void check_oversized(vm *v) {
  reset(v);
  size_t big = QMP_IN_CAP + 4096;
  char *s = malloc(big + 64);
  if (!s) fz_abort("malloc", "out of memory");
  memset(s, 'x', big);
  memcpy(s, "{\"pad\":\"", 8);
  const char *tail = "\",\"id\":2,\"return\":{\"fake\":1}}\n{\"id\":2,\"return\":{\"real\":1}}\n";
  memcpy(s + big - 64, tail, strlen(tail));
  size_t n = big - 64 + strlen(tail);
  for (size_t off = 0; off < n; off += 65536) feed(v, s + off, n - off < 65536 ? n - off : 65536);
  free(s);
  if (!v->qmp_have_reply || !v->qmp_reply || strcmp(v->qmp_reply, "{\"real\":1}") != 0)
    fz_abort("qmp", "after a message over 1 MiB the next reply is lost or the tail was read");
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  vm *v = fz_vm();
  v->qin = malloc(QMP_IN_CAP);
  if (!v->qin) fz_abort("malloc", "out of memory");
  check_oversized(v);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  vm *v = fz_vm();
  fz_cuts cuts = fz_cuts_of(&data, &size);
  reset(v);
  const char *p = (const char *)data;
  while (size) {
    size_t n = fz_cut(&cuts, size);
    feed(v, p, n);
    p += n;
    size -= n;
    if (v->qin_len >= QMP_IN_CAP - 1) fz_abort("qmp", "no room for the next read");
    if (memchr(v->qin, '\n', v->qin_len)) fz_abort("qmp", "a complete line was left unread");
    if (v->qmp_have_reply) {
      if (!v->qmp_reply) fz_abort("qmp", "a reply flagged but not stored");
      if (!v->qmp_error) {
        cJSON *j = cJSON_Parse(v->qmp_reply);
        if (!j) fz_abort("qmp: stored return is not JSON", v->qmp_reply);
        cJSON_Delete(j);
      }
    }
    if (v->qmp_ready &&
        !(v->qmp_greeted || memmem(data, (size_t)(p - (const char *)data), "\"id\"", 4)))
      fz_abort("qmp", "ready without a greeting or an answer to id 1");
  }
  reset(v);
  return fz_done(v->L);
}
