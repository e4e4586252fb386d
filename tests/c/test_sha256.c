/*
 * SHA-256 (runtime/sha256.c) against FIPS 180-4's examples, with both block functions: this
 * process uses the one the CPU allows (the SHA extensions where present), then runs argv[0] again
 * with CLAWLUA_SHA256=portable, and both must print the same digests for every length from 0
 * to 1,000 bytes, fed whole and in uneven pieces.
 */
#include "sha256.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures, checks;

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    checks++;                                                                                      \
    if (!(cond)) {                                                                                 \
      failures++;                                                                                  \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                     \
    }                                                                                              \
  } while (0)

static void hex(const unsigned char d[CL_SHA256_LEN], char out[2 * CL_SHA256_LEN + 1]) {
  for (int i = 0; i < CL_SHA256_LEN; i++) sprintf(out + 2 * i, "%02x", d[i]);
}

static int digest_is(const void *data, size_t len, const char *want) {
  unsigned char d[CL_SHA256_LEN];
  char h[2 * CL_SHA256_LEN + 1];
  cl_sha256(data, len, d);
  hex(d, h);
  if (strcmp(h, want) == 0) return 1;
  fprintf(stderr, "sha256 of %zu bytes: %s, want %s\n", len, h, want);
  return 0;
}

static void known_answers(void) {
  CHECK(digest_is("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
  CHECK(digest_is("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
  const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK(digest_is(two, strlen(two),
                  "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
  /* A million 'a' fed in pieces of 997 bytes: buffering across block boundaries. */
  cl_sha256_ctx c;
  char piece[997];
  memset(piece, 'a', sizeof piece);
  cl_sha256_init(&c);
  size_t left = 1000000;
  while (left) {
    size_t n = left < sizeof piece ? left : sizeof piece;
    cl_sha256_update(&c, piece, n);
    left -= n;
  }
  unsigned char d[CL_SHA256_LEN];
  char h[2 * CL_SHA256_LEN + 1];
  cl_sha256_final(&c, d);
  hex(d, h);
  CHECK(strcmp(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0);
}

/* One digest per line for messages of every length 0..1000, the second half of them fed in
 * pieces of 1, 63 and 65 bytes in turn. */
static void digests(FILE *out) {
  static unsigned char msg[1000];
  for (size_t i = 0; i < sizeof msg; i++) msg[i] = (unsigned char)(i * 131 + 7);
  for (size_t len = 0; len <= sizeof msg; len++) {
    unsigned char d[CL_SHA256_LEN];
    char h[2 * CL_SHA256_LEN + 1];
    cl_sha256_ctx c;
    cl_sha256_init(&c);
    static const size_t steps[] = {1, 63, 65};
    size_t at = 0;
    for (int s = 0; at < len; s++) {
      size_t n = len % 2 ? steps[s % 3] : len;
      if (n > len - at) n = len - at;
      cl_sha256_update(&c, msg + at, n);
      at += n;
    }
    cl_sha256_final(&c, d);
    hex(d, h);
    fprintf(out, "%s\n", h);
  }
}

static int cpuinfo_has_shani(void) {
  FILE *f = fopen("/proc/cpuinfo", "r");
  char line[4096];
  int sha = 0, sse41 = 0, ssse3 = 0;
  while (f && fgets(line, sizeof line, f)) {
    if (strncmp(line, "flags", 5) != 0) continue;
    sha = strstr(line, " sha_ni") != NULL;
    sse41 = strstr(line, " sse4_1") != NULL;
    ssse3 = strstr(line, " ssse3") != NULL;
    break;
  }
  if (f) fclose(f);
  return sha && sse41 && ssse3;
}

int main(int argc, char **argv) {
  const char *force = getenv("CLAWLUA_SHA256");
  if (argc > 1 && strcmp(argv[1], "--digests") == 0) {
    digests(stdout);
    return 0;
  }
  known_answers();
  if (force) {
    CHECK(strcmp(cl_sha256_impl(), "portable") == 0);
  } else {
    /* Valgrind hides the SHA extensions from CPUID, so "portable" is right under it too. */
    int valgrind = getenv("LD_PRELOAD") && strstr(getenv("LD_PRELOAD"), "vgpreload");
    printf("block code: %s\n", cl_sha256_impl());
    if (!valgrind)
      CHECK(strcmp(cl_sha256_impl(), cpuinfo_has_shani() ? "sha-ni" : "portable") == 0);
    /* The same digests from the portable code, in a child forced to it. */
    int fd[2];
    CHECK(pipe(fd) == 0);
    pid_t pid = fork();
    if (pid == 0) {
      dup2(fd[1], 1);
      close(fd[0]);
      setenv("CLAWLUA_SHA256", "portable", 1);
      execl(argv[0], argv[0], "--digests", (char *)NULL);
      _exit(127);
    }
    close(fd[1]);
    FILE *theirs = fdopen(fd[0], "r");
    char *mine_buf = NULL;
    size_t mine_len = 0;
    FILE *mine = open_memstream(&mine_buf, &mine_len);
    digests(mine);
    fclose(mine);
    size_t cap = mine_len + 2, got = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + got, 1, cap - got, theirs)) > 0) got += n;
    fclose(theirs);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(buf && got == mine_len && memcmp(buf, mine_buf, mine_len) == 0);
    free(buf);
    free(mine_buf);
  }
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
