/*
 * Test fixture (not a product feature) for tests/lua/audit_kernel_spec.lua: a process that
 * installs a seccomp filter with libseccomp and then makes the filtered syscall, so that the
 * kernel writes an AUDIT_SECCOMP record for it. Used until tests can apply filters through
 * clawlua.seccomp.
 *
 * usage: seccomp_victim ACTION [COMM_HEX]
 *   ACTION  kill   SCMP_ACT_KILL_PROCESS on getppid (always logged by the kernel)
 *           errno  SCMP_ACT_ERRNO(EPERM) on getppid, filter loaded with the LOG flag
 *           flood:N  like errno, then N denied calls in a row (N kernel records)
 *   COMM_HEX  the process name to set first, hex-encoded (any bytes, invalid UTF-8 included)
 * Prints its pid, waits for a line on stdin (the test attributes the pid meanwhile), then calls
 * getppid. With errno it prints the result and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: seccomp_victim kill|errno [COMM_HEX]\n");
    return 2;
  }
  int kill = strcmp(argv[1], "kill") == 0;
  long flood = strncmp(argv[1], "flood:", 6) == 0 ? strtol(argv[1] + 6, NULL, 10) : 1;
  if (argc > 2) {
    char name[16] = {0};
    size_t n = strlen(argv[2]) / 2;
    for (size_t i = 0; i < n && i < sizeof name - 1; i++)
      name[i] = (char)(hexval(argv[2][2 * i]) * 16 + hexval(argv[2][2 * i + 1]));
    prctl(PR_SET_NAME, name, 0, 0, 0);
  }
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (!ctx) return 3;
  int rc = seccomp_rule_add(ctx, kill ? SCMP_ACT_KILL_PROCESS : SCMP_ACT_ERRNO(EPERM),
                            SCMP_SYS(getppid), 0);
  if (!rc && !kill) rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_LOG, 1);
  if (!rc) rc = seccomp_load(ctx);
  seccomp_release(ctx);
  if (rc) {
    fprintf(stderr, "seccomp_victim: %s\n", strerror(-rc));
    return 3;
  }
  printf("%d\n", (int)getpid());
  fflush(stdout);
  char line[64];
  if (!fgets(line, sizeof line, stdin)) return 4;
  long r = 0;
  for (long i = 0; i < flood; i++) r = syscall(SYS_getppid);
  printf("%ld %d\n", r, r < 0 ? errno : 0);
  return 0;
}
