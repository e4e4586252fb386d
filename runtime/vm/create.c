/*
 * vm.create and vm.restore: every option checked completely, with its path, before anything is
 * made; then the objects a VM owns before it runs (run directory, log, tap).
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

static void release_driver(vm *v, const char *why) {
  cl_chan_close(v, why);
  if (v->backend == VM_QEMU)
    cl_qemu_release(v);
  else
    cl_fc_release(v);
}

static const vm_ops driver_ops = {release_driver, cl_chan_release};

/* "xx:xx:xx:xx:xx:xx" (util.c's parser), unicast (the group bit of the first byte clear). */
static int valid_mac(const char *s) {
  uint8_t m[6];
  return cl_parse_mac(s, m) && !(m[0] & 1);
}

static const char *const create_fields[] = {
    "backend", "kernel",  "initrd",    "rootfs", "rootfs_readonly",
    "vcpus",   "mem_mib", "boot_args", "net",    "guest",
    "jail",    "seccomp", "log",       "id",     "vmm",
    "accel",   "acpi",    "run_dir",   NULL};

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
  v->kernel = cl_vm_dupstr(kernel);
  v->initrd = cl_vm_dupstr(cl_opt_string(L, idx, "initrd", NULL));
  v->rootfs = cl_vm_dupstr(cl_opt_string(L, idx, "rootfs", NULL));
  v->rootfs_ro = cl_opt_boolean(L, idx, "rootfs_readonly", 0);
  v->no_acpi = !cl_opt_boolean(L, idx, "acpi", 1);
  lua_Integer vcpus = cl_opt_integer(L, idx, "vcpus", 1);
  if (vcpus < 1 || vcpus > MAX_VCPUS)
    cl_field_error(L, "vcpus", lua_pushfstring(L, "1 to %d expected, got %I", MAX_VCPUS, vcpus));
  lua_Integer mem = cl_opt_integer(L, idx, "mem_mib", 128);
  long host = cl_vm_host_mem_mib();
  if (mem < MIN_MEM_MIB || mem > host)
    cl_field_error(L, "mem_mib",
                   lua_pushfstring(L, "%d to %I (the host's memory) expected, got %I", MIN_MEM_MIB,
                                   (lua_Integer)host, mem));
  v->vcpus = (int)vcpus;
  v->mem_mib = (int)mem;
  const char *ba = cl_opt_string(L, idx, "boot_args", NULL);
  if (ba && strlen(ba) > 2048) cl_field_error(L, "boot_args", "longer than 2048 bytes");
  v->boot_args = cl_vm_dupstr(ba);
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
    v->seccomp_file = cl_vm_dupstr(lua_tostring(L, -1));
  } else if (t == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
    v->seccomp_file = cl_vm_dupstr("");
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
    cl_vm_random_hex(hex, 4);
    snprintf(v->id, sizeof v->id, "vm-%s", hex);
  }
  parse_vmm(L, idx, v, o->want_backend);
  const char *log = cl_opt_string(L, idx, "log", NULL);
  if (log) {
    snprintf(v->log_path, sizeof v->log_path, "%s", log);
    v->log_keep = 1;
  }
  /* run_dir: the caller names it (and writes it down before it exists: clawlua.sandbox's state
   * record); unix socket paths in it must fit in 108 bytes */
  const char *rd = cl_opt_string(L, idx, "run_dir", NULL);
  if (rd) {
    if (rd[0] != '/' || strlen(rd) > 80 || strstr(rd, "/.."))
      cl_field_error(L, "run_dir", "an absolute path of at most 80 bytes without .. expected");
    snprintf(v->rundir, sizeof v->rundir, "%s", rd);
    v->rundir_given = 1;
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
    cl_vm_free_config(o->v);
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
  v->ops = &driver_ops;
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
  /* nor the run directory a caller named (run_dir=): it is made after the checks */
  char rundir[sizeof v->rundir];
  memcpy(rundir, v->rundir, sizeof rundir);
  v->rundir[0] = 0;
  cl_vm_jail_options(L, v, lua_gettop(L), NULL);
  v->log_keep = keep;
  memcpy(v->rundir, rundir, sizeof rundir);
  jail_verdict jv = {0, ""};
  if (cl_parse_nested(L, top + 1, "jail", check_merged_jail, &jv)) {
    cl_vm_free_config(v);
    return luaL_error(L, "vm.create: %s", lua_tostring(L, -1));
  }
  lua_settop(L, top);
  if (!jv.err) return 0;
  cl_vm_free_config(v);
  return cl_failf(L, jv.err, "vm.create: jail: %s", jv.msg);
}

