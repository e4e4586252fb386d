/*
 * clawlua.proc: child processes (the start itself is in spawn.c). Spawning uses
 * clone(CLONE_VM | CLONE_VFORK) like posix_spawn (the child borrows our memory until exec, so
 * starting a process costs no page-table copy),
 * or a fork-style clone3 when the jail needs code in the child and a hand-shake with the parent.
 * Children are tracked by pidfd: waits are loop readiness, signals cannot hit a recycled pid.
 *
 * A process handle owns the child, its pidfd and its pipes. Closing or collecting a handle of
 * a running child kills its process group and leaves the reaping to the loop: no zombies.
 */
#include "clawlua.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#endif

#define PROC_MT   "clawlua.proc"
#define STREAM_MT "clawlua.stream"

extern char **environ;
int cl_entry_redirect(lua_State *L, const char *name);

/* ------------------------------------------------------------------------------------------ */
/* Process handles                                                                            */

typedef struct proc {
  pid_t pid;
  int pidfd;
  int group; /* the child leads a process group: kill the group on close */
  int reaped;
  int closed;
  int code, signo, core;
  struct rusage ru;
  double started, ended;
  cl_watch watch;
  cl_proc_ext *ext; /* owned: released after the child on every path */
  int ext_reaped;
  char name[64];
} proc;

static void ext_reaped(proc *p, lua_State *L) {
  if (p->ext && !p->ext_reaped) {
    p->ext_reaped = 1;
    p->ext->reaped(p->ext, L, p->pid);
  }
}

static void ext_done(void *arg) {
  cl_proc_ext *x = arg;
  x->reaped(x, NULL, 0);
  x->destroy(x);
}

static proc *check_proc(lua_State *L, int i) {
  return luaL_checkudata(L, i, PROC_MT);
}

/* Reaps if the child has exited. Returns 1 when reaped (now or before). */
static int try_reap_L(proc *p, lua_State *L) {
  if (p->reaped) return 1;
  if (p->pidfd < 0) return 0;
  siginfo_t si;
  memset(&si, 0, sizeof si);
  long r;
  do r = syscall(SYS_waitid, P_PIDFD, p->pidfd, &si, WEXITED | WNOHANG, &p->ru);
  while (r < 0 && errno == EINTR);
  if (r < 0 || si.si_pid == 0) return 0;
  p->reaped = 1;
  p->ended = cl_now();
  if (si.si_code == CLD_EXITED) {
    p->code = si.si_status;
    p->signo = 0;
  } else {
    p->code = -1;
    p->signo = si.si_status;
    p->core = si.si_code == CLD_DUMPED;
  }
  cl_watch_stop(&p->watch);
  close(p->pidfd);
  p->pidfd = -1;
  ext_reaped(p, L);
  return 1;
}

static void push_status(lua_State *L, proc *p) {
  lua_createtable(L, 0, 8);
  if (p->signo) {
    lua_pushinteger(L, p->signo);
    lua_setfield(L, -2, "signal");
    lua_pushstring(L, cl_signal_name(p->signo));
    lua_setfield(L, -2, "signal_name");
    lua_pushboolean(L, p->core);
    lua_setfield(L, -2, "core_dumped");
  } else {
    lua_pushinteger(L, p->code);
    lua_setfield(L, -2, "code");
  }
  lua_pushinteger(L, p->pid);
  lua_setfield(L, -2, "pid");
  lua_pushnumber(L, p->ended - p->started);
  lua_setfield(L, -2, "duration");
  lua_pushnumber(L, (double)p->ru.ru_utime.tv_sec + (double)p->ru.ru_utime.tv_usec / 1e6);
  lua_setfield(L, -2, "utime");
  lua_pushnumber(L, (double)p->ru.ru_stime.tv_sec + (double)p->ru.ru_stime.tv_usec / 1e6);
  lua_setfield(L, -2, "stime");
  lua_pushinteger(L, p->ru.ru_maxrss);
  lua_setfield(L, -2, "maxrss_kb");
  if (p->ext) p->ext->status(p->ext, L);
}

