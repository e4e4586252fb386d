/*
 * clawlua.jail: a process in its own namespaces (user, pid, mount, net, ipc, uts, cgroup), on a
 * root of its own (a directory, or a tmpfs assembled from read-only and read-write binds), with
 * /proc for its pid namespace, a /dev holding only the listed devices, mapped or dropped ids,
 * a capability list, no_new_privs, rlimits, cgroup limits (v1 or v2), and a seccomp filter
 * applied last, just before exec. It is how a VMM is confined and a sandbox backend of its own.
 *
 * The process handle is a clawlua.proc handle (spawned through cl_proc_spawn); the jail adds an
 * extension that owns the cgroups: read at reap (OOM kills, peaks) and removed on every path.
 * Every mount is made inside the child's private mount namespace, so the host's mount table is
 * never touched and nothing is left to unmount: the namespace dies with its last process.
 *
 * In the child (fork path of cl_spawn, async-signal-safe code only): hostname, loopback up,
 * cgroup namespace, mounts and pivot_root, rlimits, capability bounding set, ids, capabilities,
 * no_new_privs; then proc.c enters cwd, finds the program in the new root, installs the seccomp
 * filter and execs.
 */
#include "jail_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

static const char *const cap_names[] = {
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
};

static int cap_number(const char *name) {
  char low[40];
  size_t i = 0;
  if (strncasecmp(name, "cap_", 4) == 0) name += 4;
  for (; i < sizeof low - 1 && name[i]; i++)
    low[i] = (char)(name[i] >= 'A' && name[i] <= 'Z' ? name[i] - 'A' + 'a' : name[i]);
  low[i] = 0;
  for (size_t c = 0; c < CL_ARRAY_LEN(cap_names); c++)
    if (strcmp(cap_names[c], low) == 0) return (int)c;
  return -1;
}

static const struct {
  const char *name;
  int res;
} rlimit_names[] = {
    {"as", RLIMIT_AS},
    {"core", RLIMIT_CORE},
    {"cpu", RLIMIT_CPU},
    {"data", RLIMIT_DATA},
    {"fsize", RLIMIT_FSIZE},
    {"memlock", RLIMIT_MEMLOCK},
    {"nofile", RLIMIT_NOFILE},
    {"nproc", RLIMIT_NPROC},
    {"stack", RLIMIT_STACK},
    {"locks", RLIMIT_LOCKS},
    {"sigpending", RLIMIT_SIGPENDING},
    {"msgqueue", RLIMIT_MSGQUEUE},
    {"nice", RLIMIT_NICE},
    {"rtprio", RLIMIT_RTPRIO},
    {"rttime", RLIMIT_RTTIME},
};
_Static_assert(CL_ARRAY_LEN(rlimit_names) == MAX_RLIMITS, "MAX_RLIMITS");

static const char *const jail_fields[] = {
    "root",         "root_readonly", "binds",  "tmpfs",  "symlinks", "devices", "proc",
    "namespaces",   "uid",           "gid",    "groups", "uid_map",  "gid_map", "caps",
    "no_new_privs", "rlimits",       "cgroup", "net",    "hostname", "id",      NULL,
};

/* "64M", "1G", 1048576 -> bytes; -1 when malformed. */
static long long parse_size(lua_State *L, int idx) {
  if (lua_isinteger(L, idx)) return lua_tointeger(L, idx);
  if (lua_type(L, idx) != LUA_TSTRING) return -1;
  const char *s = lua_tostring(L, idx);
  char *end;
  double v = strtod(s, &end);
  if (end == s || v < 0) return -1;
  double mul = 1;
  switch (*end) {
  case 'k':
  case 'K':
    mul = 1024.0;
    end++;
    break;
  case 'm':
  case 'M':
    mul = 1024.0 * 1024;
    end++;
    break;
  case 'g':
  case 'G':
    mul = 1024.0 * 1024 * 1024;
    end++;
    break;
  default:
    break;
  }
  if (*end == 'i') end++;
  if (*end == 'B' || *end == 'b') end++;
  if (*end) return -1;
  return (long long)(v * mul);
}