/* The part of create and restore after the options: checks, then the kernel objects. The vm
 * userdata is on top of the stack. Returns 1 (the vm stays on top) or pushes nil, err, code. */
/* The files a VM names exist and are absolute paths from now on (the VMM runs in its run
 * directory). Returns 0 or pushes the failure. */
static int check_files(lua_State *L, vm *v) {
  int n;
  if (v->kernel && (n = file_check(L, "kernel", v->kernel))) return (cl_vm_free_config(v), n);
  if (v->initrd && (n = file_check(L, "initrd", v->initrd))) return (cl_vm_free_config(v), n);
  if (v->rootfs && (n = file_check(L, "rootfs", v->rootfs))) return (cl_vm_free_config(v), n);
  if (v->seccomp_file && v->seccomp_file[0] &&
      (n = file_check(L, "seccomp filter", v->seccomp_file)))
    return (cl_vm_free_config(v), n);
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
  return 0;
}

/* Everything checked before the handle owns anything: files, id, backend, the seccomp and
 * channel the backend can take, the tap name, the jail. Returns 0 or pushes the failure. */
static int check_vm(lua_State *L, vm *v, int want_backend, int accel, const char *tap) {
  int n = check_files(L, v);
  if (n) return n;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &cl_vm_ids_key);
  int dup = lua_getfield(L, -1, v->id) != LUA_TNIL;
  lua_pop(L, 2);
  if (dup) {
    cl_vm_free_config(v);
    return cl_failf(L, EEXIST, "vm.create: id \"%s\" is already in use by another vm", v->id);
  }
  if (cl_vm_choose_backend(v, want_backend, accel)) {
    cl_vm_free_config(v);
    return cl_failf(L, ENOENT, "vm.create: %s", v->why);
  }
  if (v->backend == VM_QEMU && v->filter_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, v->filter_ref);
    int is_table = lua_istable(L, -1);
    lua_pop(L, 1);
    if (is_table) {
      cl_vm_free_config(v);
      return cl_failf(L, EINVAL,
                      "vm.create: seccomp: {vmm=, api=, vcpu=} is for Firecracker's "
                      "threads; QEMU takes one filter");
    }
  }
  if (v->backend == VM_QEMU && v->seccomp_file && v->seccomp_file[0]) {
    cl_vm_free_config(v);
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
    cl_vm_free_config(v);
    return cl_failf(L, ENODEV, "vm.create: channel \"vsock\" with qemu needs /dev/vhost-vsock: %s",
                    strerror(errno));
  }
  if (tap && cl_vm_iface_exists(tap)) {
    cl_vm_free_config(v);
    return cl_failf(L, EEXIST, "vm.create: net.tap: an interface named \"%s\" already exists", tap);
  }
  if (v->jailed && (n = check_vmm_jail(L, v))) return n;
  return 0;
}

