/*
 * fuzz_firecracker_api: Firecracker's API answers as the host reads them (runtime/vm/
 * firecracker.c): the body arrives through libcurl's write callback (cl_fc_on_body) in pieces of
 * 1..64 bytes (the first input byte seeds the sizes), then is read as the GET / answer
 * (cl_fc_parse_version) and as an error answer (cl_fc_fault). Oracle: the body is the bytes
 * given, NUL-terminated, and a piece is refused only past API_BODY_MAX; a version is read only
 * from a firecracker_version string "[v]MAJOR.MINOR..." and gives those numbers, and the version
 * text stays inside its field; a fault is the fault_message string, else the body's first 300
 * bytes, always terminated inside its buffer.
 */
#include <cjson/cJSON.h>
#include <stdio.h>

#include "fuzz_vm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  vm *v = fz_vm();
  vm_api *a = &v->api;
  fz_cuts cuts = fz_cuts_of(&data, &size);
  free(a->body);
  a->body = NULL;
  a->body_len = 0;
  size_t off = 0;
  while (off < size) {
    size_t n = fz_cut(&cuts, size - off);
    /* libcurl passes size 1 and nmemb n */
    size_t got = cl_fc_on_body((char *)data + off, 1, n, a);
    if (got != n) fz_abort("fc", "a body piece under the cap was refused");
    off += n;
  }
  if (size && (a->body_len != size || memcmp(a->body, data, size) != 0 || a->body[size] != 0))
    fz_abort("fc", "the body differs from the bytes given");

  v->fc_major = v->fc_minor = -1;
  memset(v->fc_version, 0x55, sizeof v->fc_version);
  int ok = cl_fc_parse_version(v);
  cJSON *j = a->body ? cJSON_Parse(a->body) : NULL;
  cJSON *x = j ? cJSON_GetObjectItemCaseSensitive(j, "firecracker_version") : NULL;
  const char *s = x && cJSON_IsString(x) ? x->valuestring : NULL;
  int major = -1, minor = -1, used = 0;
  if (s && strlen(s) < 16) { /* short: no overflow in either reading */
    const char *t = *s == 'v' ? s + 1 : s;
    /* %d accepts what strtol does (sign, leading blanks): only the numbers are compared */
    if (sscanf(t, "%d.%n", &major, &used) == 1 && used && t[used - 1] == '.' &&
        sscanf(t + used, "%d", &minor) != 1)
      minor = -1;
  }
  if (ok) {
    if (!s) fz_abort("fc", "a version without a firecracker_version string");
    if (!memchr(v->fc_version, 0, sizeof v->fc_version))
      fz_abort("fc", "fc_version not terminated");
    if (strncmp(v->fc_version, s, sizeof v->fc_version - 1) != 0)
      fz_abort("fc", "fc_version is not the start of firecracker_version");
    if (minor >= 0 && (v->fc_major != major || v->fc_minor != minor))
      fz_abort("fc: version numbers differ from the text", s);
  } else if (s && minor >= 0 && used) {
    fz_abort("fc: a well-formed version was refused", s);
  }
  cJSON_Delete(j);

  char fault[400];
  memset(fault, 0x55, sizeof fault);
  cl_fc_fault(a->body, fault, sizeof fault);
  if (!memchr(fault, 0, sizeof fault)) fz_abort("fc", "fault text not terminated");
  j = a->body ? cJSON_Parse(a->body) : NULL;
  cJSON *fm = j ? cJSON_GetObjectItemCaseSensitive(j, "fault_message") : NULL;
  if (fm && cJSON_IsString(fm)) {
    if (strncmp(fault, fm->valuestring, sizeof fault - 1) != 0)
      fz_abort("fc", "fault is not fault_message");
  } else if (a->body) {
    size_t want = strnlen(a->body, 300);
    if (strlen(fault) != want || memcmp(fault, a->body, want) != 0)
      fz_abort("fc", "fault is not the start of the body");
  } else if (fault[0]) {
    fz_abort("fc", "a fault without a body");
  }
  cJSON_Delete(j);
  free(a->body);
  a->body = NULL;
  a->body_len = 0;
  return 0;
}
