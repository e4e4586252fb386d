/*
 * clawlua.vm: a microVM's whole life. vm.create validates everything and makes the kernel
 * objects a VM owns before it runs (its run directory, its log, its tap); vm:start spawns the
 * VMM (QEMU microvm or Firecracker; qemu.c and firecracker.c drive them) and boots the guest
 * until its agent reports ready; the channel to the agent (channel.c) runs commands and moves
 * files. Every state change is an audit event (vm.*).
 *
 * The handle owns the VMM process (by pidfd), its sockets, its tap, its run directory and its
 * log; vm_release frees them on every path (close, __gc, __close, a failed create or start).
 * When the VMM exits by itself (a guest power-off, kill -9 from outside) the pidfd watch sees it
 * and the runtime objects go at once; the handle stays to report what happened.
 *
 * Life-cycle operations are step functions run by one generic waiter (op_run): a step either
 * finishes (pushing results) or returns VM_WAIT, and the waiter suspends on the VM's `changed`
 * queue, which every event wakes (a QMP reply, an API response, a frame, the VMM's exit, a poll
 * timer). No call blocks the loop.
 */
#include "vm.h"
#include "../jail.h"

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

int cl_entry_redirect(lua_State *L, const char *name);

static const char IDS_KEY = 'i'; /* registry: id -> true for every live VM */

#define MAX_VCPUS             32
#define MIN_MEM_MIB           32
#define DEFAULT_READY_TIMEOUT 60.0
#define LOG_TAIL              1500

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

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                              */

static char *dupstr(const char *s) {
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

/* The host's TSC rate for tsc_early_khz=: what the kernel measured (its log, when it is still
 * there), else /proc/cpuinfo's "cpu MHz". */
static double mhz_after(const char *s, const char *key) {
  const char *p = strstr(s, key);
  if (!p) return 0;
  char *end;
  double mhz = strtod(p + strlen(key), &end);
  return end != p + strlen(key) && strncmp(end, " MHz", 4) == 0 ? mhz : 0;
}

int cl_vm_tsc_khz(void) {
  static int khz = -1;
  if (khz >= 0) return khz;
  khz = 0;
  double detected = 0, refined = 0;
  int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd >= 0) {
    char rec[1024];
    for (int i = 0; i < 20000; i++) {
      ssize_t n = read(fd, rec, sizeof rec - 1);
      if (n < 0 && errno == EPIPE) continue; /* a record was overwritten while we read */
      if (n <= 0) break;
      rec[n] = 0;
      double m;
      if ((m = mhz_after(rec, "tsc: Refined TSC clocksource calibration: ")) > 0)
        refined = m;
      else if ((m = mhz_after(rec, "tsc: Detected ")) > 0)
        detected = m;
    }
    close(fd);
  }
  double mhz = refined > 0 ? refined : detected;
  FILE *f = mhz > 0 ? NULL : fopen("/proc/cpuinfo", "re");
  if (f) {
    char line[256];
    while (fgets(line, sizeof line, f)) {
      char *colon = strchr(line, ':');
      if (strncmp(line, "cpu MHz", 7) != 0 || !colon) continue;
      char *end;
      mhz = strtod(colon + 1, &end);
      if (end != colon + 1 && mhz > 0) break;
      mhz = 0;
    }
    fclose(f);
  }
  if (mhz > 0) khz = (int)(mhz * 1000.0 + 0.5);
  return khz;
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
static void push_detail(lua_State *L, vm *v) {
  lua_createtable(L, 0, 4);
  lua_pushstring(L, cl_vm_state_name(v->state));
  lua_setfield(L, -2, "state");
  lua_pushstring(L, v->backend == VM_QEMU ? "qemu" : "firecracker");
  lua_setfield(L, -2, "backend");
}

/* ------------------------------------------------------------------------------------------ */
/* Taps                                                                                       */

static int tap_up(const char *name) {
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return errno;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  int err = 0;
  if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
    err = errno;
  else {
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) err = errno;
  }
  close(s);
  return err;
}

/* Creates tap `name`; fails with EBUSY when any interface of that name exists (IFF_TUN_EXCL:
 * without it TUNSETIFF would silently attach to someone else's tap). */
static int tap_create(const char *name, int persist, int *fdp) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) return errno;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL;
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    int e = errno;
    close(fd);
    return e;
  }
  if (persist && ioctl(fd, TUNSETPERSIST, 1) < 0) {
    int e = errno;
    close(fd);
    return e;
  }
  int e = tap_up(name);
  if (e) {
    if (persist) ioctl(fd, TUNSETPERSIST, 0);
    close(fd);
    return e;
  }
  if (persist) {
    close(fd);
    fd = -1;
  }
  *fdp = fd;
  return 0;
}

/* A persistent tap goes when it is made non-persistent and its last fd closes. */
static void tap_delete(const char *name) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) return;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
  if (ioctl(fd, TUNSETIFF, &ifr) == 0) ioctl(fd, TUNSETPERSIST, 0);
  close(fd);
}

static int iface_exists(const char *name) {
  return if_nametoindex(name) != 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Run directory                                                                              */

static int make_dirs(const char *path) {
  char p[256];
  snprintf(p, sizeof p, "%s", path);
  for (char *s = p + 1; *s; s++) {
    if (*s != '/') continue;
    *s = 0;
    if (mkdir(p, 0700) < 0 && errno != EEXIST) return errno;
    *s = '/';
  }
  if (mkdir(p, 0700) < 0 && errno != EEXIST) return errno;
  return 0;
}

static int make_rundir(vm *v) {
  char base[160];
  const char *xdg = getenv("XDG_RUNTIME_DIR");
  if (xdg && *xdg && strlen(xdg) < 100)
    snprintf(base, sizeof base, "%s/clawlua", xdg);
  else if (geteuid() == 0)
    snprintf(base, sizeof base, "/run/clawlua");
  else
    snprintf(base, sizeof base, "/tmp/clawlua-%u", (unsigned)geteuid());
  int e = make_dirs(base);
  if (e) return e;
  /* Unix socket paths in it (api.sock, v.sock) must fit in 108 bytes: long ids are left out. */
  if (strlen(base) + strlen(v->id) + 32 < 100)
    snprintf(v->rundir, sizeof v->rundir, "%s/%s.XXXXXX", base, v->id);
  else if (strlen(base) + 32 < 100)
    snprintf(v->rundir, sizeof v->rundir, "%s/vm.XXXXXX", base);
  else
    snprintf(v->rundir, sizeof v->rundir, "/tmp/clawlua-vm.XXXXXX");
  if (!mkdtemp(v->rundir)) {
    e = errno;
    v->rundir[0] = 0;
    return e;
  }
  return 0;
}

/* Removes what the runtime put in the run directory (never follows links out of it). */
static void remove_rundir(vm *v, int keep_log) {
  if (!v->rundir[0]) return;
  DIR *d = opendir(v->rundir);
  int left = 0;
  if (d) {
    struct dirent *de;
    while ((de = readdir(d))) {
      if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
      char p[512];
      snprintf(p, sizeof p, "%s/%s", v->rundir, de->d_name);
      if (keep_log && strcmp(p, v->log_path) == 0) {
        left = 1;
        continue;
      }
      unlink(p);
    }
    closedir(d);
  }
  if (!left) {
    rmdir(v->rundir);
    v->rundir[0] = 0;
  }
}

/* ------------------------------------------------------------------------------------------ */
/* The VMM process                                                                            */

/*
 * The VMM is a clawlua.proc handle made by jail.spawn (the default: namespaces, a root of binds,
 * cgroups, an optional seccomp filter applied last) or by proc.spawn (jail = false), kept in the
 * registry (v->proc_ref). The VM watches its exit through a pidfd of its own without reaping it
 * (WNOWAIT): the handle reaps it when asked for its status, and its jail then reads the cgroup
 * (OOM kills) and removes it. Until then the pid cannot be reused, so kill(pid) is exact.
 */

void cl_vm_kill(vm *v) {
  if (v->pid > 0 && !v->exited && v->proc_ref != LUA_NOREF) kill(v->pid, SIGKILL);
}

/* Everything the VM holds only while its VMM runs. */
static void release_runtime(vm *v, const char *why) {
  cl_chan_close(v, why);
  if (v->backend == VM_QEMU)
    cl_qemu_release(v);
  else
    cl_fc_release(v);
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
  push_detail(L, v);
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

/* --- the options of proc.spawn / jail.spawn ---------------------------------------------- */

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

/* Fills the jail options table at jt: what a VMM needs, then what the caller asked for. */
static void jail_options(lua_State *L, vm *v, int jt, const char *program) {
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
  if (v->jailed) jail_options(L, v, t, path);
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
  push_detail(L, v);
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

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                     */

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
  lua_pushinteger(L, code);
  lua_createtable(L, 0, 2);
  lua_pushvalue(L, -3);
  lua_setfield(L, -2, "error");
  lua_pushstring(L, cl_vm_state_name(v->state));
  lua_setfield(L, -2, "state");
  cl_vm_audit(v, L, "vm.error", lua_gettop(L));
  lua_pop(L, 1);
  return 3;
}

/* ------------------------------------------------------------------------------------------ */
/* Release                                                                                    */

static void unregister_id(lua_State *L, vm *v) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &IDS_KEY);
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    lua_setfield(L, -2, v->id);
  }
  lua_pop(L, 1);
}

