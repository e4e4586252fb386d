/*
 * The core of a VM, below the drivers and the channel: its state, its audit events and errors,
 * the VMM process (spawned through the jail's C API, watched by pidfd), and its release. It
 * calls down only (host.c, the jail, proc); what the drivers and the channel hold is released
 * through v->ops, which vm.create sets.
 */
#include "../jail.h"
#include "vm.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/kvm.h>
#include <net/if.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

const char cl_vm_ids_key = 'i';

static const char *const state_names[] = {"created",  "starting", "running", "paused",
                                          "stopping", "exited",   "failed"};

const char *cl_vm_state_name(int s) {
  return s >= 0 && (size_t)s < CL_ARRAY_LEN(state_names) ? state_names[s] : "?";
}

vm *cl_vm_check(lua_State *L, int idx) {
  vm *v = luaL_checkudata(L, idx, VM_MT);
  if (v->released) luaL_error(L, "attempt to use a closed vm");
  return v;
}

char *cl_vm_dupstr(const char *s) {
  if (!s) return NULL;
  char *d = strdup(s);
  if (!d) abort(); /* a few bytes of configuration: out of memory here is not recoverable */
  return d;
}

void cl_vm_changed(vm *v) {
  cl_waitq_wake_all(&v->changed, 0);
}

static void on_poll_timer(cl_timer *t) {
  vm *v = (vm *)((char *)t - offsetof(vm, poll_timer));
  cl_vm_changed(v);
}

void cl_vm_poll_in(vm *v, unsigned ms) {
  cl_timer_start(v->loop, &v->poll_timer, cl_now_ns() + (uint64_t)ms * 1000000u, on_poll_timer);
}

void cl_vm_log_tail(vm *v, char *buf, size_t n) {
  buf[0] = 0;
  if (!v->log_path[0] || n < 2) return;
  int fd = open(v->log_path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  struct stat st;
  if (fstat(fd, &st) == 0) {
    off_t off = st.st_size > (off_t)(n - 1) ? st.st_size - (off_t)(n - 1) : 0;
    ssize_t got = pread(fd, buf, n - 1, off);
    if (got < 0) got = 0;
    buf[got] = 0;
    /* Trim: whitespace at the ends, NULs inside (a binary log must not cut the message). */
    for (ssize_t i = 0; i < got; i++)
      if (buf[i] == 0) buf[i] = '?';
    while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == ' ' || buf[got - 1] == '\r'))
      buf[--got] = 0;
    if (off > 0) { /* start at a line boundary */
      char *nl = strchr(buf, '\n');
      if (nl) memmove(buf, nl + 1, strlen(nl + 1) + 1);
    }
  }
  close(fd);
}

/* Records an audit event. From loop callbacks (L == NULL) the main thread records it with the
 * collector stopped, so that no finaliser can release this VM under the callback's feet. */
void cl_vm_audit(vm *v, lua_State *L, const char *kind, int detail) {
  int stopped = 0;
  if (!L) {
    L = v->L;
    if (lua_gc(L, LUA_GCISRUNNING)) {
      lua_gc(L, LUA_GCSTOP);
      stopped = 1;
    }
  }
  luaL_checkstack(L, 8, "audit");
  cl_audit_emit(L, kind, v->id, v->pid > 0 ? v->pid : 0, detail);
  if (stopped) lua_gc(L, LUA_GCRESTART);
}

int cl_vm_snapshot_done(lua_State *L, vm *v, const char *backend, const char *memfile) {
  lua_createtable(L, 0, 3);
  lua_pushstring(L, v->op_path);
  lua_setfield(L, -2, "dir");
  lua_pushstring(L, backend);
  lua_setfield(L, -2, "backend");
  char p[600];
  struct stat st;
  snprintf(p, sizeof p, "%s/%s", v->op_path, memfile);
  if (stat(p, &st) == 0) {
    lua_pushinteger(L, (lua_Integer)st.st_size);
    lua_setfield(L, -2, "bytes");
  }
  lua_pushvalue(L, -1);
  cl_vm_audit(v, L, "vm.snapshot", lua_gettop(L));
  lua_pop(L, 1);
  return 1;
}

