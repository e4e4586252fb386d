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
    if (v->restoring && n >= 2 && lua_isnil(L, -n)) cl_vm_release(L, v);
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
  lua_pushboolean(L, !v->no_acpi);
  lua_setfield(L, -2, "acpi");
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

static int l_gc(lua_State *L) {
  vm *v = lua_touserdata(L, 1);
  cl_vm_release(L, v);
  cl_vm_free_config(v); /* also when create raised half-way, before the handle owned anything */
  return 0;
}

static int l_close(lua_State *L) {
  vm *v = luaL_checkudata(L, 1, VM_MT);
  cl_vm_release(L, v);
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: vm.restore{dir=, ...} -> a running vm | nil, err, code */
static int l_restore(lua_State *L) {
  int n = cl_vm_restore_prepare(L);
  if (n) return n;
  return op_run(L, cl_vm_check(L, 1), OP_START, "restore", -1, 1);
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
  int e = cl_vm_choose_backend(&tmp, want, accel);
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
    {"create", cl_vm_l_create},
    {"restore", l_restore},
    {"backend", l_backend},
    {NULL, NULL},
};

int luaopen_clawlua_vm(lua_State *L) {
  if (cl_entry_redirect(L, "vm")) return 1;
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &cl_vm_ids_key);
  /* __index is a function: the read-only identity fields, then the methods kept in the
   * metatable's "methods" table (the channel's exec and file methods among them). */
  static const luaL_Reg meta[] = {{"__index", l_index}, {"__tostring", l_tostring}, {NULL, NULL}};
  static const cl_class cls = {VM_MT, NULL, l_gc, meta};
  cl_class_register(L, &cls);
  luaL_getmetatable(L, VM_MT);
  luaL_newlib(L, methods);
  cl_chan_open_methods(L);
  lua_setfield(L, -2, "methods");
  lua_pop(L, 1);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE); /* test seams, off the module */
  lua_pushcfunction(L, cl_chan_open_faults);
  lua_setfield(L, -2, "clawlua.vm_faults");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