static void parse_map(lua_State *L, int opts, const char *field, char *out, size_t outlen,
                      long inside, long outside) {
  if (lua_getfield(L, opts, field) == LUA_TNIL) {
    snprintf(out, outlen, "%ld %ld 1\n", inside, outside);
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1)) cl_field_error(L, field, "list of {inside, outside, count} expected");
  int t = lua_gettop(L);
  lua_Integer n = (lua_Integer)lua_rawlen(L, t);
  if (n < 1 || n > MAX_MAPS) cl_field_error(L, field, "1 to 8 ranges expected");
  size_t o = 0;
  out[0] = 0;
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, t, i);
    lua_Integer v[3];
    for (int k = 0; k < 3; k++) {
      lua_rawgeti(L, -1 - k, k + 1);
      int ok;
      v[k] = lua_tointegerx(L, -1, &ok);
      if (!ok || v[k] < 0 || v[k] > 4294967294LL || (k == 2 && v[k] < 1))
        cl_field_error(L, lua_pushfstring(L, "%s[%I]", field, i),
                       "{inside, outside, count} of ids expected");
    }
    lua_pop(L, 4);
    int w = snprintf(out + o, outlen - o, "%lld %lld %lld\n", (long long)v[0], (long long)v[1],
                     (long long)v[2]);
    if (w < 0 || (size_t)w >= outlen - o) cl_field_error(L, field, "too long");
    o += (size_t)w;
  }
  lua_pop(L, 1);
}

/* Does an id map ("inside outside count" lines) cover inside id 0? */
static int maps_zero(const char *map) {
  for (const char *p = map; p && *p;) {
    char *e1, *e2, *e3;
    long long in = strtoll(p, &e1, 10), out = strtoll(e1, &e2, 10), n = strtoll(e2, &e3, 10);
    CL_UNUSED(out);
    if (e1 != p && e3 != e2 && in <= 0 && in + n > 0) return 1;
    p = strchr(p, '\n');
    if (p) p++;
  }
  return 0;
}

static int ns_flag(lua_State *L, int t, const char *name, int def) {
  if (!t) return def;
  int ty = lua_getfield(L, t, name);
  int v = def;
  if (ty == LUA_TBOOLEAN)
    v = lua_toboolean(L, -1);
  else if (ty != LUA_TNIL)
    cl_field_error(L, lua_pushfstring(L, "namespaces.%s", name), "boolean expected");
  lua_pop(L, 1);
  return v;
}

static int userns_available(void) {
  char buf[32];
  if (cl_jail_read_file("/proc/sys/user/max_user_namespaces", buf, sizeof buf) <= 0) return 0;
  return strtol(buf, NULL, 10) > 0;
}

/* Cgroup limits asked for (created only once everything else is known to be good). */
typedef struct cg_spec {
  int has;
  long long memory, pids;
  double cpu;
  int version;
} cg_spec;

/* namespaces = {user=, pid=, ...}; returns whether a network namespace is wanted. */
static int parse_namespaces(lua_State *L, int opts, jail_cfg *c) {
  int nt = 0;
  if (lua_getfield(L, opts, "namespaces") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "namespaces", "table expected");
    static const char *const nf[] = {"user", "pid", "mount", "net", "ipc", "uts", "cgroup", NULL};
    cl_check_fields_at(L, -1, "namespaces", NULL, nf);
    nt = lua_gettop(L);
  }
  c->userns = ns_flag(L, nt, "user", userns_available());
  if (c->userns && !userns_available())
    cl_field_error(L, "namespaces.user", "user namespaces are disabled on this host");
  c->pidns = ns_flag(L, nt, "pid", 1);
  c->mountns = ns_flag(L, nt, "mount", 1);
  c->ipcns = ns_flag(L, nt, "ipc", 1);
  c->utsns = ns_flag(L, nt, "uts", 1);
  c->cgroupns = ns_flag(L, nt, "cgroup", 1);
  int netns_flag = ns_flag(L, nt, "net", 1);
  lua_pop(L, 1);
  return netns_flag;
}

