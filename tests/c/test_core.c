/* C-level tests of the internal API the primitives build on: timers, watches, spawning, JSON. */
#include "clawlua.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
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

static int count_fds(void) {
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  struct dirent *de;
  while ((de = readdir(d)))
    if (de->d_name[0] != '.') n++;
  closedir(d);
  return n - 1;
}

/* ---- timers: fire in deadline order under random insertion and cancellation ---- */
#define NT 2000
static uint64_t fired[NT];
static int nfired;
static void on_fire(cl_timer *t) {
  fired[nfired++] = t->deadline;
}

static void test_timers(lua_State *L) {
  cl_loop *lp = cl_loop_get(L);
  static cl_timer timers[NT];
  uint64_t base = cl_now_ns() + 1000000; /* 1 ms ahead */
  srand(7);
  for (int i = 0; i < NT; i++)
    cl_timer_start(lp, &timers[i], base + (uint64_t)(rand() % 20000000), on_fire);
  /* cancel every third one, re-arm every fifth one later */
  for (int i = 0; i < NT; i += 3) cl_timer_stop(&timers[i]);
  for (int i = 0; i < NT; i += 5)
    cl_timer_start(lp, &timers[i], base + 25000000u + (uint64_t)i, on_fire);
  int expected = 0;
  for (int i = 0; i < NT; i++) expected += timers[i].slot != 0;
  /* drive the loop until all fired */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "clawlua");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "sleep");
  lua_pushnumber(L, 0.05);
  lua_call(L, 1, 0);
  lua_pop(L, 1);
  CHECK(nfired == expected);
  int ordered = 1;
  for (int i = 1; i < nfired; i++)
    if (fired[i] < fired[i - 1]) ordered = 0;
  CHECK(ordered);
  for (int i = 0; i < NT; i++) CHECK(timers[i].slot == 0);
}

/* ---- spawning: success, failure in the child, no fds or children left ---- */
static void test_spawn(void) {
  int fds = count_fds();
  char path[256], err[256];
  CHECK(cl_find_executable("true", NULL, path, sizeof path) == 0);
  CHECK(cl_find_executable("no-such-binary-xyz", "/bin:/usr/bin", path, sizeof path) == ENOENT);

  cl_spawn_req req;
  memset(&req, 0, sizeof req);
  char *argv[] = {"sh", "-c", "exit 5", NULL};
  req.path = "/bin/sh";
  req.argv = argv;
  req.fds[0] = req.fds[1] = req.fds[2] = -1;
  pid_t pid;
  int pidfd;
  CHECK(cl_spawn(&req, &pid, &pidfd, err, sizeof err) == 0);
  siginfo_t si;
  memset(&si, 0, sizeof si);
  CHECK(waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED) == 0);
  CHECK(si.si_code == CLD_EXITED && si.si_status == 5);
  close(pidfd);

  req.cwd = "/nonexistent-dir";
  CHECK(cl_spawn(&req, &pid, &pidfd, err, sizeof err) == ENOENT);
  CHECK(strcmp(err, "chdir: No such file or directory") == 0);
  req.cwd = NULL;

  /* the fork path, with a child_setup that fails */
  req.child_setup = NULL;
  req.clone_flags = 0;
  CHECK(count_fds() == fds);
  CHECK(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD); /* nothing left to reap */
}

static int failing_setup(void *arg, const char **stage) {
  *stage = "custom stage";
  return EPERM;
}

static void test_spawn_fork_path(void) {
  int fds = count_fds();
  cl_spawn_req req;
  memset(&req, 0, sizeof req);
  char *argv[] = {"true", NULL};
  char err[256];
  req.path = "/bin/true";
  req.argv = argv;
  req.fds[0] = req.fds[1] = req.fds[2] = -1;
  req.child_setup = failing_setup;
  pid_t pid;
  int pidfd;
  CHECK(cl_spawn(&req, &pid, &pidfd, err, sizeof err) == EPERM);
  CHECK(strcmp(err, "custom stage: Operation not permitted") == 0);
  CHECK(count_fds() == fds);
  CHECK(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD);
}