static void free_config(vm *v) {
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

static void vm_release(lua_State *L, vm *v) {
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
  cl_chan_release(v);
  if (v->tap[0] && v->tap_persist) tap_delete(v->tap);
  if (v->snapshot_fd >= 0) close(v->snapshot_fd);
  v->snapshot_fd = -1;
  if (v->logfd >= 0) close(v->logfd);
  v->logfd = -1;
  remove_rundir(v, 0);
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
  free_config(v);
}

static int l_gc(lua_State *L) {
  vm *v = lua_touserdata(L, 1);
  vm_release(L, v);
  free_config(v); /* also when create raised half-way, before the handle owned anything */
  return 0;
}

static int l_close(lua_State *L) {
  vm *v = luaL_checkudata(L, 1, VM_MT);
  vm_release(L, v);
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Backend choice                                                                             */

static int kvm_device_ok(char *why, size_t n) {
  int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    snprintf(why, n, "/dev/kvm: %s", strerror(errno));
    return 0;
  }
  int api = ioctl(fd, KVM_GET_API_VERSION, 0);
  close(fd);
  if (api != KVM_API_VERSION) {
    snprintf(why, n, "/dev/kvm answers API version %d, not %d", api, KVM_API_VERSION);
    return 0;
  }
  return 1;
}

/* The verdict of a probe boot under KVM, cached per (host kernel, QEMU binary, guest kernel):
 * 1 boots, 0 does not, -1 not known yet. */
static void verdict_path(char *p, size_t n) {
  const char *c = getenv("XDG_CACHE_HOME");
  const char *h = getenv("HOME");
  if (!h || !*h) {
    const struct passwd *pw = getpwuid(getuid()); /* no HOME: the user's own, never /tmp */
    h = pw && pw->pw_dir ? pw->pw_dir : "/";
  }
  if (c && *c)
    snprintf(p, n, "%s/clawlua/kvm-verdicts", c);
  else
    snprintf(p, n, "%s/.cache/clawlua/kvm-verdicts", h);
}

static void verdict_key(vm *v, char *k, size_t n) {
  struct utsname u;
  struct stat sq, sk;
  char qpath[4096] = "";
  cl_find_executable(v->vmm ? v->vmm[0] : "qemu-system-x86_64", getenv("PATH"), qpath,
                     sizeof qpath);
  memset(&sq, 0, sizeof sq);
  memset(&sk, 0, sizeof sk);
  stat(qpath, &sq);
  stat(v->kernel ? v->kernel : "", &sk);
  uname(&u);
  snprintf(k, n, "%s|%s:%lld:%lld|%s:%lld:%lld", u.release, qpath, (long long)sq.st_size,
           (long long)sq.st_mtime, v->kernel ? v->kernel : "", (long long)sk.st_size,
           (long long)sk.st_mtime);
}

static int kvm_verdict(vm *v) {
  char p[512], key[1024], line[1200];
  verdict_path(p, sizeof p);
  verdict_key(v, key, sizeof key);
  FILE *f = fopen(p, "re");
  if (!f) return -1;
  int verdict = -1;
  size_t kl = strlen(key);
  while (fgets(line, sizeof line, f))
    if (strncmp(line, key, kl) == 0 && line[kl] == ' ')
      verdict = strncmp(line + kl + 1, "boots", 5) == 0;
  fclose(f);
  return verdict;
}

void cl_vm_record_kvm_verdict(vm *v, int boots) {
  char p[512], key[1024];
  verdict_path(p, sizeof p);
  verdict_key(v, key, sizeof key);
  char dir[512];
  snprintf(dir, sizeof dir, "%s", p);
  char *slash = strrchr(dir, '/');
  if (slash) {
    *slash = 0;
    make_dirs(dir);
  }
  FILE *f = fopen(p, "ae");
  if (!f) return;
  fprintf(f, "%s %s\n", key, boots ? "boots" : "fails");
  fclose(f);
}

/* Chooses the backend and accelerator for "auto" and says why. Returns 0 or an errno (no VMM
 * at all), with the reason in v->why. */
static int choose_backend(vm *v, int want, int accel) {
  char kvmwhy[160] = "";
  int kvm = kvm_device_ok(kvmwhy, sizeof kvmwhy);
  char fcpath[4096], qpath[4096];
  int have_fc = cl_find_executable("firecracker", getenv("PATH"), fcpath, sizeof fcpath) == 0;
  int have_q = cl_find_executable("qemu-system-x86_64", getenv("PATH"), qpath, sizeof qpath) == 0;
  if (want == 0) { /* auto */
    if (have_fc && kvm) {
      v->backend = VM_FIRECRACKER;
      snprintf(v->why, sizeof v->why, "firecracker: %.200s found and /dev/kvm is usable", fcpath);
      return 0;
    }
    if (!have_q) {
      snprintf(v->why, sizeof v->why, "no VMM: %s, and qemu-system-x86_64 is not in PATH",
               have_fc ? kvmwhy : "firecracker is not in PATH");
      return ENOENT;
    }
    v->backend = VM_QEMU;
  } else {
    v->backend = want;
  }
  if (v->backend == VM_FIRECRACKER) {
    snprintf(v->why, sizeof v->why, "firecracker (asked for)%s%s", kvm ? "" : "; ",
             kvm ? "" : kvmwhy);
    return 0;
  }
  const char *fcnote = want      ? "asked for"
                       : have_fc ? "firecracker needs KVM"
                                 : "no firecracker in PATH";
  if (accel == 3) {
    v->kvm = 2;
    v->kvm_auto = 1;
    snprintf(v->why, sizeof v->why, "qemu: KVM to be proved by a probe boot (%s; probe asked for)",
             fcnote);
  } else if (accel == 2) {
    v->kvm = 0;
    snprintf(v->why, sizeof v->why, "qemu with TCG (%s; TCG asked for)", fcnote);
  } else if (accel == 1) {
    v->kvm = 1;
    snprintf(v->why, sizeof v->why, "qemu with KVM (%s; KVM asked for)", fcnote);
  } else if (!kvm) {
    v->kvm = 0;
    snprintf(v->why, sizeof v->why, "qemu with TCG (%s; %s)", fcnote, kvmwhy);
  } else {
    int verdict = kvm_verdict(v);
    v->kvm_auto = 1;
    if (verdict == 1) {
      v->kvm = 1;
      snprintf(v->why, sizeof v->why,
               "qemu with KVM (%s; a probe boot under KVM reached the agent)", fcnote);
    } else if (verdict == 0) {
      v->kvm = 0;
      snprintf(v->why, sizeof v->why,
               "qemu with TCG (%s; /dev/kvm exists but a probe boot under it "
               "failed: this KVM does not run stock kernels)",
               fcnote);
    } else {
      v->kvm = 2; /* probe at start: the probe boot is the real boot when it works */
      snprintf(v->why, sizeof v->why, "qemu: KVM to be proved by a probe boot (%s)", fcnote);
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* vm.create                                                                                  */

static int file_check(lua_State *L, const char *what, const char *path) {
  struct stat st;
  if (stat(path, &st) < 0)
    return cl_failf(L, errno, "vm.create: %s %s: %s", what, path, strerror(errno));
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
    return cl_failf(L, EINVAL, "vm.create: %s %s: not a regular file", what, path);
  if (access(path, R_OK) < 0)
    return cl_failf(L, errno, "vm.create: %s %s: %s", what, path, strerror(errno));
  if (st.st_size == 0) return cl_failf(L, EINVAL, "vm.create: %s %s: empty file", what, path);
  return 0;
}

static int valid_id(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > 40) return 0;
  for (const char *p = s; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
          *p == '-' || *p == '_' || *p == '.'))
      return 0;
  return s[0] != '.';
}

static long host_mem_mib(void) {
  long pages = sysconf(_SC_PHYS_PAGES), ps = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || ps <= 0) return 1L << 20;
  return (long)((double)pages * (double)ps / (1024.0 * 1024.0));
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* "xx:xx:xx:xx:xx:xx", unicast (the group bit of the first byte clear). */
static int valid_mac(const char *s) {
  if (strlen(s) != 17) return 0;
  for (int i = 0; i < 17; i++)
    if ((i % 3 == 2) ? s[i] != ':' : hexval(s[i]) < 0) return 0;
  return !(hexval(s[1]) & 1);
}

static void random_hex(char *out, size_t nbytes) {
  unsigned char r[16];
  if (nbytes > sizeof r) nbytes = sizeof r;
  if (getrandom(r, nbytes, 0) != (ssize_t)nbytes) {
    uint64_t t = cl_now_ns() ^ (uint64_t)getpid();
    memcpy(r, &t, nbytes < 8 ? nbytes : 8);
  }
  for (size_t i = 0; i < nbytes; i++) sprintf(out + 2 * i, "%02x", r[i]);
}

static const char *const create_fields[] = {
    "backend",   "kernel", "initrd", "rootfs", "rootfs_readonly", "vcpus", "mem_mib",
    "boot_args", "net",    "guest",  "jail",   "seccomp",         "log",   "id",
    "vmm",       "accel",  NULL};

/* What vm.create / vm.restore read from their options besides the vm itself. */
typedef struct vm_opts {
  vm *v;
  int restore;               /* kernel and sizes come from the snapshot */
  const char *const *fields; /* the fields the call takes */
  int want_backend, accel, want_net;
  const char *tap; /* anchored by the options table */
  int jail_err;    /* the jail options name what the host does not have */
  char jail_msg[256];
} vm_opts;

static int pick(lua_State *L, const char *field, const char *got, const char *const names[],
                const char *expected) {
  for (int i = 0; names[i]; i++)
    if (strcmp(names[i], got) == 0) return i;
  cl_field_error(L, field, lua_pushfstring(L, "%s expected, got \"%s\"", expected, got));
}

/* kernel, initrd, rootfs, sizes, boot arguments. */
static void parse_machine(lua_State *L, int idx, vm *v) {
  const char *kernel = cl_opt_string(L, idx, "kernel", NULL);
  if (!kernel) cl_field_error(L, "kernel", "a kernel image path is required");
  v->kernel = dupstr(kernel);
  v->initrd = dupstr(cl_opt_string(L, idx, "initrd", NULL));
  v->rootfs = dupstr(cl_opt_string(L, idx, "rootfs", NULL));
  v->rootfs_ro = cl_opt_boolean(L, idx, "rootfs_readonly", 0);
  lua_Integer vcpus = cl_opt_integer(L, idx, "vcpus", 1);
  if (vcpus < 1 || vcpus > MAX_VCPUS)
    cl_field_error(L, "vcpus", lua_pushfstring(L, "1 to %d expected, got %I", MAX_VCPUS, vcpus));
  lua_Integer mem = cl_opt_integer(L, idx, "mem_mib", 128);
  long host = host_mem_mib();
  if (mem < MIN_MEM_MIB || mem > host)
    cl_field_error(L, "mem_mib",
                   lua_pushfstring(L, "%d to %I (the host's memory) expected, got %I", MIN_MEM_MIB,
                                   (lua_Integer)host, mem));
  v->vcpus = (int)vcpus;
  v->mem_mib = (int)mem;
  const char *ba = cl_opt_string(L, idx, "boot_args", NULL);
  if (ba && strlen(ba) > 2048) cl_field_error(L, "boot_args", "longer than 2048 bytes");
  v->boot_args = dupstr(ba);
}

/* vmm = "path" | {"path", "arg", ...}: the VMM program (and arguments before the driver's) */
static void parse_vmm(lua_State *L, int idx, vm *v, int want_backend) {
  int vt = lua_getfield(L, idx, "vmm");
  if (vt == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (want_backend == 0) cl_field_error(L, "vmm", "needs backend = \"qemu\" or \"firecracker\"");
  if (vt == LUA_TSTRING) {
    lua_createtable(L, 1, 0);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, 1);
    lua_replace(L, -2);
  } else if (vt != LUA_TTABLE) {
    cl_field_error(
        L, "vmm",
        lua_pushfstring(L, "string or table of strings expected, got %s", luaL_typename(L, -1)));
  }
  char **src = cl_check_argv(L, -1, "vmm", 0);
  size_t n = 0, bytes = 0;
  for (; src[n]; n++) bytes += strlen(src[n]) + 1;
  if (n > 16) cl_field_error(L, "vmm", "more than 16 entries");
  char **dst = malloc((n + 1) * sizeof(char *) + bytes);
  if (!dst) abort();
  char *p = (char *)(dst + n + 1);
  for (size_t i = 0; i < n; i++) {
    dst[i] = p;
    strcpy(p, src[i]);
    p += strlen(src[i]) + 1;
  }
  dst[n] = NULL;
  v->vmm = dst;
  lua_pop(L, 2); /* the argv vector, the field */
}

/* net = true | {tap = name, mac = "02:..."} (a nested table: names relative to it) */
static void parse_net(lua_State *L, int ni, void *ud) {
  vm_opts *o = ud;
  static const char *const nf[] = {"tap", "mac", NULL};
  cl_check_fields(L, ni, nf);
  const char *tap = cl_opt_string(L, ni, "tap", NULL);
  if (tap && (strlen(tap) == 0 || strlen(tap) >= IFNAMSIZ || strchr(tap, '/') || strchr(tap, ' ')))
    cl_field_error(L, "tap", lua_pushfstring(L, "\"%s\" is not a valid interface name", tap));
  const char *mac = cl_opt_string(L, ni, "mac", NULL);
  if (mac && !valid_mac(mac))
    cl_field_error(L, "mac", lua_pushfstring(L, "\"%s\" is not a unicast MAC address", mac));
  if (mac) snprintf(o->v->mac, sizeof o->v->mac, "%s", mac);
  o->tap = tap;
}

/* guest = {channel = "auto"|"virtio-serial"|"vsock"|"none", ready_timeout = s} */
static void parse_guest(lua_State *L, int gi, void *ud) {
  vm *v = ((vm_opts *)ud)->v;
  static const char *const gf[] = {"channel", "ready_timeout", NULL};
  cl_check_fields(L, gi, gf);
  static const char *const chans[] = {"auto", "virtio-serial", "vsock", "none", NULL};
  static const int chan_of[] = {-1, CH_SERIAL, CH_VSOCK, CH_NONE};
  v->channel = chan_of[pick(L, "channel", cl_opt_string(L, gi, "channel", "auto"), chans,
                            "\"auto\", \"virtio-serial\", \"vsock\" or \"none\"")];
  v->ready_timeout = cl_opt_number(L, gi, "ready_timeout", DEFAULT_READY_TIMEOUT);
  if (!(v->ready_timeout > 0 && v->ready_timeout <= 3600))
    cl_field_error(L, "ready_timeout", "seconds, more than 0 and at most 3600 expected");
}

/* seccomp = {vmm=, api=, vcpu=}: one clawlua filter per Firecracker thread */
static void parse_thread_filters(lua_State *L, int t, void *ud) {
  CL_UNUSED(ud);
  static const char *const threads[] = {"vmm", "api", "vcpu", NULL};
  cl_check_fields(L, t, threads);
  for (const char *const *th = threads; *th; th++) {
    if (lua_getfield(L, t, *th) != LUA_TUSERDATA ||
        !luaL_testudata(L, -1, "clawlua.seccomp.filter"))
      cl_field_error(L, *th, "a clawlua.seccomp filter expected");
    lua_pop(L, 1);
  }
}

/* seccomp = a clawlua.seccomp filter | {vmm=, api=, vcpu=} (Firecracker's threads) | the path of
 * a file in Firecracker's format | false (none) */
static void parse_seccomp(lua_State *L, int idx, vm_opts *o) {
  vm *v = o->v;
  int t = lua_getfield(L, idx, "seccomp");
  if (t == LUA_TSTRING) {
    v->seccomp_file = dupstr(lua_tostring(L, -1));
  } else if (t == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
    v->seccomp_file = dupstr("");
  } else if ((t == LUA_TUSERDATA && luaL_testudata(L, -1, "clawlua.seccomp.filter")) ||
             t == LUA_TTABLE) {
    if (t == LUA_TTABLE && cl_parse_nested(L, -1, "seccomp", parse_thread_filters, o)) lua_error(L);
    lua_pushvalue(L, -1);
    v->filter_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else if (t != LUA_TNIL) {
    cl_field_error(L, "seccomp",
                   lua_pushfstring(L,
                                   "a clawlua.seccomp filter, {vmm=, api=, vcpu=}, "
                                   "a filter file path or false expected, got %s",
                                   luaL_typename(L, -1)));
  }
  lua_pop(L, 1);
}

/* The caller's jail options alone, checked completely by the jail itself. */
static void check_user_jail(lua_State *L, int jt, void *ud) {
  vm_opts *o = ud;
  static const char *const refused[] = {"root",   "cwd",    "argv", "env", "stdin",
                                        "stdout", "stderr", "fds",  NULL};
  if (lua_rawlen(L, jt) > 0)
    cl_field_error(L, "[1]", "positional entries (argv) are set by the vm");
  for (const char *const *f = refused; *f; f++) {
    if (lua_getfield(L, jt, *f) != LUA_TNIL) cl_field_error(L, *f, "set by the vm");
    lua_pop(L, 1);
  }
  o->jail_err = cl_jail_check(L, jt, 1, o->jail_msg, sizeof o->jail_msg);
}

/* jail = true (the default) | false | {jail.spawn options}: where the VMM runs */
static void parse_jail(lua_State *L, int idx, vm_opts *o) {
  vm *v = o->v;
  int t = lua_getfield(L, idx, "jail");
  if (t == LUA_TBOOLEAN) {
    v->jailed = lua_toboolean(L, -1);
  } else if (t == LUA_TTABLE) {
    if (cl_parse_nested(L, -1, "jail", check_user_jail, o)) lua_error(L);
    lua_pushvalue(L, -1);
    v->jail_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else if (t != LUA_TNIL) {
    cl_field_error(L, "jail",
                   lua_pushfstring(L, "boolean or table of jail.spawn options expected, got %s",
                                   luaL_typename(L, -1)));
  }
  lua_pop(L, 1);
}

/* Parses the options at idx into o->v (which is still closed: nothing to release). Raises on
 * misuse, with the path of the field. */
static void parse_options(lua_State *L, int idx, vm_opts *o) {
  vm *v = o->v;
  cl_check_fields(L, idx, o->fields);
  static const char *const backends[] = {"auto", "qemu", "firecracker", NULL};
  static const int backend_of[] = {0, VM_QEMU, VM_FIRECRACKER};
  o->want_backend = backend_of[pick(L, "backend", cl_opt_string(L, idx, "backend", "auto"),
                                    backends, "\"auto\", \"qemu\" or \"firecracker\"")];
  static const char *const accels[] = {"auto", "kvm", "tcg", "probe", NULL};
  o->accel = pick(L, "accel", cl_opt_string(L, idx, "accel", "auto"), accels,
                  "\"auto\", \"kvm\", \"tcg\" or \"probe\"");
  if (!o->restore) parse_machine(L, idx, v);
  const char *id = cl_opt_string(L, idx, "id", NULL);
  if (id && !valid_id(id))
    cl_field_error(
        L, "id",
        lua_pushfstring(L, "1 to 40 characters of [A-Za-z0-9_.-] expected, got \"%s\"", id));
  if (id)
    snprintf(v->id, sizeof v->id, "%s", id);
  else {
    char hex[13];
    random_hex(hex, 4);
    snprintf(v->id, sizeof v->id, "vm-%s", hex);
  }
  parse_vmm(L, idx, v, o->want_backend);
  const char *log = cl_opt_string(L, idx, "log", NULL);
  if (log) {
    snprintf(v->log_path, sizeof v->log_path, "%s", log);
    v->log_keep = 1;
  }
  int t = lua_getfield(L, idx, "net");
  o->tap = NULL;
  o->want_net = t == LUA_TTABLE || (t == LUA_TBOOLEAN && lua_toboolean(L, -1));
  if (t == LUA_TTABLE && cl_parse_nested(L, -1, "net", parse_net, o)) lua_error(L);
  if (t != LUA_TTABLE && t != LUA_TBOOLEAN && t != LUA_TNIL)
    cl_field_error(L, "net",
                   lua_pushfstring(L, "boolean or table expected, got %s", luaL_typename(L, -1)));
  lua_pop(L, 1);
  v->channel = -1;
  v->ready_timeout = DEFAULT_READY_TIMEOUT;
  t = lua_getfield(L, idx, "guest");
  if (t == LUA_TTABLE && cl_parse_nested(L, -1, "guest", parse_guest, o)) lua_error(L);
  if (t != LUA_TTABLE && t != LUA_TNIL)
    cl_field_error(L, "guest", lua_pushfstring(L, "table expected, got %s", luaL_typename(L, -1)));
  lua_pop(L, 1);
  parse_seccomp(L, idx, o);
  parse_jail(L, idx, o);
}

static int parse_entry(lua_State *L) {
  parse_options(L, 1, lua_touserdata(L, 2));
  return 0;
}

/* Runs parse_options protected: on misuse the vm gives back what it took and the error is
 * raised again as "<op>: bad field 'a.b' (...)". On a jail naming what the host lacks, pushes
 * nil, err, code and returns 3; else 0. */
static int read_options(lua_State *L, int idx, vm_opts *o, const char *op) {
  lua_pushcfunction(L, parse_entry);
  lua_pushvalue(L, idx);
  lua_pushlightuserdata(L, o);
  int bad = lua_pcall(L, 2, 0, 0) != LUA_OK;
  if (bad || o->jail_err) {
    free_config(o->v);
    luaL_unref(L, LUA_REGISTRYINDEX, o->v->filter_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, o->v->jail_ref);
    o->v->filter_ref = o->v->jail_ref = LUA_NOREF;
  }
  if (bad) luaL_error(L, "%s: %s", op, lua_tostring(L, -1));
  if (o->jail_err) return cl_failf(L, o->jail_err, "%s: jail: %s", op, o->jail_msg);
  return 0;
}

static vm *push_vm(lua_State *L) {
  vm *v = lua_newuserdatauv(L, sizeof *v, 1);
  memset(v, 0, sizeof *v);
  v->released = 1; /* closed until set up: an error below has nothing to release */
  v->pidfd = v->logfd = v->tapfd = v->qmpfd = v->vsock_fd = v->snapshot_fd = -1;
  v->proc_ref = v->jail_ref = v->filter_ref = LUA_NOREF;
  v->jailed = 1;
  v->chan.fd = -1;
  luaL_setmetatable(L, VM_MT);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  v->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  v->loop = cl_loop_get(L);
  cl_chan_init(&v->chan);
  return v;
}

typedef struct jail_verdict {
  int err;
  char msg[256];
} jail_verdict;

static void check_merged_jail(lua_State *L, int jt, void *ud) {
  jail_verdict *jv = ud;
  jv->err = cl_jail_check(L, jt, 0, jv->msg, sizeof jv->msg);
}

/* The jail the VMM will get (its binds, devices and cgroup merged with the caller's options),
 * checked at create so that a bad combination (namespaces.mount = false, say) fails here and not
 * at start. Nothing exists yet: the run directory and the log are left out. Returns 0, or the
 * results of a failure (nil, err, code); raises on misuse. */
static int check_vmm_jail(lua_State *L, vm *v) {
  int top = lua_gettop(L);
  lua_newtable(L);
  int keep = v->log_keep;
  v->log_keep = 0;
  jail_options(L, v, lua_gettop(L), NULL);
  v->log_keep = keep;
  jail_verdict jv = {0, ""};
  if (cl_parse_nested(L, top + 1, "jail", check_merged_jail, &jv)) {
    free_config(v);
    return luaL_error(L, "vm.create: %s", lua_tostring(L, -1));
  }
  lua_settop(L, top);
  if (!jv.err) return 0;
  free_config(v);
  return cl_failf(L, jv.err, "vm.create: jail: %s", jv.msg);
}

/* The part of create and restore after the options: checks, then the kernel objects. The vm
 * userdata is on top of the stack. Returns 1 (the vm stays on top) or pushes nil, err, code. */
static int setup_vm(lua_State *L, vm *v, int want_backend, int accel, const char *tap,
                    int want_net) {
  int n;
  if (v->kernel && (n = file_check(L, "kernel", v->kernel))) return (free_config(v), n);
  if (v->initrd && (n = file_check(L, "initrd", v->initrd))) return (free_config(v), n);
  if (v->rootfs && (n = file_check(L, "rootfs", v->rootfs))) return (free_config(v), n);
  if (v->seccomp_file && v->seccomp_file[0] &&
      (n = file_check(L, "seccomp filter", v->seccomp_file)))
    return (free_config(v), n);
  /* The VMM runs in the run directory: every path it gets is absolute. */
  char **paths[] = {&v->kernel, &v->initrd, &v->rootfs, &v->seccomp_file};
  for (size_t i = 0; i < CL_ARRAY_LEN(paths); i++) {
    char *p = *paths[i];
    if (!p || !p[0] || p[0] == '/') continue;
    char *rp = realpath(p, NULL);
    if (rp) {
      free(p);
      *paths[i] = rp;
    }
  }
  if (v->log_path[0] && v->log_path[0] != '/') {
    char cwd[300];
    if (getcwd(cwd, sizeof cwd)) {
      char tmp[sizeof v->log_path];
      snprintf(tmp, sizeof tmp, "%s", v->log_path);
      snprintf(v->log_path, sizeof v->log_path, "%.300s/%.200s", cwd, tmp);
    }
  }
  lua_rawgetp(L, LUA_REGISTRYINDEX, &IDS_KEY);
  int dup = lua_getfield(L, -1, v->id) != LUA_TNIL;
  lua_pop(L, 2);
  if (dup) {
    free_config(v);
    return cl_failf(L, EEXIST, "vm.create: id \"%s\" is already in use by another vm", v->id);
  }
  if (choose_backend(v, want_backend, accel)) {
    free_config(v);
    return cl_failf(L, ENOENT, "vm.create: %s", v->why);
  }
  if (v->backend == VM_QEMU && v->filter_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, v->filter_ref);
    int is_table = lua_istable(L, -1);
    lua_pop(L, 1);
    if (is_table) {
      free_config(v);
      return cl_failf(L, EINVAL,
                      "vm.create: seccomp: {vmm=, api=, vcpu=} is for Firecracker's "
                      "threads; QEMU takes one filter");
    }
  }
  if (v->backend == VM_QEMU && v->seccomp_file && v->seccomp_file[0]) {
    free_config(v);
    return cl_failf(L, EINVAL,
                    "vm.create: seccomp: a Firecracker filter file needs the firecracker "
                    "backend, and this vm is %s",
                    v->why);
  }
  if (v->channel < 0)
    v->channel = v->backend == VM_FIRECRACKER                   ? CH_VSOCK
                 : access("/dev/vhost-vsock", R_OK | W_OK) == 0 ? CH_VSOCK
                                                                : CH_SERIAL;
  if (v->channel == CH_VSOCK && v->backend == VM_QEMU &&
      access("/dev/vhost-vsock", R_OK | W_OK) < 0) {
    free_config(v);
    return cl_failf(L, ENODEV, "vm.create: channel \"vsock\" with qemu needs /dev/vhost-vsock: %s",
                    strerror(errno));
  }
  if (tap && iface_exists(tap)) {
    free_config(v);
    return cl_failf(L, EEXIST, "vm.create: net.tap: an interface named \"%s\" already exists", tap);
  }
  if (v->jailed && (n = check_vmm_jail(L, v))) return n;
  /* From here on the handle owns what it makes. */
  v->released = 0;
  v->state = VS_CREATED;
  v->t_create = cl_now_ns();
  lua_rawgetp(L, LUA_REGISTRYINDEX, &IDS_KEY);
  lua_pushboolean(L, 1);
  lua_setfield(L, -2, v->id);
  lua_pop(L, 1);
  int e = make_rundir(v);
  if (e) {
    vm_release(L, v);
    return cl_failf(L, e, "vm.create: run directory: %s", strerror(e));
  }
  if (!v->log_path[0]) snprintf(v->log_path, sizeof v->log_path, "%s/vmm.log", v->rundir);
  v->logfd = open(v->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (v->logfd < 0) {
    e = errno;
    vm_release(L, v);
    return cl_failf(L, e, "vm.create: log %s: %s", v->log_path, strerror(e));
  }
  if (want_net) {
    v->tap_persist = v->backend == VM_FIRECRACKER; /* Firecracker opens its tap by name */
    if (!v->mac[0]) {
      char hex[7];
      random_hex(hex, 3);
      snprintf(v->mac, sizeof v->mac, "02:c1:a7:%c%c:%c%c:%c%c", hex[0], hex[1], hex[2], hex[3],
               hex[4], hex[5]);
    }
    for (int attempt = 0; attempt < 8; attempt++) {
      if (tap)
        snprintf(v->tap, sizeof v->tap, "%s", tap);
      else {
        char hex[9];
        random_hex(hex, 4);
        snprintf(v->tap, sizeof v->tap, "clw%s", hex);
        v->tap_auto = 1;
      }
      e = tap_create(v->tap, v->tap_persist, &v->tapfd);
      if (e != EBUSY || tap) break;
    }
    if (e) {
      char name[16];
      snprintf(name, sizeof name, "%s", v->tap);
      v->tap[0] = 0;
      vm_release(L, v);
      if (e == EBUSY)
        return cl_failf(L, EEXIST, "vm.create: net.tap: an interface named \"%s\" already exists",
                        name);
      return cl_failf(L, e, "vm.create: tap %s: %s", name, strerror(e));
    }
  }
  /* A vsock context id of its own (vhost-vsock refuses one in use): the pid and a counter. */
  static unsigned cid_counter;
  v->cid = 3 + (int)(((unsigned)getpid() & 0x7fffu) << 8 | (cid_counter++ & 0xffu));
  push_detail(L, v);
  lua_pushstring(L, v->why);
  lua_setfield(L, -2, "why");
  if (v->tap[0]) {
    lua_pushstring(L, v->tap);
    lua_setfield(L, -2, "tap");
  }
  cl_vm_audit(v, L, "vm.create", lua_gettop(L));
  lua_pop(L, 1);
  return 1;
}

/* Lua: vm.create{...} -> vm | nil, err, code */
static int l_create(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  vm *v = push_vm(L);
  vm_opts o = {.v = v, .fields = create_fields};
  int n = read_options(L, 1, &o, "vm.create");
  if (n) return n;
  lua_settop(L, 2);
  return setup_vm(L, v, o.want_backend, o.accel, o.tap, o.want_net);
}

/* ------------------------------------------------------------------------------------------ */
/* Life-cycle operations                                                                      */

static int op_step(lua_State *L, vm *v, cl_wait *w) {
  int op = (int)w->aux[2];
  if (v->released) return cl_failf(L, ECANCELED, "vm %s: closed", v->id);
  if (op == OP_WAIT) {
    if (v->exited) {
      lua_createtable(L, 0, 3);
      if (v->exit_signal) {
        lua_pushinteger(L, v->exit_signal);
        lua_setfield(L, -2, "signal");
        lua_pushstring(L, cl_signal_name(v->exit_signal));
        lua_setfield(L, -2, "signal_name");
      } else {
        lua_pushinteger(L, v->exit_code);
        lua_setfield(L, -2, "code");
      }
      lua_pushstring(L, cl_vm_state_name(v->state));
      lua_setfield(L, -2, "state");
      return 1;
    }
    if (v->pidfd < 0) return cl_failf(L, ECHILD, "vm %s: not running", v->id);
    if (w->state == CL_WAIT_TIMEOUT) return cl_timed_out(L);
    return VM_WAIT;
  }
  if (op == OP_KILL) {
    if (w->aux[0] == 0) {
      w->aux[0] = 1;
      if (v->exited || v->pidfd < 0) {
        lua_pushboolean(L, 1);
        return 1;
      }
      v->state = VS_STOPPING;
      cl_vm_kill(v);
      lua_createtable(L, 0, 1);
      cl_vm_audit(v, L, "vm.kill", lua_gettop(L));
      lua_pop(L, 1);
    }
    if (v->exited) {
      lua_pushboolean(L, 1);
      return 1;
    }
    return VM_WAIT;
  }
  return v->backend == VM_QEMU ? cl_qemu_step(L, v, w, op) : cl_fc_step(L, v, w, op);
}

static int op_k(lua_State *L, int status, lua_KContext ctx);

static int op_continue(lua_State *L, vm *v, cl_wait *w, int ctx) {
  int n = op_step(L, v, w);
  if (n != VM_WAIT) {
    if (w->aux[1] == 1) v->busy = NULL; /* this call held the VM */
    w->data = NULL;
    /* A failed vm.restore: the caller never gets the handle, so it goes now. */
    if (v->restoring && n >= 2 && lua_isnil(L, -n)) vm_release(L, v);
    v->restoring = 0;
    return n;
  }
  lua_settop(L, ctx);
  if (v->released) {
    if (w->aux[1] == 1) v->busy = NULL;
    return cl_failf(L, ECANCELED, "vm %s: closed", v->id);
  }
  cl_waitq_add(&v->changed, w);
  return cl_wait_suspend(L, w, op_k, ctx);
}

static int op_k(lua_State *L, int status, lua_KContext ctx) {
  cl_wait *w = cl_wait_resumed(L, ctx);
  return op_continue(L, w->data, w, (int)ctx);
}

/* The task waiting in an operation was cancelled: nothing may be left half done. */
static void op_abort(cl_wait *w) {
  vm *v = w->data;
  if (!v) return;
  w->data = NULL;
  if (w->aux[1] == 1) v->busy = NULL;
  if (v->released) return;
  int op = (int)w->aux[2];
  if (op == OP_START) { /* a start cancelled half-way leaves no VMM behind */
    cl_vm_kill(v);
    v->state = VS_FAILED;
  }
  if (v->backend == VM_FIRECRACKER) cl_fc_release_api(v);
}

static int op_run(lua_State *L, vm *v, int op, const char *name, double timeout, int exclusive) {
  if (exclusive && v->busy)
    return cl_failf(L, EBUSY, "vm %s: cannot %s while %s is in progress", v->id, name, v->busy);
  cl_wait *w = cl_wait_push(L);
  w->data = v;
  w->aux[0] = 0;
  w->aux[1] = exclusive;
  w->aux[2] = op;
  w->deadline = cl_deadline(timeout);
  w->external = 1;
  w->on_abort = op_abort;
  if (exclusive) v->busy = name;
  return op_continue(L, v, w, lua_gettop(L));
}

int cl_shutdown_step(lua_State *L, vm *v, cl_wait *w, int (*ask_vmm)(vm *v)) {
  if (w->aux[0] == 0) {
    v->state = VS_STOPPING;
    const char *how = "agent";
    int e = cl_chan_request_poweroff(v, v->backend == VM_FIRECRACKER);
    if (e) {
      how = v->backend == VM_QEMU ? "acpi power button" : "ctrl-alt-del";
      e = ask_vmm(v);
    }
    lua_createtable(L, 0, 2);
    lua_pushstring(L, e ? "none (killed)" : how);
    lua_setfield(L, -2, "how");
    lua_pushnumber(L, v->shutdown_timeout);
    lua_setfield(L, -2, "timeout");
    cl_vm_audit(v, L, "vm.shutdown", lua_gettop(L));
    lua_pop(L, 1);
    w->deadline = cl_deadline(v->shutdown_timeout);
    w->aux[0] = 1;
    if (e) w->state = CL_WAIT_TIMEOUT; /* nobody to ask: straight to the kill */
  }
  if (w->aux[0] == 1) {
    if (v->exited) goto done;
    if (w->state != CL_WAIT_TIMEOUT) return VM_WAIT;
    cl_vm_kill(v);
    w->deadline = cl_deadline(10);
    w->state = CL_WAIT_DONE;
    w->aux[0] = 2;
  }
  if (v->exited) goto done;
  if (w->state == CL_WAIT_TIMEOUT)
    return cl_vm_fail(L, v, 0, 0, ETIMEDOUT, "shutdown: the VMM did not exit after SIGKILL");
  return VM_WAIT;
done:
  lua_createtable(L, 0, 2);
  lua_pushboolean(L, w->aux[0] == 1 && !v->exit_signal);
  lua_setfield(L, -2, "graceful");
  if (v->exit_signal) {
    lua_pushstring(L, cl_signal_name(v->exit_signal));
    lua_setfield(L, -2, "signal");
  } else {
    lua_pushinteger(L, v->exit_code);
    lua_setfield(L, -2, "code");
  }
  return 1;
}

/* Lua: vm:start() -> vm | nil, err, code (boots until the guest agent is ready) */
static int l_start(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  lua_settop(L, 1);
  if (v->state != VS_CREATED)
    return cl_failf(L, EINVAL, "vm %s: start: the vm is %s, not created", v->id,
                    cl_vm_state_name(v->state));
  return op_run(L, v, OP_START, "start", -1, 1);
}

static int l_pause(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  lua_settop(L, 1);
  if (v->state != VS_RUNNING)
    return cl_failf(L, EINVAL, "vm %s: pause: the vm is %s, not running", v->id,
                    cl_vm_state_name(v->state));
  return op_run(L, v, OP_PAUSE, "pause", 30, 1);
}

static int l_resume(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  lua_settop(L, 1);
  if (v->state != VS_PAUSED)
    return cl_failf(L, EINVAL, "vm %s: resume: the vm is %s, not paused", v->id,
                    cl_vm_state_name(v->state));
  return op_run(L, v, OP_RESUME, "resume", 30, 1);
}

/* Lua: vm:snapshot{dir=} -> {dir=, files...} | nil, err */
static int l_snapshot(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  static const char *const fields[] = {"dir", NULL};
  cl_check_fields(L, 2, fields);
  const char *dir = cl_opt_string(L, 2, "dir", NULL);
  if (!dir) cl_field_error(L, "dir", "a directory for the snapshot files is required");
  lua_settop(L, 2);
  if (v->state != VS_RUNNING && v->state != VS_PAUSED)
    return cl_failf(L, EINVAL, "vm %s: snapshot: the vm is %s", v->id, cl_vm_state_name(v->state));
  if (cl_chan_busy(v))
    return cl_failf(L, EBUSY, "vm %s: snapshot: requests to the guest agent are in flight", v->id);
  if (mkdir(dir, 0700) < 0 && errno != EEXIST)
    return cl_failf(L, errno, "vm %s: snapshot: %s: %s", v->id, dir, strerror(errno));
  char *rp = realpath(dir, NULL);
  if (!rp) return cl_failf(L, errno, "vm %s: snapshot: %s: %s", v->id, dir, strerror(errno));
  snprintf(v->op_path, sizeof v->op_path, "%s", rp);
  free(rp);
  return op_run(L, v, OP_SNAPSHOT, "snapshot", 300, 1);
}

/* Lua: vm:shutdown{timeout=10} -> {graceful=bool} | nil, err. The guest is asked to power off
 * (through its agent, else ACPI power button / Ctrl-Alt-Del); after the timeout it is killed. */
static int l_shutdown(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  double timeout = 10;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    static const char *const fields[] = {"timeout", NULL};
    cl_check_fields(L, 2, fields);
    timeout = cl_opt_number(L, 2, "timeout", 10);
    if (!(timeout >= 0)) cl_field_error(L, "timeout", "must not be negative");
  }
  lua_settop(L, 1);
  if (v->exited || v->pidfd < 0) {
    lua_createtable(L, 0, 1);
    lua_pushboolean(L, v->exited && !v->exit_signal);
    lua_setfield(L, -2, "graceful");
    return 1;
  }
  v->shutdown_timeout = timeout;
  /* Not exclusive: shutting down overrides whatever else is going on (a start in progress
   * sees the VMM go and fails). */
  return op_run(L, v, OP_SHUTDOWN, "shutdown", timeout + 15, 0);
}

/* Lua: vm:kill() -> true (SIGKILL to the VMM, waits for its exit) */
static int l_kill(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  lua_settop(L, 1);
  return op_run(L, v, OP_KILL, "kill", 30, 0);
}

/* Lua: vm:wait([timeout]) -> {code=|signal=, state=} | nil, "timeout" */
static int l_wait(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  lua_settop(L, 1);
  return op_run(L, v, OP_WAIT, "wait", timeout, 0);
}

static int l_state(lua_State *L) {
  vm *v = luaL_checkudata(L, 1, VM_MT);
  lua_pushstring(L, v->released ? "closed" : cl_vm_state_name(v->state));
  return 1;
}

static int l_pid(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  if (v->pid <= 0 || v->exited) return 0;
  lua_pushinteger(L, v->pid);
  return 1;
}

/* Lua: vm:log([bytes=4096]) -> the end of the VMM's log */
static int l_log(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  lua_Integer n = luaL_optinteger(L, 2, 4096);
  luaL_argcheck(L, n > 0 && n <= (1 << 20), 2, "1 to 1048576 bytes");
  char *buf = malloc((size_t)n + 1);
  if (!buf) return luaL_error(L, "vm: out of memory");
  cl_vm_log_tail(v, buf, (size_t)n + 1);
  lua_pushstring(L, buf);
  free(buf);
  return 1;
}

static void set_str(lua_State *L, const char *k, const char *s) {
  if (!s || !*s) return;
  lua_pushstring(L, s);
  lua_setfield(L, -2, k);
}

static long proc_rss_kb(pid_t pid) {
  char p[64], line[256];
  snprintf(p, sizeof p, "/proc/%d/status", (int)pid);
  FILE *f = fopen(p, "re");
  if (!f) return -1;
  long kb = -1;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, "VmRSS:", 6) == 0) {
      kb = strtol(line + 6, NULL, 10);
      break;
    }
  fclose(f);
  return kb;
}

/* Lua: vm:info() -> table describing the VM */
static int l_info(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  lua_createtable(L, 0, 24);
  set_str(L, "id", v->id);
  set_str(L, "backend", v->backend == VM_QEMU ? "qemu" : "firecracker");
  if (v->backend == VM_QEMU)
    set_str(L, "accel", v->kvm == 1 ? "kvm" : v->kvm == 2 ? "kvm-probe" : "tcg");
  set_str(L, "why", v->why);
  set_str(L, "state", cl_vm_state_name(v->state));
  if (v->pid > 0 && !v->exited) {
    lua_pushinteger(L, v->pid);
    lua_setfield(L, -2, "pid");
    long rss = proc_rss_kb(v->pid);
    if (rss >= 0) {
      lua_pushinteger(L, rss);
      lua_setfield(L, -2, "vmm_rss_kb");
    }
  }
  set_str(L, "tap", v->tap);
  if (v->tap[0]) set_str(L, "mac", v->mac);
  set_str(L, "log", v->log_path);
  set_str(L, "rundir", v->rundir);
  set_str(L, "kernel", v->kernel);
  set_str(L, "initrd", v->initrd);
  set_str(L, "rootfs", v->rootfs);
  lua_pushinteger(L, v->vcpus);
  lua_setfield(L, -2, "vcpus");
  lua_pushinteger(L, v->mem_mib);
  lua_setfield(L, -2, "mem_mib");
  set_str(L, "channel",
          v->channel == CH_SERIAL  ? "virtio-serial"
          : v->channel == CH_VSOCK ? "vsock"
                                   : "none");
  set_str(L, "firecracker_version", v->fc_version);
  if (v->t_ready && v->t_spawn) {
    lua_pushnumber(L, (double)(v->t_ready - v->t_spawn) / 1e9);
    lua_setfield(L, -2, "boot_seconds");
  }
  if (v->exited) {
    if (v->exit_signal)
      set_str(L, "exit_signal", cl_signal_name(v->exit_signal));
    else {
      lua_pushinteger(L, v->exit_code);
      lua_setfield(L, -2, "exit_code");
    }
  }
  lua_createtable(L, 0, 6);
  lua_pushboolean(L, v->chan.ready && !v->chan.closed);
  lua_setfield(L, -2, "ready");
  set_str(L, "uname", v->chan.uname);
  set_str(L, "error", v->chan.error);
  lua_pushinteger(L, (lua_Integer)v->chan.bytes_in);
  lua_setfield(L, -2, "bytes_in");
  lua_pushinteger(L, (lua_Integer)v->chan.bytes_out);
  lua_setfield(L, -2, "bytes_out");
  lua_setfield(L, -2, "agent");
  return 1;
}

/* Lua: vm:metrics() -> Firecracker's metrics (FlushMetrics, then the last line) */
static int l_metrics(lua_State *L) {
  vm *v = cl_vm_check(L, 1);
  lua_settop(L, 1);
  if (v->backend != VM_FIRECRACKER)
    return cl_failf(L, ENOTSUP, "vm %s: metrics: only Firecracker keeps metrics", v->id);
  if (v->state != VS_RUNNING && v->state != VS_PAUSED)
    return cl_failf(L, EINVAL, "vm %s: metrics: the vm is %s", v->id, cl_vm_state_name(v->state));
  return op_run(L, v, OP_METRICS, "metrics", 30, 1);
}

static int l_tostring(lua_State *L) {
  vm *v = luaL_checkudata(L, 1, VM_MT);
  lua_pushfstring(L, "clawlua.vm (%s, %s)", v->id,
                  v->released ? "closed" : cl_vm_state_name(v->state));
  return 1;
}

static int l_index(lua_State *L) {
  vm *v = luaL_checkudata(L, 1, VM_MT);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "id") == 0) {
    lua_pushstring(L, v->id);
    return 1;
  }
  if (strcmp(k, "backend") == 0) {
    lua_pushstring(L, v->backend == VM_FIRECRACKER ? "firecracker" : "qemu");
    return 1;
  }
  if (strcmp(k, "tap") == 0) {
    if (v->tap[0])
      lua_pushstring(L, v->tap);
    else
      lua_pushnil(L);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* vm.restore                                                                                 */

static const char *json_str(cJSON *o, const char *k) {
  cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
  return cJSON_IsString(x) ? x->valuestring : NULL;
}

static int json_int(cJSON *o, const char *k, int def) {
  cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
  return cJSON_IsNumber(x) ? (int)x->valuedouble : def;
}

/* Lua: vm.restore{dir=, id=, net=, log=, vmm=, seccomp=, guest=} -> running vm | nil, err */
static int l_restore(lua_State *L) {
  static const char *const fields[] = {"dir",   "id",      "net",   "log",  "vmm", "seccomp",
                                       "guest", "backend", "accel", "jail", NULL};
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  const char *dir = cl_opt_string(L, 1, "dir", NULL);
  if (!dir) cl_field_error(L, "dir", "the snapshot directory is required");
  char meta[600];
  snprintf(meta, sizeof meta, "%s/vm.json", dir);
  FILE *f = fopen(meta, "re");
  if (!f) return cl_failf(L, errno, "vm.restore: %s: %s", meta, strerror(errno));
  char buf[16384];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  cJSON *j = cJSON_Parse(buf);
  const char *backend = j ? json_str(j, "backend") : NULL;
  if (!backend) {
    cJSON_Delete(j);
    return cl_failf(L, EINVAL, "vm.restore: %s is not a clawlua snapshot description", meta);
  }
  /* The snapshot says which backend it needs; the caller may not ask for another. */
  const char *asked = cl_opt_string(L, 1, "backend", NULL);
  if (asked && strcmp(asked, backend) != 0) {
    cJSON_Delete(j);
    return cl_failf(L, EINVAL, "vm.restore: the snapshot is from %s, not %s", backend, asked);
  }
  lua_pushstring(L, backend);
  lua_setfield(L, 1, "backend");
  vm *v = push_vm(L);
  vm_opts o = {.v = v, .restore = 1, .fields = fields};
  int bad = read_options(L, 1, &o, "vm.restore");
  if (bad) return (cJSON_Delete(j), bad);
  int want_backend = o.want_backend, accel = o.accel, want_net = o.want_net;
  const char *tap = o.tap;
  v->kernel = dupstr(json_str(j, "kernel"));
  v->initrd = dupstr(json_str(j, "initrd"));
  v->rootfs = dupstr(json_str(j, "rootfs"));
  v->boot_args = dupstr(json_str(j, "boot_args"));
  v->vcpus = json_int(j, "vcpus", 1);
  v->mem_mib = json_int(j, "mem_mib", 128);
  v->rootfs_ro = json_int(j, "rootfs_readonly", 0);
  const char *ch = json_str(j, "channel");
  int snap_channel = ch && strcmp(ch, "vsock") == 0  ? CH_VSOCK
                     : ch && strcmp(ch, "none") == 0 ? CH_NONE
                                                     : CH_SERIAL;
  if (v->channel >= 0 && v->channel != snap_channel) {
    cJSON_Delete(j);
    free_config(v);
    return cl_failf(L, EINVAL, "vm.restore: the snapshot's guest channel is %s",
                    ch ? ch : "virtio-serial");
  }
  v->channel = snap_channel;
  const char *mac = json_str(j, "mac");
  if (mac && !v->mac[0] && valid_mac(mac)) snprintf(v->mac, sizeof v->mac, "%s", mac);
  const char *snap_tap = json_str(j, "tap");
  if (snap_tap && !want_net) want_net = 1;            /* the guest has a NIC: it needs a tap */
  if (json_int(j, "kvm", 0) && accel == 0) accel = 1; /* a KVM snapshot restores under KVM */
  v->cid = json_int(j, "cid", 3);
  char *rp = realpath(dir, NULL);
  v->restore_dir = dupstr(rp ? rp : dir);
  free(rp);
  cJSON_Delete(j);
  lua_settop(L, 2);
  int r = setup_vm(L, v, want_backend, accel, tap, want_net);
  if (r != 1) return r;
  v->state = VS_CREATED;
  lua_replace(L, 1); /* the steps find the vm at index 1 */
  lua_settop(L, 1);
  v->restoring = 1;
  return op_run(L, v, OP_START, "restore", -1, 1);
}

/* Lua: vm.backend{backend=, accel=} -> {backend=, accel=, why=} (what create would pick) */
static int l_backend(lua_State *L) {
  vm tmp;
  memset(&tmp, 0, sizeof tmp);
  int want = 0, accel = 0;
  if (lua_istable(L, 1)) {
    const char *b = cl_opt_string(L, 1, "backend", "auto");
    want = strcmp(b, "qemu") == 0 ? VM_QEMU : strcmp(b, "firecracker") == 0 ? VM_FIRECRACKER : 0;
    const char *a = cl_opt_string(L, 1, "accel", "auto");
    accel = strcmp(a, "kvm") == 0 ? 1 : strcmp(a, "tcg") == 0 ? 2 : 0;
    tmp.kernel = (char *)cl_opt_string(L, 1, "kernel", NULL);
  }
  int e = choose_backend(&tmp, want, accel);
  lua_createtable(L, 0, 3);
  if (!e) {
    lua_pushstring(L, tmp.backend == VM_QEMU ? "qemu" : "firecracker");
    lua_setfield(L, -2, "backend");
    if (tmp.backend == VM_QEMU) {
      lua_pushstring(L, tmp.kvm == 1 ? "kvm" : tmp.kvm == 2 ? "kvm-probe" : "tcg");
      lua_setfield(L, -2, "accel");
    }
  }
  lua_pushstring(L, tmp.why);
  lua_setfield(L, -2, "why");
  return 1;
}

static const luaL_Reg methods[] = {
    {"start", l_start},       {"pause", l_pause}, {"resume", l_resume}, {"snapshot", l_snapshot},
    {"shutdown", l_shutdown}, {"kill", l_kill},   {"wait", l_wait},     {"state", l_state},
    {"pid", l_pid},           {"info", l_info},   {"log", l_log},       {"metrics", l_metrics},
    {"close", l_close},       {NULL, NULL},
};

static const luaL_Reg funcs[] = {
    {"create", l_create},
    {"restore", l_restore},
    {"backend", l_backend},
    {NULL, NULL},
};

int luaopen_clawlua_vm(lua_State *L) {
  if (cl_entry_redirect(L, "vm")) return 1;
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &IDS_KEY);
  luaL_newmetatable(L, VM_MT);
  luaL_newlib(L, methods);
  cl_chan_open_methods(L);
  lua_setfield(L, -2, "methods");
  lua_pushcfunction(L, l_index);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