/* hostname, uid, gid, groups and the id maps of a user namespace. */
static void parse_ids(lua_State *L, int opts, jail_cfg *c) {
  const char *hn = cl_opt_string(L, opts, "hostname", NULL);
  if (hn) {
    if (!c->utsns) cl_field_error(L, "hostname", "needs the uts namespace");
    if (strlen(hn) == 0 || strlen(hn) > 64) cl_field_error(L, "hostname", "1 to 64 characters");
    snprintf(c->hostname, sizeof c->hostname, "%s", hn);
  }
  lua_Integer uid = cl_opt_integer(L, opts, "uid", -1), gid = cl_opt_integer(L, opts, "gid", -1);
  if (uid < -1 || uid > 4294967294LL) cl_field_error(L, "uid", "0..4294967294 expected");
  if (gid < -1 || gid > 4294967294LL) cl_field_error(L, "gid", "0..4294967294 expected");
  c->set_ids = uid >= 0 || gid >= 0 || c->userns;
  c->uid = (uid_t)(uid >= 0 ? uid : 0);
  c->gid = (gid_t)(gid >= 0 ? gid : (uid >= 0 ? uid : 0));
  if (c->userns) {
    parse_map(L, opts, "uid_map", c->uid_map, sizeof c->uid_map, (long)c->uid, (long)getuid());
    parse_map(L, opts, "gid_map", c->gid_map, sizeof c->gid_map, (long)c->gid, (long)getgid());
    c->root_mapped = maps_zero(c->uid_map) && maps_zero(c->gid_map);
  } else {
    static const char *const maps[] = {"uid_map", "gid_map", NULL};
    for (const char *const *f = maps; *f; f++)
      if (lua_getfield(L, opts, *f) != LUA_TNIL)
        cl_field_error(L, *f, "needs the user namespace");
      else
        lua_pop(L, 1);
  }
  if (lua_getfield(L, opts, "groups") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "groups", "list of gids expected");
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    if (n > MAX_GROUPS) cl_field_error(L, "groups", "at most 32 groups");
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      int ok;
      lua_Integer g = lua_tointegerx(L, -1, &ok);
      if (!ok || g < 0 || g > 4294967294LL)
        cl_field_error(L, lua_pushfstring(L, "groups[%I]", i), "gid expected");
      c->groups[c->ngroups++] = (gid_t)g;
      lua_pop(L, 1);
    }
    c->set_ids = 1;
  }
  lua_pop(L, 1);
}

static void parse_caps(lua_State *L, int opts, jail_cfg *c) {
  char buf[32];
  c->cap_last = cl_jail_read_file("/proc/sys/kernel/cap_last_cap", buf, sizeof buf) > 0
                    ? (int)strtol(buf, NULL, 10)
                    : 40;
  if (c->cap_last > 63) c->cap_last = 63;
  if (lua_getfield(L, opts, "caps") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "caps", "list of capability names expected");
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      const char *name = lua_tostring(L, -1);
      int cap = name ? cap_number(name) : -1;
      if (cap < 0 || cap > c->cap_last)
        cl_field_error(L, lua_pushfstring(L, "caps[%I]", i),
                       lua_pushfstring(L, "unknown capability '%s'", name ? name : "?"));
      c->caps |= 1ull << cap;
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  c->no_new_privs = cl_opt_boolean(L, opts, "no_new_privs", 1);
}