/* Pushes a detail table {state=...} for audit records. */
void cl_vm_push_detail(lua_State *L, vm *v) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, cl_vm_state_name(v->state));
  lua_setfield(L, -2, "state");
  lua_pushstring(L, v->backend == VM_QEMU ? "qemu" : "firecracker");
  lua_setfield(L, -2, "backend");
}

void cl_vm_kill(vm *v) {
  if (v->pid > 0 && !v->exited && v->proc_ref != LUA_NOREF) kill(v->pid, SIGKILL);
}

/* Everything the VM holds only while its VMM runs. */
static void release_runtime(vm *v, const char *why) {
  if (v->ops) v->ops->release(v, why); /* the channel and the driver's objects */
  /* The tap goes with the VMM, except between a failed KVM boot and the TCG boot after it. */
  if (v->tapfd >= 0 && !(v->state == VS_STARTING && v->kvm && v->kvm_auto && !v->released)) {
    close(v->tapfd);
    v->tapfd = -1;
  }
}

/* Calls handle:method() protected; leaves one result (or nil) on the stack. */
static void proc_method(lua_State *L, vm *v, const char *method) {
  luaL_checkstack(L, 6, "vm");
  lua_rawgeti(L, LUA_REGISTRYINDEX, v->proc_ref);
  if (lua_isnil(L, -1)) return;
  lua_getfield(L, -1, method);
  lua_insert(L, -2);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    fprintf(stderr, "clawlua: vm %s: %s: %s\n", v->id, method, lua_tostring(L, -1));
    lua_pop(L, 1);
    lua_pushnil(L);
  }
}

static void drop_proc(lua_State *L, vm *v) {
  if (v->proc_ref == LUA_NOREF) return;
  proc_method(L, v, "close"); /* a live VMM is killed and reaped by the loop, its cgroups go */
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, v->proc_ref);
  v->proc_ref = LUA_NOREF;
}

static void on_vmm_exit(cl_watch *w, uint32_t events) {
  vm *v = w->data;
  siginfo_t si;
  memset(&si, 0, sizeof si);
  if (waitid((idtype_t)P_PIDFD, (id_t)v->pidfd, &si, WEXITED | WNOHANG | WNOWAIT) < 0 ||
      si.si_pid == 0)
    return;
  cl_watch_stop(&v->pwatch);
  close(v->pidfd);
  v->pidfd = -1;
  v->exited = 1;
  v->t_exit = cl_now_ns();
  if (si.si_code == CLD_EXITED)
    v->exit_code = si.si_status;
  else
    v->exit_signal = si.si_status;
  int expected = v->state == VS_STOPPING;
  if (v->state != VS_STARTING && v->state != VS_FAILED)
    v->state = VS_EXITED; /* a failed start says FAILED itself */
  release_runtime(v, v->exit_signal ? "the VMM was killed" : "the VMM exited");
  lua_State *L = v->L;
  int stopped = lua_gc(L, LUA_GCISRUNNING);
  if (stopped) lua_gc(L, LUA_GCSTOP);
  luaL_checkstack(L, 8, "vm exit");
  cl_vm_push_detail(L, v);
  int detail = lua_gettop(L);
  proc_method(L, v, "status"); /* reaps it; a jail reports OOM kills and removes its cgroups */
  if (lua_istable(L, -1)) {
    if (lua_getfield(L, -1, "oom_killed") != LUA_TNIL)
      lua_setfield(L, detail, "oom_killed");
    else
      lua_pop(L, 1);
    if (lua_getfield(L, -1, "cgroup") != LUA_TNIL)
      lua_setfield(L, detail, "cgroup");
    else
      lua_pop(L, 1);
  }
  lua_pop(L, 1);
  if (v->exit_signal) {
    lua_pushstring(L, cl_signal_name(v->exit_signal));
    lua_setfield(L, detail, "signal");
  } else {
    lua_pushinteger(L, v->exit_code);
    lua_setfield(L, detail, "code");
  }
  lua_pushboolean(L, expected);
  lua_setfield(L, detail, "expected");
  cl_audit_emit(L, "vm.exit", v->id, v->pid, detail);
  lua_settop(L, detail - 1);
  cl_audit_forget_pid(L, v->pid);
  if (stopped) lua_gc(L, LUA_GCRESTART);
  cl_vm_changed(v);
}