static int kill_child(proc *p, int sig, int group) {
  if (p->reaped || p->pidfd < 0) return ESRCH;
  /* Until we reap it, the child's pid (and the group id it leads) cannot be reused, so plain
   * kill() is as exact as pidfd_send_signal, and works where that is missing (valgrind). */
  if (group && p->group && kill(-p->pid, sig) == 0) return 0;
  if (kill(p->pid, sig) < 0) return errno;
  return 0;
}

/* Kills a running child and hands the reaping to the loop. */
static void proc_release(lua_State *L, proc *p) {
  if (p->closed) return;
  p->closed = 1;
  if (!p->reaped && p->pidfd >= 0) {
    kill_child(p, SIGKILL, 1);
    if (p->ext) p->ext->kill(p->ext);
    if (!try_reap_L(p, L)) {
      cl_watch_stop(&p->watch);
      cl_loop *lp = p->watch.loop ? p->watch.loop : cl_loop_get(L);
      if (p->ext) { /* the reaper releases the rest once the child is gone */
        cl_reap_later_then(lp, p->pid, p->pidfd, ext_done, p->ext);
        p->ext = NULL;
      } else {
        cl_reap_later(lp, p->pid, p->pidfd);
      }
      p->pidfd = -1;
    }
  }
  /* The notify supervisor stops with the handle. */
  if (lua_getiuservalue(L, 1, 4) == LUA_TUSERDATA && luaL_callmeta(L, -1, "__close")) lua_pop(L, 1);
  lua_pop(L, 1);
  /* Pipes: close the streams the handle owns. */
  for (int i = 1; i <= 3; i++) {
    if (lua_getiuservalue(L, 1, i) == LUA_TUSERDATA && luaL_callmeta(L, -1, "__gc")) lua_pop(L, 1);
    lua_pop(L, 1);
  }
}

static int wait_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  proc *p = check_proc(L, 1);
  if (try_reap_L(p, L)) {
    push_status(L, p);
    return 1;
  }
  if (w->state == CL_WAIT_TIMEOUT) return cl_timed_out(L);
  if (p->pidfd < 0 || p->closed) return cl_failf(L, ECHILD, "wait: process handle closed");
  return cl_watch_wait(L, w, &p->watch, 0, wait_k, ctx);
}

/* Lua: p:wait([timeout]) -> {code=|signal=, signal_name=, pid=, duration=, utime=, stime=,
 * maxrss_kb=} | nil, "timeout", "ETIMEDOUT" */
static int l_wait(lua_State *L) {
  proc *p = check_proc(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 2);
  if (try_reap_L(p, L)) {
    push_status(L, p);
    return 1;
  }
  if (p->closed || p->pidfd < 0) return cl_failf(L, ECHILD, "wait: process handle closed");
  cl_wait *w = cl_wait_push(L);
  w->deadline = cl_deadline(timeout);
  return cl_watch_wait(L, w, &p->watch, 0, wait_k, lua_gettop(L));
}

/* Lua: p:kill([sig="TERM"], ["group"]) -> true | nil, err, code */
static int l_kill(lua_State *L) {
  proc *p = check_proc(L, 1);
  int sig = lua_isnoneornil(L, 2) ? SIGTERM : cl_signal_number(L, 2);
  if (sig < 0) return luaL_argerror(L, 2, "unknown signal");
  int group = 0;
  if (!lua_isnoneornil(L, 3)) {
    const char *g = luaL_checkstring(L, 3);
    if (strcmp(g, "group") != 0) return luaL_argerror(L, 3, "\"group\" expected");
    group = 1;
  }
  if (p->reaped || p->closed) return cl_failf(L, ESRCH, "kill: process %d has exited", p->pid);
  int e = kill_child(p, sig, group);
  if (e) return cl_fail(L, "kill", e);
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: p:pid() -> the child's pid (it stays the handle's after the exit: no other process gets
 * it while the handle has not reaped it) */
