/*
 * The control block a spawning child hands clawlua-seccomp-exec (tests/helpers/seccomp_exec.c)
 * in test builds for valgrind (CLAWLUA_SECCOMP_TRAMPOLINE): see cl_seccomp_child_trampoline.
 * Followed by ninsns struct sock_filter, then path\0 and argc strings, each \0-terminated.
 */
#ifndef CLAWLUA_SECCOMP_EXEC_H
#define CLAWLUA_SECCOMP_EXEC_H

#include <stdint.h>

struct seccomp_exec_ctl {
  uint32_t flags;  /* seccomp(SECCOMP_SET_MODE_FILTER, flags, ...) */
  uint32_t ninsns; /* BPF instructions that follow */
  int32_t sock;    /* notify filters: the socket to hand the listener over, else -1 */
  int32_t errfd;   /* the spawn's error pipe (made close-on-exec again before the exec) */
  uint32_t argc;
};

/* The spawn's failure report (runtime/spawn.c, child_report): same layout. */
struct seccomp_exec_report {
  int err;
  char stage[60];
};

#endif