/* ---- JSON C API ---- */
static void test_json(lua_State *L) {
  const char *doc = "{\"a\":[1,2,{\"b\":null}],\"c\":\"\\u00e9\"}";
  CHECK(cl_json_decode(L, doc, strlen(doc)) == 1);
  size_t n;
  const char *s = cl_json_encode(L, -1, &n);
  CHECK(s != NULL);
  lua_pop(L, 2);
  CHECK(cl_json_decode(L, "[1,", 3) == 0);
  CHECK(lua_isnil(L, -2));
  CHECK(strcmp(lua_tostring(L, -1), "json: unexpected end of input at byte 4") == 0);
  lua_pop(L, 2);
  lua_pushcfunction(L, luaopen_clawlua); /* a function cannot be encoded */
  CHECK(cl_json_encode(L, -1, &n) == NULL);
  CHECK(strcmp(lua_tostring(L, -1), "json: cannot encode a function value at $") == 0);
  lua_pop(L, 2);
}

/* ---- a wait woken, then its task cancelled before it ran: the owner's on_abort still runs ---- */
static cl_waitq test_q;
static int aborts, rewaits;

static void count_abort(cl_wait *w) {
  (void)w;
  aborts++;
}

/* Waits on test_q, and once woken waits again (like an operation with several steps). */
static int stepper_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  cl_wait *w = cl_wait_resumed(L, ctx);
  rewaits++;
  cl_waitq_add(&test_q, w);
  return cl_wait_suspend(L, w, stepper_k, ctx);
}

static int stepper(lua_State *L) {
  cl_wait *w = cl_wait_push(L);
  w->on_abort = count_abort;
  cl_waitq_add(&test_q, w);
  return cl_wait_suspend(L, w, stepper_k, lua_gettop(L));
}

static void test_cancel_after_wake(lua_State *L) {
  lua_pushcfunction(L, stepper);
  lua_setglobal(L, "stepper");
  int rc = luaL_dostring(L, "local claw = require 'clawlua'\n"
                            "local t = claw.spawn(stepper)\n"
                            "claw.sleep(0)\n" /* t waits */
                            "return t");
  CHECK(rc == LUA_OK);
  CHECK(aborts == 0 && rewaits == 0);
  cl_waitq_wake_all(&test_q, 0); /* woken: ready to run, not yet running */
  lua_getfield(L, -1, "cancel");
  lua_pushvalue(L, -2);
  lua_call(L, 1, 0); /* cancelled before it runs */
  lua_getfield(L, -1, "join");
  lua_pushvalue(L, -2);
  lua_call(L, 1, 2);
  CHECK(lua_isnil(L, -2));
  CHECK(lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "cancelled") == 0);
  CHECK(rewaits == 1); /* it ran its next step, whose wait got the cancellation */
  CHECK(aborts == 1);  /* and the owner of that wait heard of it */
  CHECK(cl_waitq_empty(&test_q));
  lua_pop(L, 3);
}

static void test_parse_mac(void) {
  uint8_t m[6];
  CHECK(cl_parse_mac("02:aB:0c:D0:e1:Ff", m));
  CHECK(m[0] == 0x02 && m[1] == 0xab && m[2] == 0x0c && m[3] == 0xd0 && m[4] == 0xe1 &&
        m[5] == 0xff);
  CHECK(!cl_parse_mac("02:ab:0c:d0:e1", m));     /* short */
  CHECK(!cl_parse_mac("02:ab:0c:d0:e1:ff:", m)); /* long */
  CHECK(!cl_parse_mac("02-ab-0c-d0-e1-ff", m));  /* separators */
  CHECK(!cl_parse_mac("02:ab:0c:d0:e1:fg", m));  /* not hex */
  CHECK(!cl_parse_mac(NULL, m));
}

int main(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "clawlua", luaopen_clawlua, 0);
  lua_pop(L, 1);
  int top = lua_gettop(L);
  test_timers(L);
  test_spawn();
  test_parse_mac();
  test_spawn_fork_path();
  test_json(L);
  test_cancel_after_wake(L);
  CHECK(lua_gettop(L) == top);
  lua_close(L);
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