static void list_add_str(lua_State *L, int list, const char *s) {
  lua_pushstring(L, s);
  lua_rawseti(L, list, (lua_Integer)lua_rawlen(L, list) + 1);
}

/* Is path inside (or equal to) an entry of the binds list? */
static int bind_covers(lua_State *L, int binds, const char *path) {
  lua_Integer n = (lua_Integer)lua_rawlen(L, binds);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, binds, i);
    const char *b = NULL;
    if (lua_istable(L, -1)) {
      lua_getfield(L, -1, "dst");
      if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_getfield(L, -1, "src");
      }
      lua_remove(L, -2);
    }
    b = lua_tostring(L, -1);
    size_t bl = b ? strlen(b) : 0;
    int covered = b && strncmp(path, b, bl) == 0 && (path[bl] == 0 || path[bl] == '/' || bl == 1);
    lua_pop(L, 1);
    if (covered) return 1;
  }
  return 0;
}

static void add_bind(lua_State *L, int binds, const char *path, int rw) {
  if (!path || !*path || bind_covers(L, binds, path)) return;
  lua_createtable(L, 0, 2);
  lua_pushstring(L, path);
  lua_setfield(L, -2, "src");
  lua_pushboolean(L, rw);
  lua_setfield(L, -2, "rw");
  lua_rawseti(L, binds, (lua_Integer)lua_rawlen(L, binds) + 1);
}

/* Copies the array part of t.field onto the end of list (user additions to ours). */
static void append_list(lua_State *L, int t, const char *field, int list) {
  if (lua_getfield(L, t, field) == LUA_TTABLE) {
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      lua_rawseti(L, list, (lua_Integer)lua_rawlen(L, list) + 1);
    }
  }
  lua_pop(L, 1);
}

/* The VMM's devices, network, id and cgroup limits, with the caller's additions (user: the
 * index of the caller's jail table, or 0). */
static void jail_limits(lua_State *L, vm *v, int jt, int user) {
  /* Devices: the usual ones, KVM, and the tun device Firecracker opens its tap with. */
  lua_newtable(L);
  int devs = lua_gettop(L);
  static const char *const base_devs[] = {"null", "zero", "full", "random", "urandom", NULL};
  for (const char *const *d = base_devs; *d; d++) list_add_str(L, devs, *d);
  if ((v->kvm == 1 || v->kvm == 2 || v->backend == VM_FIRECRACKER) && access("/dev/kvm", F_OK) == 0)
    list_add_str(L, devs, "kvm");
  if (v->backend == VM_FIRECRACKER && v->tap[0]) list_add_str(L, devs, "net/tun");
  if (user) append_list(L, user, "devices", devs);
  lua_pushvalue(L, devs);
  lua_setfield(L, jt, "devices");
  /* QEMU gets its tap as an fd: it needs no network. Firecracker opens its tap by name, in the
   * namespace that has it. */
  if (lua_getfield(L, jt, "net") == LUA_TNIL) {
    lua_pushstring(L, v->backend == VM_FIRECRACKER && v->tap[0] ? "host" : "new");
    lua_setfield(L, jt, "net");
  }
  lua_pop(L, 1);
  if (lua_getfield(L, jt, "id") == LUA_TNIL) {
    lua_pushstring(L, v->id);
    lua_setfield(L, jt, "id");
  }
  lua_pop(L, 1);
  /* Cgroup limits unless the caller set its own (or none: cgroup = false): the guest's memory
   * with room for the VMM itself (TCG's translation cache), and a bound on its threads. */
  int ct = lua_getfield(L, jt, "cgroup");
  if (ct == LUA_TBOOLEAN) {
    lua_pushnil(L);
    lua_setfield(L, jt, "cgroup");
  } else if (ct == LUA_TNIL) {
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, ((lua_Integer)v->mem_mib + 1024) << 20);
    lua_setfield(L, -2, "memory");
    lua_pushinteger(L, 1024);
    lua_setfield(L, -2, "pids");
    lua_setfield(L, jt, "cgroup");
  }
  lua_pop(L, 1);
}