static int l_pid(lua_State *L) {
  lua_pushinteger(L, check_proc(L, 1)->pid);
  return 1;
}

/* Lua: p:running() -> boolean (reaps without blocking) */
static int l_running(lua_State *L) {
  proc *p = check_proc(L, 1);
  lua_pushboolean(L, !p->closed && !try_reap_L(p, L));
  return 1;
}

/* Lua: p:status() -> status table or nil while running */
static int l_status(lua_State *L) {
  proc *p = check_proc(L, 1);
  if (!try_reap_L(p, L)) return 0;
  push_status(L, p);
  return 1;
}

static int l_close(lua_State *L) {
  proc_release(L, check_proc(L, 1));
  lua_pushboolean(L, 1);
  return 1;
}

static int l_gc(lua_State *L) {
  proc *p = lua_touserdata(L, 1);
  proc_release(L, p);
  if (p->ext) { /* reaped already (or never started): release what is left */
    ext_reaped(p, NULL);
    p->ext->destroy(p->ext);
    p->ext = NULL;
  }
  return 0;
}

static int l_tostring(lua_State *L) {
  proc *p = check_proc(L, 1);
  lua_pushfstring(L, "clawlua.proc (%s, pid %d, %s)", p->name, (int)p->pid,
                  p->reaped ? "exited" : (p->closed ? "closed" : "running"));
  return 1;
}

static const luaL_Reg methods[] = {
    {"wait", l_wait},     {"kill", l_kill},   {"running", l_running}, {"pid", l_pid},
    {"status", l_status}, {"close", l_close}, {NULL, NULL},
};