static void parse_rlimits(lua_State *L, int opts, jail_cfg *c) {
  if (lua_getfield(L, opts, "rlimits") != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "rlimits", "table expected");
    int t = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, t)) {
      const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
      int res = -1;
      for (size_t i = 0; i < CL_ARRAY_LEN(rlimit_names); i++)
        if (strcmp(rlimit_names[i].name, name) == 0) res = rlimit_names[i].res;
      const char *field = lua_pushfstring(L, "rlimits.%s", name);
      if (res < 0)
        cl_field_error(L, field,
                       "unknown resource (as, core, cpu, data, fsize, "
                       "memlock, nofile, nproc, stack, ...)");
      long long soft, hard;
      if (lua_istable(L, -2)) {
        lua_rawgeti(L, -2, 1);
        lua_rawgeti(L, -3, 2);
        soft = parse_size(L, -2);
        hard = lua_isnil(L, -1) ? soft : parse_size(L, -1);
        lua_pop(L, 2);
      } else {
        soft = hard = parse_size(L, -2);
      }
      if (soft < 0 || hard < 0 || soft > hard)
        cl_field_error(L, field, "non-negative limit (or {soft, hard} with soft <= hard) expected");
      c->rlimits[c->nrlimits].res = res;
      c->rlimits[c->nrlimits].lim.rlim_cur = (rlim_t)soft;
      c->rlimits[c->nrlimits].lim.rlim_max = (rlim_t)hard;
      c->nrlimits++;
      lua_pop(L, 2);
    }
  }
  lua_pop(L, 1);
}