/* Fills the jail options table at jt: what a VMM needs, then what the caller asked for. */
void cl_vm_jail_options(lua_State *L, vm *v, int jt, const char *program) {
  int user = 0;
  if (v->jail_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, v->jail_ref);
    if (lua_istable(L, -1))
      user = lua_gettop(L);
    else
      lua_pop(L, 1);
  }
  /* Scalar options of the caller go through as they are. */
  if (user) {
    lua_pushnil(L);
    while (lua_next(L, user)) {
      /* String keys only: positional entries would be argv. */
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
      if (k && strcmp(k, "binds") != 0 && strcmp(k, "devices") != 0 && strcmp(k, "symlinks") != 0) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, jt);
      } else {
        lua_pop(L, 1);
      }
    }
  }
  /* A root of the host's programs and libraries, read-only (merged /usr or not). */
  lua_newtable(L);
  int binds = lua_gettop(L);
  lua_newtable(L);
  int links = lua_gettop(L);
  add_bind(L, binds, "/usr", 0);
  static const char *const tops[] = {"/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", NULL};
  for (const char *const *t = tops; *t; t++) {
    struct stat st;
    if (lstat(*t, &st) < 0) continue;
    if (S_ISLNK(st.st_mode)) {
      char target[256];
      ssize_t n = readlink(*t, target, sizeof target - 1);
      if (n <= 0) continue;
      target[n] = 0;
      lua_pushstring(L, target);
      lua_setfield(L, links, *t);
    } else if (S_ISDIR(st.st_mode)) {
      add_bind(L, binds, *t, 0);
    }
  }
  if (access("/etc/ld.so.cache", R_OK) == 0) add_bind(L, binds, "/etc/ld.so.cache", 0);
  /* The caller's binds next (a read-only one already covered is dropped), so that the VM's own
   * files below are only bound where the caller's do not already show them. */
  if (user && lua_getfield(L, user, "binds") == LUA_TTABLE) {
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
      int bt = lua_rawgeti(L, -1, i);
      const char *bp = bt == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
      if (!bp || !bind_covers(L, binds, bp))
        lua_rawseti(L, binds, (lua_Integer)lua_rawlen(L, binds) + 1);
      else
        lua_pop(L, 1);
    }
  }
  if (user) lua_pop(L, 1);
  /* The VM's own files; the run directory (sockets, log, snapshots in flight) writable. */
  add_bind(L, binds, program, 0);
  add_bind(L, binds, v->kernel, 0);
  add_bind(L, binds, v->initrd, 0);
  add_bind(L, binds, v->rootfs, !v->rootfs_ro);
  if (v->seccomp_file && v->seccomp_file[0]) add_bind(L, binds, v->seccomp_file, 0);
  if (v->restore_dir) add_bind(L, binds, v->restore_dir, 0);
  add_bind(L, binds, v->rundir, 1);
  if (v->log_keep) add_bind(L, binds, v->log_path, 1);
  lua_pushvalue(L, binds);
  lua_setfield(L, jt, "binds");
  if (user && lua_getfield(L, user, "symlinks") == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, links);
    }
  }
  if (user) lua_pop(L, 1);
  lua_pushvalue(L, links);
  lua_setfield(L, jt, "symlinks");
  jail_limits(L, v, jt, user);
  lua_settop(L, jt);
}

static int spawn_jailed(lua_State *L) {
  return cl_jail_spawn(L, 1);
}

static int spawn_plain(lua_State *L) {
  return cl_proc_spawn(L, 1, NULL);
}