static int l_index(lua_State *L) {
  check_proc(L, 1);
  const char *k = luaL_checkstring(L, 2);
  static const char *const stdio[] = {"stdin", "stdout", "stderr"};
  for (int i = 0; i < 3; i++)
    if (strcmp(k, stdio[i]) == 0) {
      lua_getiuservalue(L, 1, i + 1);
      return 1;
    }
  if (strcmp(k, "seccomp") == 0) {
    lua_getiuservalue(L, 1, 4);
    return 1;
  }
  if (strcmp(k, "jail") == 0) {
    lua_getiuservalue(L, 1, 5);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* proc.spawn                                                                                 */

/* How one stdio slot is set up: resolved before any fd is created. */
typedef struct stdio_spec {
  int kind; /* 0 inherit, 1 null, 2 pipe, 3 fd (borrowed), 4 path (opened), 5 same as stdout */
  int fd;
  const char *path;
  int flags;
} stdio_spec;

static void parse_stdio(lua_State *L, int opts, const char *name, int slot, stdio_spec *sp) {
  memset(sp, 0, sizeof *sp);
  sp->fd = -1;
  int t = lua_getfield(L, opts, name);
  if (t == LUA_TNIL) {
    sp->kind = 0;
  } else if (t == LUA_TSTRING) {
    const char *s = lua_tostring(L, -1);
    if (strcmp(s, "inherit") == 0)
      sp->kind = 0;
    else if (strcmp(s, "null") == 0)
      sp->kind = 1;
    else if (strcmp(s, "pipe") == 0)
      sp->kind = 2;
    else if (slot == 2 && strcmp(s, "stdout") == 0)
      sp->kind = 5;
    else {
      const char *msg = lua_pushfstring(L,
                                        "\"inherit\", \"null\", \"pipe\"%s, a file, a stream, "
                                        "an fd or {path=, mode=} expected, got \"%s\"",
                                        slot == 2 ? ", \"stdout\"" : "", s);
      cl_field_error(L, name, msg);
    }
  } else if (t == LUA_TNUMBER && lua_isinteger(L, -1)) {
    sp->kind = 3;
    sp->fd = (int)lua_tointeger(L, -1);
    if (fcntl(sp->fd, F_GETFD) < 0) cl_field_error(L, name, "not an open file descriptor");
  } else if (t == LUA_TUSERDATA) {
    luaL_Stream *f = luaL_testudata(L, -1, LUA_FILEHANDLE);
    cl_stream *s = luaL_testudata(L, -1, STREAM_MT);
    sp->kind = 3;
    if (f && f->closef && f->f)
      sp->fd = fileno(f->f);
    else if (s)
      sp->fd = cl_stream_fd(s);
    if (sp->fd < 0) cl_field_error(L, name, "closed file or stream");
    if (f && f->f) fflush(f->f);
  } else if (t == LUA_TTABLE) {
    static const char *const fields[] = {"path", "mode", NULL};
    cl_check_fields(L, -1, fields);
    sp->kind = 4;
    lua_getfield(L, -1, "path");
    sp->path = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (!sp->path) cl_field_error(L, name, "path missing");
    const char *mode = cl_opt_string(L, lua_gettop(L), "mode", slot == 0 ? "r" : "w");
    if (strcmp(mode, "r") == 0)
      sp->flags = O_RDONLY;
    else if (strcmp(mode, "w") == 0)
      sp->flags = O_WRONLY | O_CREAT | O_TRUNC;
    else if (strcmp(mode, "a") == 0)
      sp->flags = O_WRONLY | O_CREAT | O_APPEND;
    else
      cl_field_error(L, name, "mode must be \"r\", \"w\" or \"a\"");
  } else {
    const char *msg =
        lua_pushfstring(L, "string, integer, file or table expected, got %s", luaL_typename(L, -1));
    cl_field_error(L, name, msg);
  }
  lua_pop(L, 1); /* strings stay anchored in the option table */
}

/* Copies env's name -> value pairs into merged (false unsets a name). */
static void merge_env(lua_State *L, int env, int merged) {
  lua_pushnil(L);
  while (lua_next(L, env)) {
    if (lua_type(L, -2) != LUA_TSTRING ||
        (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER &&
         lua_type(L, -1) != LUA_TBOOLEAN))
      cl_field_error(L, "env", "string keys with string values expected");
    size_t kl;
    const char *k = lua_tolstring(L, -2, &kl);
    if (kl == 0 || strchr(k, '=') || strlen(k) != kl)
      cl_field_error(L, lua_pushfstring(L, "env.%s", k), "invalid variable name");
    lua_pushvalue(L, -2);
    if (lua_type(L, -2) == LUA_TBOOLEAN && !lua_toboolean(L, -2))
      lua_pushnil(L); /* unset */
    else
      lua_pushstring(L, luaL_tolstring(L, -2, NULL)), lua_remove(L, -2);
    lua_rawset(L, merged);
    lua_pop(L, 1);
  }
}

/* Builds envp in a userdata vector pushed on the stack, or returns NULL (pushing nothing) when
 * the child inherits the environment as it is. env merges into the runtime's environment (or an
 * empty one with env_clear = true). */
static char **build_env(lua_State *L, int opts) {
  int top = lua_gettop(L);
  int has_env = lua_getfield(L, opts, "env") != LUA_TNIL;
  if (has_env && !lua_istable(L, -1)) cl_field_error(L, "env", "table expected");
  int clear = cl_opt_boolean(L, opts, "env_clear", 0);
  if (!has_env && !clear) {
    lua_settop(L, top);
    return NULL;
  }
  lua_newtable(L);
  int merged = lua_gettop(L);
  for (char **e = clear ? NULL : environ; e && *e; e++) {
    const char *eq = strchr(*e, '=');
    if (!eq) continue;
    lua_pushlstring(L, *e, (size_t)(eq - *e));
    lua_pushstring(L, eq + 1);
    lua_rawset(L, merged);
  }
  if (has_env) merge_env(L, top + 1, merged);
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, merged)) {
    n++;
    lua_pop(L, 1);
  }
  char **v = lua_newuserdatauv(L, sizeof(char *) * (n + 1), 1);
  lua_newtable(L);
  size_t i = 0;
  lua_pushnil(L);
  while (lua_next(L, merged)) {
    const char *kv = lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
    v[i++] = (char *)kv;
    lua_rawseti(L, -4, (lua_Integer)i);
    lua_pop(L, 1);
  }
  v[n] = NULL;
  lua_setiuservalue(L, -2, 1);
  /* Keep only the vector: it anchors its strings. */
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
  return v;
}