/* cgroup = {memory=, pids=, cpu=, version=} | false */
static void parse_cgroup(lua_State *L, int opts, cg_spec *cg) {
  memset(cg, 0, sizeof *cg);
  int ct = lua_getfield(L, opts, "cgroup");
  if (ct != LUA_TNIL && !(ct == LUA_TBOOLEAN && !lua_toboolean(L, -1))) {
    if (ct != LUA_TTABLE) cl_field_error(L, "cgroup", "table or false expected");
    cg->has = 1;
    static const char *const cf[] = {"memory", "pids", "cpu", "version", NULL};
    cl_check_fields_at(L, -1, "cgroup", NULL, cf);
    int t = lua_gettop(L);
    if (lua_getfield(L, t, "memory") != LUA_TNIL) {
      cg->memory = parse_size(L, -1);
      if (cg->memory < 1024 * 1024 || cg->memory > (1LL << 50))
        cl_field_error(L, "cgroup.memory", "1 MiB to 1 PiB expected (bytes or \"64M\")");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, t, "pids") != LUA_TNIL) {
      int ok;
      cg->pids = lua_tointegerx(L, -1, &ok);
      if (!ok || cg->pids < 1 || cg->pids > 4194304)
        cl_field_error(L, "cgroup.pids", "1..4194304 expected");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, t, "cpu") != LUA_TNIL) {
      cg->cpu = lua_tonumber(L, -1);
      if (!lua_isnumber(L, -1) || !(cg->cpu >= 0.01 && cg->cpu <= 1024))
        cl_field_error(L, "cgroup.cpu", "CPUs 0.01..1024 expected (0.5 = half a CPU)");
    }
    lua_pop(L, 1);
    if (lua_getfield(L, t, "version") != LUA_TNIL) {
      lua_Integer v = lua_tointeger(L, -1);
      if (!lua_isinteger(L, -1) || (v != 1 && v != 2))
        cl_field_error(L, "cgroup.version", "1 or 2 expected");
      cg->version = (int)v;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Reads every jail option into c and cg without making anything. Raises on misuse; returns 0 or
 * an errno with a message in err (a bind source or root that does not exist). *net is "new",
 * "host" or the path of a network namespace to join. */
static int parse_jail(lua_State *L, int opts, jail_cfg *c, cg_spec *cg, const char **net, char *err,
                      size_t errlen) {
  memset(c, 0, sizeof *c);
  c->netfd = -1;
  int netns_flag = parse_namespaces(L, opts, c);
  /* Network: "new" (default), "host", or a namespace to join (path like /run/netns/x). */
  *net = cl_opt_string(L, opts, "net", netns_flag ? "new" : "host");
  if (strcmp(*net, "new") == 0)
    c->netns_new = 1;
  else if (strcmp(*net, "host") != 0 && (*net)[0] != '/')
    cl_field_error(L, "net", "\"new\", \"host\" or the path of a network namespace expected");
  int e = cl_jail_parse_root(L, opts, c, err, errlen);
  if (!e) e = cl_jail_parse_mounts(L, opts, c, err, errlen);
  if (e) return e;
  parse_ids(L, opts, c);
  parse_caps(L, opts, c);
  parse_rlimits(L, opts, c);
  parse_cgroup(L, opts, cg);
  const char *id = cl_opt_string(L, opts, "id", NULL);
  if (id && (strlen(id) == 0 || strlen(id) >= 64)) cl_field_error(L, "id", "1 to 63 characters");
  return 0;
}

int cl_jail_check(lua_State *L, int opts, int strict, char *err, size_t errlen) {
  opts = lua_absindex(L, opts);
  luaL_checktype(L, opts, LUA_TTABLE);
  if (strict) cl_check_fields(L, opts, jail_fields);
  jail_cfg *c = lua_newuserdatauv(L, sizeof *c, 0);
  cg_spec cg;
  const char *net;
  int e = parse_jail(L, opts, c, &cg, &net, err, errlen);
  lua_pop(L, 1);
  return e;
}

/* prepare hook: reads the jail options, builds the child's configuration and the cgroups. */
static int prepare(lua_State *L, int opts, cl_spawn_req *req, void *arg, cl_proc_ext **extp,
                   char *err, size_t errlen) {
  spawn_ctx *sc = arg;
  jail_cfg *c = lua_newuserdatauv(L, sizeof *c, 0);
  sc->cfg = c;
  /* The stack slot goes before the child starts; the hooks after it still read the config
   * (without this anchor a collection in between freed it: found by the aggressive-GC rerun). */
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, sc->idx, 1);
  cg_spec cg;
  const char *net;
  int e = parse_jail(L, opts, c, &cg, &net, err, errlen);
  if (e) return e;
  /* Identity for audit. */
  static unsigned jail_counter;
  const char *id = cl_opt_string(L, opts, "id", NULL);
  if (id)
    snprintf(sc->id, sizeof sc->id, "%s", id);
  else
    snprintf(sc->id, sizeof sc->id, "jail-%d-%u", (int)getpid(), ++jail_counter);
  /* The namespace to join: opened after every check that raises (it must not leak); closed
   * when the spawn returns. */
  if (strcmp(net, "new") != 0 && strcmp(net, "host") != 0) {
    c->netfd = open(net, O_RDONLY | O_CLOEXEC);
    if (c->netfd < 0) {
      snprintf(err, errlen, "net %s: %s", net, strerror(errno));
      return errno;
    }
    req->netns_fd = c->netfd;
  }
  jail_ext *x = calloc(1, sizeof *x);
  if (!x) {
    luaL_error(L, "jail: out of memory");
    abort(); /* not reached */
  }
  x->ext.kill = cl_jail_ext_kill;
  x->ext.reaped = cl_jail_ext_reaped;
  x->ext.status = cl_jail_ext_status;
  x->ext.destroy = cl_jail_ext_destroy;
  x->loop = cl_loop_get(L);
  snprintf(x->id, sizeof x->id, "%s", sc->id);
  *extp = &x->ext;
  sc->ext = x;
  /* cgroups last: only now is the input known to be good. */
  if (cg.has && (e = cl_jail_cg_create(x, cg.version, cg.memory, cg.pids, cg.cpu, err, errlen))) {
    if (c->netfd >= 0) close(c->netfd), c->netfd = -1;
    return e;
  }
  for (int i = 0; i < x->ndirs; i++) {
    if (x->dirs[i].v2) continue; /* v2 has no `tasks`: the parent moves the child (setup) */
    char path[MAX_PATH_LEN + 16];
    snprintf(path, sizeof path, "%s/tasks", x->dirs[i].path);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
      e = errno;
      snprintf(err, errlen, "cgroup: opening %s: %s", path, strerror(e));
      if (c->netfd >= 0) close(c->netfd), c->netfd = -1;
      return e;
    }
    c->tasks[c->ntasks++] = fd;
  }
  unsigned long flags = 0;
  if (c->userns) flags |= CLONE_NEWUSER;
  if (c->pidns) flags |= CLONE_NEWPID;
  if (c->mountns) flags |= CLONE_NEWNS;
  if (c->netns_new) flags |= CLONE_NEWNET;
  if (c->ipcns) flags |= CLONE_NEWIPC;
  if (c->utsns) flags |= CLONE_NEWUTS;
  req->clone_flags = flags;
  req->child_setup = cl_jail_child_setup;
  req->child_arg = c;
  req->parent_setup = cl_jail_parent_setup;
  req->parent_arg = sc;
  return 0;
}