int cl_vm_spawn(lua_State *L, vm *v, char *const argv[], const int *fds, int nfds, char *err,
                size_t errlen) {
  char path[4096];
  int e = cl_find_executable(argv[0], getenv("PATH"), path, sizeof path);
  if (e) {
    snprintf(err, errlen, "%s: %s", argv[0], e == ENOENT ? "not found in PATH" : strerror(e));
    return e;
  }
  if (path[0] != '/') { /* the VMM starts in its run directory */
    char *rp = realpath(path, NULL);
    if (rp && strlen(rp) < sizeof path) strcpy(path, rp);
    free(rp);
  }
  drop_proc(L, v); /* a failed KVM probe boot's VMM, reaped already */
  int top = lua_gettop(L);
  luaL_checkstack(L, 16, "vm spawn");
  lua_pushcfunction(L, v->jailed ? spawn_jailed : spawn_plain);
  lua_createtable(L, 8, 12);
  int t = lua_gettop(L);
  lua_pushstring(L, path);
  lua_rawseti(L, t, 1);
  for (int i = 1; argv[i]; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, t, i + 1);
  }
  /* A small, explicit environment: nothing of the runtime's leaks into the VMM. */
  lua_createtable(L, 0, 2);
  const char *pe = getenv("PATH");
  lua_pushstring(L, pe && *pe ? pe : "/usr/sbin:/usr/bin:/sbin:/bin");
  lua_setfield(L, -2, "PATH");
  lua_pushliteral(L, "C");
  lua_setfield(L, -2, "LC_ALL");
  lua_setfield(L, t, "env");
  lua_pushboolean(L, 1);
  lua_setfield(L, t, "env_clear");
  lua_pushstring(L, v->rundir);
  lua_setfield(L, t, "cwd");
  lua_pushliteral(L, "null");
  lua_setfield(L, t, "stdin");
  lua_pushinteger(L, v->logfd);
  lua_setfield(L, t, "stdout");
  lua_pushinteger(L, v->logfd);
  lua_setfield(L, t, "stderr");
  lua_pushboolean(L, 1);
  lua_setfield(L, t, "session");
  lua_pushstring(L, v->id);
  lua_setfield(L, t, "name");
  lua_createtable(L, nfds, 0);
  for (int i = 0; i < nfds; i++) {
    lua_pushinteger(L, fds[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, t, "fds");
  if (v->filter_ref != LUA_NOREF && v->backend == VM_QEMU) { /* clawlua's filter, applied last */
    lua_rawgeti(L, LUA_REGISTRYINDEX, v->filter_ref);
    lua_setfield(L, t, "seccomp");
  }
  if (v->jailed) cl_vm_jail_options(L, v, t, path);
  /* pdeathsig (proc.spawn's default KILL): the VMM never outlives the runtime. */
  if (lua_pcall(L, 1, 3, 0) != LUA_OK) { /* bad jail options raise */
    snprintf(err, errlen, "%s%s", v->jailed ? "jail: " : "", lua_tostring(L, -1));
    lua_settop(L, top);
    return EINVAL;
  }
  if (lua_isnil(L, -3)) {
    snprintf(err, errlen, "%s", lua_tostring(L, -2));
    e = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : EIO;
    lua_settop(L, top);
    return e ? e : EIO;
  }
  lua_pop(L, 2);
  v->pid = cl_proc_pid(L, -1);
  /* A pidfd of our own: a dup of the handle's (pidfd_open is not in valgrind, say). */
  int hfd = cl_proc_pidfd(L, -1);
  v->pidfd = hfd >= 0 ? fcntl(hfd, F_DUPFD_CLOEXEC, 3) : -1;
  v->proc_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_settop(L, top);
  if (v->pidfd < 0 || cl_watch_start(v->loop, &v->pwatch, v->pidfd, EPOLLIN, on_vmm_exit) != 0) {
    e = errno ? errno : EIO;
    if (v->pidfd >= 0) close(v->pidfd);
    v->pidfd = -1;
    drop_proc(L, v);
    snprintf(err, errlen, "pidfd of the VMM: %s", strerror(e));
    return e;
  }
  v->pwatch.data = v;
  v->exited = 0;
  v->exit_code = v->exit_signal = 0;
  v->t_spawn = cl_now_ns();
  cl_audit_track_pid(L, v->pid, v->id);
  cl_vm_push_detail(L, v);
  lua_createtable(L, 8, 0);
  lua_pushstring(L, path);
  lua_rawseti(L, -2, 1);
  for (int i = 1; argv[i]; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "argv");
  lua_pushboolean(L, v->jailed);
  lua_setfield(L, -2, "jailed");
  lua_pushstring(L, v->filter_ref != LUA_NOREF
                        ? (v->backend == VM_QEMU ? "clawlua (applied by the runtime)"
                                                 : "clawlua (given to Firecracker)")
                    : v->seccomp_file && v->seccomp_file[0] ? v->seccomp_file
                    : v->seccomp_file                       ? "none (seccomp = false)"
                    : v->backend == VM_QEMU                 ? "QEMU's -sandbox"
                                                            : "Firecracker's built-in");
  lua_setfield(L, -2, "seccomp");
  cl_vm_audit(v, L, "vm.spawn", lua_gettop(L));
  lua_pop(L, 1);
  return 0;
}

int cl_vm_fail(lua_State *L, vm *v, int fatal, int with_log, int code, const char *fmt, ...) {
  char msg[600];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (fatal && !v->exited) {
    cl_vm_kill(v);
    v->state = VS_FAILED;
  } else if (fatal) {
    v->state = VS_FAILED;
  }
  char tail[LOG_TAIL + 1] = "";
  if (with_log) cl_vm_log_tail(v, tail, sizeof tail);
  lua_pushnil(L);
  if (tail[0])
    lua_pushfstring(L, "vm %s: %s; VMM log (%s) ends:\n%s", v->id, msg, v->log_path, tail);
  else if (with_log)
    lua_pushfstring(L, "vm %s: %s; the VMM log (%s) is empty", v->id, msg, v->log_path);
  else
    lua_pushfstring(L, "vm %s: %s", v->id, msg);
  cl_push_errcode(L, code);
  lua_createtable(L, 0, 2);
  lua_pushvalue(L, -3);
  lua_setfield(L, -2, "error");
  lua_pushstring(L, cl_vm_state_name(v->state));
  lua_setfield(L, -2, "state");
  cl_vm_audit(v, L, "vm.error", lua_gettop(L));
  lua_pop(L, 1);
  return 3;
}

static void unregister_id(lua_State *L, vm *v) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &cl_vm_ids_key);
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    lua_setfield(L, -2, v->id);
  }
  lua_pop(L, 1);
}