static const char *env_path(char **envp) {
  if (!envp) return getenv("PATH");
  for (char **e = envp; *e; e++)
    if (strncmp(*e, "PATH=", 5) == 0) return *e + 5;
  return NULL;
}

/* Lua: proc.spawn{argv... | argv=, cwd=, env=, env_clear=, stdin=, stdout=, stderr=, group=true,
 * session=false, pdeathsig="KILL", seccomp=filter, fds={fd, ...}} -> process | nil, err, code */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  return cl_proc_spawn(L, 1, NULL);
}

/* What proc.spawn's options say, read and checked before anything is made. The strings and
 * vectors stay anchored on the Lua stack (argv, envp, the prepared seccomp program). */
typedef struct spawn_opts {
  char **argv, **envp;
  const char *cwd;
  int group, session, pdeath;
  stdio_spec sp[3];
  cl_seccomp_prog *sc;
  int sc_idx;
  int pass[CL_MAX_PASS_FDS], npass;
} spawn_opts;

/* fds = {fd, ...}: open fds the child gets as 3, 4, ... (borrowed: the caller keeps them). */
static void read_pass_fds(lua_State *L, int opts, spawn_opts *o) {
  if (lua_getfield(L, opts, "fds") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "fds", "list of open file descriptors expected");
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    if (n > CL_MAX_PASS_FDS) cl_field_error(L, "fds", "more than 16 file descriptors");
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      int isnum;
      lua_Integer fd = lua_tointegerx(L, -1, &isnum);
      if (!isnum || fd < 0 || fd > 0x7fffffff || fcntl((int)fd, F_GETFD) < 0)
        cl_field_error(L, "fds", lua_pushfstring(L, "entry %I is not an open file descriptor", i));
      o->pass[o->npass++] = (int)fd;
      lua_pop(L, 1);
    }
    if (o->npass && o->sc && cl_seccomp_prog_notifies(o->sc))
      cl_field_error(L, "fds", "cannot be passed together with a notify seccomp filter");
  }
  lua_pop(L, 1);
}

/* Reads every option (raising on misuse); pushes what must stay anchored. */
static void read_spawn_opts(lua_State *L, int opts, const cl_spawn_hooks *hooks, spawn_opts *o) {
  static const char *const fields[] = {"argv",   "cwd",     "env",   "env_clear", "stdin",
                                       "stdout", "stderr",  "group", "session",   "pdeathsig",
                                       "name",   "seccomp", "fds",   NULL};
  memset(o, 0, sizeof *o);
  /* Unknown fields: ours plus the caller's. */
  const char *known[64];
  size_t nk = 0;
  for (const char *const *f = fields; *f; f++) known[nk++] = *f;
  for (const char *const *f = hooks ? hooks->fields : NULL; f && *f && nk < 63; f++)
    known[nk++] = *f;
  known[nk] = NULL;
  cl_check_fields(L, opts, known);
  if (lua_getfield(L, opts, "argv") != LUA_TNIL) {
    if (lua_rawlen(L, opts) > 0) cl_field_error(L, "argv", "given twice (positional and argv=)");
    o->argv = cl_check_argv(L, -1, "argv", 0);
  } else {
    o->argv = cl_check_argv(L, opts, "argv", 0);
  }
  int argv_idx = lua_gettop(L);
  o->cwd = cl_opt_string(L, opts, "cwd", NULL);
  o->group = cl_opt_boolean(L, opts, "group", 1);
  o->session = cl_opt_boolean(L, opts, "session", 0);
  o->pdeath = SIGKILL;
  if (lua_getfield(L, opts, "pdeathsig") != LUA_TNIL) {
    if (lua_isboolean(L, -1) && !lua_toboolean(L, -1))
      o->pdeath = 0;
    else if ((o->pdeath = cl_signal_number(L, -1)) < 0)
      cl_field_error(L, "pdeathsig", "unknown signal");
  }
  lua_pop(L, 1);
  static const char *const names[] = {"stdin", "stdout", "stderr"};
  for (int i = 0; i < 3; i++) parse_stdio(L, opts, names[i], i, &o->sp[i]);
  o->envp = build_env(L, opts);
  lua_settop(L, argv_idx + (o->envp ? 1 : 0));
  if (lua_getfield(L, opts, "seccomp") != LUA_TNIL) {
    o->sc = cl_seccomp_prepare(L, -1);
    lua_remove(L, -2);
    o->sc_idx = lua_gettop(L);
  } else {
    lua_pop(L, 1);
  }
  read_pass_fds(L, opts, o);
}

