/*
 * The firewall's DNS stub resolver (runtime/firewall/dns.c) reading answers, through the Lua
 * API: fw:resolve(name) against a resolver on the loopback of the harness's own network
 * namespace, which a thread of the harness plays. The resolver accepts only an answer to the
 * question it asked, so the thread builds each answer from the query and the input: the
 * query's id, flags from input[0..1] (with the response bit set), one question copied from the
 * query, the answer count from input[2..3], then the rest of the input as the answer records
 * (compression pointers to offset 12 name the question). The contract: {addrs = {...}, ttl}
 * or nil + "firewall: resolve: ..."; every address is a valid IPv4 or IPv6 text, and a TTL
 * taken from records is at most 2^31 - 1.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_firewall.h"

static int fw_ref = LUA_NOREF;
static pthread_mutex_t input_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned char input[4096];
static size_t input_len;

/* Length of the question section of query q (name + type + class), or 0. */
static size_t question_len(const unsigned char *q, size_t n) {
  size_t off = 12;
  while (off < n && q[off]) off += 1 + (size_t)q[off];
  return off + 5 <= n ? off + 5 - 12 : 0;
}

static void *responder(void *arg) {
  int fd = *(int *)arg;
  unsigned char q[512], a[4096 + 512];
  for (;;) {
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    ssize_t n = recvfrom(fd, q, sizeof q, 0, (struct sockaddr *)&from, &fl);
    if (n < 12) continue;
    size_t ql = question_len(q, (size_t)n);
    if (!ql) continue;
    pthread_mutex_lock(&input_mu);
    unsigned char flags[2] = {input_len > 0 ? input[0] : 0, input_len > 1 ? input[1] : 0};
    unsigned char ancount[2] = {input_len > 2 ? input[2] : 0, input_len > 3 ? input[3] : 1};
    size_t rest = input_len > 4 ? input_len - 4 : 0;
    memcpy(a, q, 2);
    a[2] = flags[0] | 0x80;
    a[3] = flags[1];
    a[4] = 0, a[5] = 1;
    a[6] = ancount[0], a[7] = ancount[1];
    memset(a + 8, 0, 4);
    memcpy(a + 12, q + 12, ql);
    if (rest) memcpy(a + 12 + ql, input + 4, rest);
    pthread_mutex_unlock(&input_mu);
    sendto(fd, a, 12 + ql + rest, 0, (struct sockaddr *)&from, fl);
  }
  return NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  fw_ref = fz_firewall_open(fz_state(), 1, "127.0.0.1");
  static int fd;
  fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(53)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
    fz_abort("cannot bind 127.0.0.1:53 in the namespace", NULL);
  pthread_t t;
  if (pthread_create(&t, NULL, responder, &fd) != 0) fz_abort("pthread_create", NULL);
  pthread_detach(t);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > sizeof input) return 0;
  pthread_mutex_lock(&input_mu);
  memcpy(input, data, size);
  input_len = size;
  pthread_mutex_unlock(&input_mu);
  lua_State *L = fz_state();
  lua_settop(L, 0);
  lua_pushliteral(L, "Fz.Example.");
  if (!fz_fw_method(L, fw_ref, "resolve", 1, 2)) fz_abort("resolve raised", lua_tostring(L, -1));
  if (lua_isnil(L, 1)) {
    const char *err = lua_tostring(L, 2);
    if (!err || strncmp(err, "firewall: resolve: ", 19) != 0)
      fz_abort("resolve failed without a reason", err);
    return fz_done(L);
  }
  lua_getfield(L, 1, "addrs");
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    const char *s = lua_tostring(L, -1);
    unsigned char buf[16];
    if (!s || (inet_pton(AF_INET, s, buf) != 1 && inet_pton(AF_INET6, s, buf) != 1))
      fz_abort("resolve returned something else than an address", s);
    lua_pop(L, 1);
  }
  lua_getfield(L, 1, "ttl");
  if (n > 0 && lua_tointeger(L, -1) > 0x7fffffff) fz_abort("TTL above 2^31 - 1", NULL);
  return fz_done(L);
}