static void started(lua_State *L, int handle, pid_t pid, void *arg) {
  spawn_ctx *sc = arg;
  jail_cfg *c = sc->cfg;
  if (c->netfd >= 0) close(c->netfd), c->netfd = -1;
  cl_audit_track_pid(L, pid, sc->id);
  lua_createtable(L, 0, 6);
  int info = lua_gettop(L);
  lua_pushstring(L, sc->id);
  lua_setfield(L, info, "id");
  lua_createtable(L, 0, 7);
  const struct {
    const char *n;
    int on;
  } ns[] = {{"user", c->userns}, {"pid", c->pidns}, {"mount", c->mountns},  {"net", c->netns_new},
            {"ipc", c->ipcns},   {"uts", c->utsns}, {"cgroup", c->cgroupns}};
  for (size_t i = 0; i < CL_ARRAY_LEN(ns); i++) {
    lua_pushboolean(L, ns[i].on);
    lua_setfield(L, -2, ns[i].n);
  }
  lua_setfield(L, info, "namespaces");
  lua_createtable(L, sc->ext ? sc->ext->ndirs : 0, 0);
  for (int i = 0; sc->ext && i < sc->ext->ndirs; i++) {
    lua_pushstring(L, sc->ext->dirs[i].path);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, info, "cgroups");
  lua_pushinteger(L, sc->ext && sc->ext->ndirs ? (sc->ext->dirs[0].v2 ? 2 : 1) : 0);
  lua_setfield(L, info, "cgroup_version");
  lua_pushvalue(L, info);
  lua_setiuservalue(L, handle, 5);
  cl_audit_emit(L, "jail.spawn", sc->id, pid, info);
  lua_pop(L, 1);
}

/* Lua: jail.spawn{argv..., root=, binds=, tmpfs=, symlinks=, devices=, proc=, namespaces=,
 * uid=, gid=, groups=, uid_map=, gid_map=, caps=, no_new_privs=, rlimits=, cgroup=, net=,
 * hostname=, id=, seccomp=, and proc.spawn's cwd/env/stdio options} -> process | nil, err */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  return cl_jail_spawn(L, 1);
}

int cl_jail_spawn(lua_State *L, int opts) {
  opts = lua_absindex(L, opts);
  spawn_ctx *sc = lua_newuserdatauv(L, sizeof *sc, 1);
  memset(sc, 0, sizeof *sc);
  sc->idx = lua_gettop(L);
  cl_spawn_hooks h;
  memset(&h, 0, sizeof h);
  h.fields = jail_fields;
  h.in_jail = 1;
  h.prepare = prepare;
  h.started = started;
  h.arg = sc;
  h.sandbox = sc->id;
  int n = cl_proc_spawn(L, opts, &h);
  /* A failed spawn may leave a joined-netns fd open in the config; the child had its copies of
   * the cgroups' `tasks` files. */
  if (sc->cfg && sc->cfg->netfd >= 0) close(sc->cfg->netfd), sc->cfg->netfd = -1;
  for (int i = 0; sc->cfg && i < sc->cfg->ntasks; i++) close(sc->cfg->tasks[i]);
  if (sc->cfg) sc->cfg->ntasks = 0;
  lua_remove(L, lua_gettop(L) - n); /* the context, below the results */
  return n;
}

static const luaL_Reg funcs[] = {
    {"spawn", l_spawn},
    {"cgroup_info", cl_jail_cgroup_info},
    {"cgroup_mounts", cl_jail_cgroup_mounts},
    {NULL, NULL},
};

int luaopen_clawlua_jail(lua_State *L) {
  if (cl_entry_redirect(L, "jail")) return 1;
  luaL_newlib(L, funcs);
  return 1;
}