/* Opens the child's stdio as the options say: child_fd[i] is what the child gets as fd i (-2:
 * inherit, -1: /dev/null), parent_fd[i] the parent's end of a pipe, opened[i] what to close
 * after the spawn. Returns 0 or an errno (*what names the file that failed). */
static int open_stdio(const stdio_spec sp[3], int child_fd[3], int parent_fd[3], int opened[3],
                      const char **what) {
  for (int i = 0; i < 3; i++) {
    switch (sp[i].kind) {
    case 0:
      child_fd[i] = -2;
      break;
    case 1:
      child_fd[i] = -1;
      break;
    case 2: {
      int pp[2];
      if (pipe2(pp, O_CLOEXEC) < 0) return errno;
      parent_fd[i] = i == 0 ? pp[1] : pp[0];
      child_fd[i] = i == 0 ? pp[0] : pp[1];
      opened[i] = child_fd[i];
      break;
    }
    case 3:
      child_fd[i] = sp[i].fd;
      break;
    case 4:
      opened[i] = child_fd[i] = open(sp[i].path, sp[i].flags | O_CLOEXEC, 0644);
      if (opened[i] < 0) {
        *what = sp[i].path;
        return errno;
      }
      break;
    case 5:
      child_fd[i] = child_fd[1] == -2 ? 1 : child_fd[1];
      break;
    }
  }
  return 0;
}

/* Before any fd or child exists: the program and the working directory must be there. Returns
 * 0, or pushes the failure and returns its count. */
static int preflight(lua_State *L, const spawn_opts *o, int in_jail, char *path, size_t pathlen) {
  char **argv = o->argv;
  if (in_jail) return 0;
  int e = cl_find_executable(argv[0], env_path(o->envp), path, pathlen);
  if (e) {
    if (e == ENOENT && !strchr(argv[0], '/'))
      return cl_failf(L, e, "spawn %s: not found in PATH", argv[0]);
    return cl_failf(L, e, "spawn %s: %s", argv[0], strerror(e));
  }
  struct stat st;
  if (o->cwd && stat(o->cwd, &st) < 0)
    return cl_failf(L, errno, "spawn %s: cwd %s: %s", argv[0], o->cwd, strerror(errno));
  if (o->cwd && !S_ISDIR(st.st_mode))
    return cl_failf(L, ENOTDIR, "spawn %s: cwd %s: not a directory", argv[0], o->cwd);
  return 0;
}

