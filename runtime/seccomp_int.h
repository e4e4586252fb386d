/*
 * What seccomp.c (filters, the Lua module) shares with seccomp_notify.c (installing in a child,
 * the notify supervisor). Nothing else includes it.
 */
#ifndef CLAWLUA_SECCOMP_INT_H
#define CLAWLUA_SECCOMP_INT_H

#include "clawlua.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <seccomp.h>

#define FILTER_MT              "clawlua.seccomp.filter"
#define PREP_MT                "clawlua.seccomp.prepared"
#define SUPER_MT               "clawlua.seccomp.supervisor"
#define MAX_RULES              16384
#define MAX_ARCH               4
#define MAX_PENDING_LIMIT      4096
#define DEFAULT_MAX_PENDING    64
#define DEFAULT_NOTIFY_TIMEOUT 5.0
#define HANDOFF_TIMEOUT_MS     10000
#define MAX_READ_STRING        4096
#define MAX_SOCKADDR           128

struct cl_seccomp_prog {
  struct sock_fprog prog;
  unsigned int flags;
  int notify;
  int sock[2];     /* notify: the child hands the listener over sock[1] */
  int listener;    /* parent: the listener, once received */
  int carry_valid; /* a notification received during the hand-off that belongs to the program */
  struct seccomp_notif carry;
  double timeout;
  int max_pending;
  struct sock_filter insns[];
};

typedef struct rule {
  char name[48];
  uint32_t action;
  int extra;    /* >= 0: number from extra_syscalls (native architecture only) */
  unsigned src; /* the rules[] entry it came from (1-based), for errors */
  unsigned nargs;
  struct scmp_arg_cmp args[6];
} rule;

typedef struct filter {
  uint32_t def;
  uint32_t arches[MAX_ARCH];
  int narch;
  int optimize;
  int log;
  int notify; /* some rule notifies */
  int strict; /* unknown syscall names raise (else reported) */
  rule *rules;
  size_t nrules, cap;
  size_t redundant; /* rules whose action is the default: nothing to add */
  struct sock_filter *bpf;
  size_t ninsn;
  double notify_timeout;
  int max_pending;
  int closed;
} filter;

/* seccomp_rules.c */
uint32_t cl_seccomp_arch_token(const char *name);
const char *cl_seccomp_arch_name(uint32_t tok);
int cl_seccomp_errno_value(lua_State *L, int idx);
uint32_t cl_seccomp_parse_action(lua_State *L, int idx, const char *field);
void cl_seccomp_push_action(lua_State *L, uint32_t a);
int cl_seccomp_known_syscall(const filter *f, const char *name, int *extra);
rule *cl_seccomp_push_rule(lua_State *L, filter *f);
void cl_seccomp_add_rule(lua_State *L, filter *f, int idx, lua_Integer pos, int report);
/* seccomp.c */
filter *cl_seccomp_check_filter(lua_State *L, int i);
/* Raises "seccomp: out of memory". */
__attribute__((noreturn)) void cl_seccomp_oom(lua_State *L);
/* A syscall newer than libseccomp, by number (x86_64), or NULL. */
const char *cl_seccomp_extra_name(int nr);
/* The number of a syscall newer than libseccomp (x86_64), or -1. */
int cl_seccomp_extra_nr(const char *name);
/* __gc of a prepared program (seccomp_child.c): closes its sockets and listener. */
int cl_seccomp_prep_gc(lua_State *L);
/* Registers the metatables of prepared programs and supervisors (luaopen_clawlua_seccomp). */
void cl_seccomp_open_supervisor(lua_State *L);

#endif