static int setup_vm(lua_State *L, vm *v, int want_backend, int accel, const char *tap,
                    int want_net) {
  int n = check_vm(L, v, want_backend, accel, tap);
  if (n) return n;
  /* From here on the handle owns what it makes. */
  v->released = 0;
  v->state = VS_CREATED;
  v->t_create = cl_now_ns();
  lua_rawgetp(L, LUA_REGISTRYINDEX, &cl_vm_ids_key);
  lua_pushboolean(L, 1);
  lua_setfield(L, -2, v->id);
  lua_pop(L, 1);
  int e = cl_vm_make_rundir(v);
  if (e) {
    cl_vm_release(L, v);
    return cl_failf(L, e, "vm.create: run directory: %s", strerror(e));
  }
  if (!v->log_path[0]) snprintf(v->log_path, sizeof v->log_path, "%s/vmm.log", v->rundir);
  v->logfd = open(v->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (v->logfd < 0) {
    e = errno;
    cl_vm_release(L, v);
    return cl_failf(L, e, "vm.create: log %s: %s", v->log_path, strerror(e));
  }
  if (want_net) {
    v->tap_persist = v->backend == VM_FIRECRACKER; /* Firecracker opens its tap by name */
    if (!v->mac[0]) {
      char hex[7];
      cl_vm_random_hex(hex, 3);
      snprintf(v->mac, sizeof v->mac, "02:c1:a7:%c%c:%c%c:%c%c", hex[0], hex[1], hex[2], hex[3],
               hex[4], hex[5]);
    }
    for (int attempt = 0; attempt < 8; attempt++) {
      if (tap)
        snprintf(v->tap, sizeof v->tap, "%s", tap);
      else {
        char hex[9];
        cl_vm_random_hex(hex, 4);
        snprintf(v->tap, sizeof v->tap, "clw%s", hex);
        v->tap_auto = 1;
      }
      e = cl_vm_tap_create(v->tap, v->tap_persist, &v->tapfd);
      if (e != EBUSY || tap) break;
    }
    if (e) {
      char name[16];
      snprintf(name, sizeof name, "%s", v->tap);
      v->tap[0] = 0;
      cl_vm_release(L, v);
      if (e == EBUSY)
        return cl_failf(L, EEXIST, "vm.create: net.tap: an interface named \"%s\" already exists",
                        name);
      return cl_failf(L, e, "vm.create: tap %s: %s", name, strerror(e));
    }
  }
  /* A vsock context id of its own (vhost-vsock refuses one in use): the pid and a counter. */
  static unsigned cid_counter;
  v->cid = 3 + (int)(((unsigned)getpid() & 0x7fffu) << 8 | (cid_counter++ & 0xffu));
  cl_vm_push_detail(L, v);
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
int cl_vm_l_create(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  vm *v = push_vm(L);
  vm_opts o = {.v = v, .fields = create_fields};
  int n = read_options(L, 1, &o, "vm.create");
  if (n) return n;
  lua_settop(L, 2);
  return setup_vm(L, v, o.want_backend, o.accel, o.tap, o.want_net);
}

static const char *json_str(cJSON *o, const char *k) {
  cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
  return cJSON_IsString(x) ? x->valuestring : NULL;
}

static int json_int(cJSON *o, const char *k, int def) {
  cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
  return cJSON_IsNumber(x) ? (int)x->valuedouble : def;
}

/* Lua: vm.restore{dir=, id=, net=, log=, vmm=, seccomp=, guest=} -> running vm | nil, err */
int cl_vm_restore_prepare(lua_State *L) {
  static const char *const fields[] = {"dir",   "id",      "net",   "log",  "vmm",     "seccomp",
                                       "guest", "backend", "accel", "jail", "run_dir", NULL};
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
  v->kernel = cl_vm_dupstr(json_str(j, "kernel"));
  v->initrd = cl_vm_dupstr(json_str(j, "initrd"));
  v->rootfs = cl_vm_dupstr(json_str(j, "rootfs"));
  v->boot_args = cl_vm_dupstr(json_str(j, "boot_args"));
  v->vcpus = json_int(j, "vcpus", 1);
  v->mem_mib = json_int(j, "mem_mib", 128);
  v->rootfs_ro = json_int(j, "rootfs_readonly", 0);
  v->no_acpi = !json_int(j, "acpi", 1);
  const char *ch = json_str(j, "channel");
  int snap_channel = ch && strcmp(ch, "vsock") == 0  ? CH_VSOCK
                     : ch && strcmp(ch, "none") == 0 ? CH_NONE
                                                     : CH_SERIAL;
  if (v->channel >= 0 && v->channel != snap_channel) {
    cJSON_Delete(j);
    cl_vm_free_config(v);
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
  v->restore_dir = cl_vm_dupstr(rp ? rp : dir);
  free(rp);
  cJSON_Delete(j);
  lua_settop(L, 2);
  int r = setup_vm(L, v, want_backend, accel, tap, want_net);
  if (r != 1) return r;
  v->state = VS_CREATED;
  lua_replace(L, 1); /* the steps find the vm at index 1 */
  lua_settop(L, 1);
  v->restoring = 1;
  return 0;
}