/* After a successful spawn: the handle at pi takes the child, its supervisor and its pipes. */
static void adopt_child(lua_State *L, int pi, proc *p, const spawn_opts *o,
                        const cl_spawn_hooks *hooks, const int parent_fd[3]) {
  p->closed = 0;
  p->group = o->group || o->session;
  p->started = cl_now();
  cl_watch_start(cl_loop_get(L), &p->watch, p->pidfd, 0, NULL);
  if (o->sc && cl_seccomp_prog_notifies(o->sc)) {
    cl_seccomp_supervise(L, o->sc_idx, p->pid, hooks ? hooks->sandbox : NULL);
    lua_setiuservalue(L, pi, 4);
  }
  if (hooks && hooks->started) {
    lua_pushvalue(L, pi);
    hooks->started(L, lua_gettop(L), p->pid, hooks->arg);
    lua_settop(L, pi);
  }
  static const char *const names[] = {"stdin", "stdout", "stderr"};
  for (int i = 0; i < 3; i++) {
    if (parent_fd[i] < 0) continue;
    cl_stream_new(L, parent_fd[i], i == 0 ? CL_STREAM_WRITE : CL_STREAM_READ, names[i]);
    lua_setiuservalue(L, pi, i + 1);
  }
  lua_settop(L, pi);
}

int cl_proc_spawn(lua_State *L, int opts, const cl_spawn_hooks *hooks) {
  opts = lua_absindex(L, opts);
  luaL_checktype(L, opts, LUA_TTABLE);
  spawn_opts o;
  read_spawn_opts(L, opts, hooks, &o);
  char **argv = o.argv;
  int in_jail = hooks && hooks->in_jail;
  char path[4096];
  int n = preflight(L, &o, in_jail, path, sizeof path);
  if (n) return n;
  /* The handle exists before any fd, so every later failure has an owner to release. */
  proc *p = lua_newuserdatauv(L, sizeof *p, 5);
  memset(p, 0, sizeof *p);
  p->pidfd = -1;
  p->closed = 1;
  luaL_setmetatable(L, PROC_MT);
  int pi = lua_gettop(L);
  snprintf(p->name, sizeof p->name, "%s", argv[0]);
  cl_spawn_req req;
  memset(&req, 0, sizeof req);
  char msg[512] = "";
  if (hooks && hooks->prepare) {
    /* The handle owns the extension from here: collecting it on an error releases it. */
    /* What prepare pushes stays on the stack (above the handle) until we return. */
    int pe = hooks->prepare(L, opts, &req, hooks->arg, &p->ext, msg, sizeof msg);
    if (pe) { /* never started: release what prepare made (cgroups) now, not at collection */
      if (p->ext) p->ext->destroy(p->ext);
      p->ext = NULL;
      return cl_failf(L, pe, "spawn %s: %s", argv[0], msg);
    }
  }
  int child_fd[3] = {-2, -2, -2}, parent_fd[3] = {-1, -1, -1}, opened[3] = {-1, -1, -1};
  const char *what = "pipe";
  int err = open_stdio(o.sp, child_fd, parent_fd, opened, &what);
  if (!err) {
    req.path = in_jail ? (strchr(argv[0], '/') ? argv[0] : NULL) : path;
    req.search_path = env_path(o.envp);
    req.argv = argv;
    req.envp = o.envp;
    req.cwd = o.cwd;
    req.cwd_after_setup = in_jail;
    for (int i = 0; i < 3; i++) req.fds[i] = child_fd[i];
    req.new_pgroup = o.group;
    req.new_session = o.session;
    req.pdeathsig = o.pdeath;
    req.seccomp = o.sc;
    req.pass_fds = o.pass;
    req.npass = o.npass;
    err = cl_spawn(&req, &p->pid, &p->pidfd, msg, sizeof msg);
    what = NULL;
  }
  for (int i = 0; i < 3; i++)
    if (opened[i] >= 0) close(opened[i]);
  if (err) {
    for (int i = 0; i < 3; i++)
      if (parent_fd[i] >= 0) close(parent_fd[i]);
    if (p->ext) p->ext->destroy(p->ext);
    p->ext = NULL;
    if (what) return cl_failf(L, err, "spawn %s: %s: %s", argv[0], what, strerror(err));
    return cl_failf(L, err, "spawn %s: %s", argv[0], msg);
  }
  adopt_child(L, pi, p, &o, hooks, parent_fd);
  return 1;
}