void cl_vm_free_config(vm *v) {
  free(v->kernel);
  free(v->initrd);
  free(v->rootfs);
  free(v->boot_args);
  free(v->vmm);
  free(v->seccomp_file);
  free(v->restore_dir);
  v->kernel = v->initrd = v->rootfs = v->boot_args = v->seccomp_file = NULL;
  v->vmm = NULL;
  v->restore_dir = NULL;
}

void cl_vm_release(lua_State *L, vm *v) {
  if (v->released) return;
  v->released = 1; /* first: whatever wakes below sees a closed VM */
  cl_timer_stop(&v->poll_timer);
  int was_running = v->pidfd >= 0 && !v->exited;
  if (was_running) {
    cl_vm_kill(v);
    cl_audit_forget_pid(L, v->pid);
  }
  if (v->pidfd >= 0) {
    cl_watch_stop(&v->pwatch);
    close(v->pidfd);
    v->pidfd = -1;
  }
  drop_proc(L, v); /* reaped by the loop; a jail's cgroups go after that */
  release_runtime(v, "the vm was closed");
  if (v->ops) v->ops->free_channel(v);
  if (v->tap[0] && v->tap_persist) cl_vm_tap_delete(v->tap);
  if (v->snapshot_fd >= 0) close(v->snapshot_fd);
  v->snapshot_fd = -1;
  if (v->logfd >= 0) close(v->logfd);
  v->logfd = -1;
  cl_vm_remove_rundir(v, 0);
  unregister_id(L, v);
  luaL_unref(L, LUA_REGISTRYINDEX, v->jail_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, v->filter_ref);
  v->jail_ref = v->filter_ref = LUA_NOREF;
  cl_waitq_wake_all(&v->changed, ECANCELED);
  if (v->state != VS_CREATED || was_running) {
    lua_createtable(L, 0, 2);
    lua_pushstring(L, cl_vm_state_name(v->state));
    lua_setfield(L, -2, "state");
    lua_pushboolean(L, was_running);
    lua_setfield(L, -2, "killed");
    cl_audit_emit(L, "vm.close", v->id, 0, lua_gettop(L));
    lua_pop(L, 1);
  }
  cl_vm_free_config(v);
}