pid_t cl_proc_pid(lua_State *L, int idx) {
  proc *p = luaL_testudata(L, idx, PROC_MT);
  return p ? p->pid : 0;
}

int cl_proc_pidfd(lua_State *L, int idx) {
  proc *p = luaL_testudata(L, idx, PROC_MT);
  return p && !p->reaped && !p->closed ? p->pidfd : -1;
}

/* Lua: proc.run{...} -> {code|signal, stdout, stderr, truncated, timed_out, duration, ...}:
 * written in Lua (lua/clawlua/proc_run.lua) on top of spawn and the loop's tasks. */
static int l_run(lua_State *L) {
  return cl_call_lua(L, "clawlua.proc_run", "run");
}

/* Lua: proc.find_executable(name) -> path | nil, err */
static int l_find_executable(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  char out[4096];
  int e = cl_find_executable(name, getenv("PATH"), out, sizeof out);
  if (e) return cl_failf(L, e, "%s: %s", name, e == ENOENT ? "not found in PATH" : strerror(e));
  lua_pushstring(L, out);
  return 1;
}

/* Lua: proc.diagnostics() -> {fds = n, children = {pid, ...}} for leak checks. */
static int l_diagnostics(lua_State *L) {
  lua_createtable(L, 0, 2);
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  if (d) {
    struct dirent *de;
    while ((de = readdir(d)))
      if (de->d_name[0] != '.') n++;
    closedir(d);
    n--; /* the directory's own fd */
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "fds");
  lua_newtable(L);
  int k = 0;
  char path[64];
  snprintf(path, sizeof path, "/proc/self/task/%d/children", (int)getpid());
  FILE *f = fopen(path, "re");
  if (f) {
    char buf[8192];
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    buf[got] = 0;
    fclose(f);
    for (char *p = buf, *end; *p; p = end) {
      long pid = strtol(p, &end, 10);
      if (end == p) break;
      lua_pushinteger(L, pid);
      lua_rawseti(L, -2, ++k);
    }
  }
  lua_setfield(L, -2, "children");
  return 1;
}

/* Lua: proc.namespace(kind) -> "net:[4026531840]" (this process's namespace of that kind, as
 * /proc/self/ns/<kind> names it) | nil, err, errno. kind: net, mnt, pid, user, uts, ipc, cgroup */
static int l_namespace(lua_State *L) {
  static const char *const kinds[] = {"net", "mnt", "pid", "user", "uts", "ipc", "cgroup", NULL};
  const char *kind = kinds[luaL_checkoption(L, 1, NULL, kinds)];
  char path[64], target[128];
  snprintf(path, sizeof path, "/proc/self/ns/%s", kind);
  ssize_t n = readlink(path, target, sizeof target - 1);
  if (n < 0) return cl_fail(L, path, errno);
  target[n] = 0;
  lua_pushstring(L, target);
  return 1;
}

static const luaL_Reg funcs[] = {
    {"spawn", l_spawn},
    {"namespace", l_namespace},
    {"run", l_run},
    {"find_executable", l_find_executable},
    {"diagnostics", l_diagnostics},
    {"try_lock", cl_proc_try_lock},
    {NULL, NULL},
};

int luaopen_clawlua_proc(lua_State *L) {
  if (cl_entry_redirect(L, "proc")) return 1;
  /* __index is a function: the read-only identity fields, then the methods kept in the
   * metatable's "methods" table. */
  static const luaL_Reg meta[] = {{"__index", l_index}, {"__tostring", l_tostring}, {NULL, NULL}};
  static const cl_class cls = {PROC_MT, NULL, l_gc, meta};
  cl_class_register(L, &cls);
  luaL_getmetatable(L, PROC_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "methods");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
