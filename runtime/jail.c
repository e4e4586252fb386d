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
#include "jail.h"
#include "clawlua.h"

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

#define CFG_MT       "clawlua.jail.config"
#define MAX_MOUNTS   128
#define MAX_PATH_LEN 1024
#define MAX_DEVICES  32
#define MAX_MAPS     8
#define MAX_GROUPS   32
#define BASE         "/tmp" /* where the child assembles the new root (its own tmpfs, in its own ns) */

#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#endif
#ifndef MOUNT_ATTR_SIZE_VER0
struct mount_attr {
  uint64_t attr_set, attr_clr, propagation, userns_fd;
};
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif

/* ------------------------------------------------------------------------------------------ */
/* Names                                                                                      */

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

/* ------------------------------------------------------------------------------------------ */
/* The child's configuration: everything child_setup needs, built before clone               */

enum { M_BIND, M_TMPFS, M_DIR, M_SYMLINK, M_DEV, M_PROC };

typedef struct mnt {
  int kind;
  int rw, dev, is_dir, optional;
  char src[MAX_PATH_LEN]; /* "/oldroot/<host path>", or a symlink's target */
  char dst[MAX_PATH_LEN]; /* "/newroot/<path in the jail>" */
  char opts[64];          /* tmpfs options */
} mnt;

typedef struct jail_cfg {
  int userns, pidns, mountns, netns_new, ipcns, utsns, cgroupns;
  int have_root; /* bind a host directory as the root (else a tmpfs) */
  int root_rw;
  char root_src[MAX_PATH_LEN];
  char hostname[65];
  int nmounts;
  mnt mounts[MAX_MOUNTS];
  int set_ids;
  uid_t uid;
  gid_t gid;
  int ngroups;
  gid_t groups[MAX_GROUPS];
  uint64_t caps; /* kept capabilities */
  int cap_last;
  int no_new_privs;
  int nrlimits;
  struct {
    int res;
    struct rlimit lim;
  } rlimits[CL_ARRAY_LEN(rlimit_names)];
  /* parent side */
  char uid_map[256], gid_map[256];
  int root_mapped; /* both maps give the namespace a root (inside id 0) */
  int netfd;
} jail_cfg;

/* ------------------------------------------------------------------------------------------ */
/* cgroups                                                                                    */

enum { CG_MEMORY, CG_PIDS, CG_CPU, CG_NCTRL };
static const char *const cg_names[CG_NCTRL] = {"memory", "pids", "cpu"};

typedef struct cgdir {
  char path[MAX_PATH_LEN];
  int v2;
  unsigned ctrls; /* bit per CG_* this directory limits */
  int created;
} cgdir;

typedef struct jail_ext {
  cl_proc_ext ext;
  cl_loop *loop;
  char id[64];
  int ndirs;
  cgdir dirs[CG_NCTRL + 1];
  int collected;
  long long oom_kills, mem_peak, pids_peak, pids_denied, cpu_usec;
  int removed;
  cl_timer retry;
  int retries;
} jail_ext;

static int write_file(const char *path, const char *data) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  size_t n = strlen(data);
  ssize_t w = write(fd, data, n);
  int e = w == (ssize_t)n ? 0 : (w < 0 ? errno : EIO);
  close(fd);
  return e;
}

static int read_file(const char *path, char *buf, size_t len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, len - 1);
  close(fd);
  if (n < 0) return -1;
  buf[n] = 0;
  return (int)n;
}

/* "key value" lines (memory.events, memory.oom_control, pids.events, cpu.stat). */
static long long read_key(const char *dir, const char *file, const char *key) {
  char path[MAX_PATH_LEN + 64], buf[4096];
  snprintf(path, sizeof path, "%s/%s", dir, file);
  if (read_file(path, buf, sizeof buf) < 0) return -1;
  size_t kl = strlen(key);
  for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
    if (strncmp(line, key, kl) == 0 && line[kl] == ' ') return strtoll(line + kl + 1, NULL, 10);
  return -1;
}

static long long read_num(const char *dir, const char *file) {
  char path[MAX_PATH_LEN + 64], buf[64];
  snprintf(path, sizeof path, "%s/%s", dir, file);
  if (read_file(path, buf, sizeof buf) < 0) return -1;
  return strtoll(buf, NULL, 10);
}

/* The mount point of the v1 hierarchy that has controller ctrl, or of cgroup2 (ctrl NULL). */
static int find_mount(const char *ctrl, char *out, size_t outlen) {
  FILE *f = fopen("/proc/self/mountinfo", "re");
  if (!f) return 0;
  char line[4096];
  int found = 0;
  while (!found && fgets(line, sizeof line, f)) {
    /* id parent maj:min root mountpoint opts ... - fstype source superopts */
    char *sep = strstr(line, " - ");
    if (!sep) continue;
    char mp[256], fstype[64], src[256], sopts[1024];
    if (sscanf(line, "%*s %*s %*s %*s %255s", mp) != 1) continue;
    if (sscanf(sep + 3, "%63s %255s %1023s", fstype, src, sopts) < 2) continue;
    if (ctrl == NULL) {
      if (strcmp(fstype, "cgroup2") == 0) found = 1;
    } else if (strcmp(fstype, "cgroup") == 0) {
      for (char *tok = strtok(sopts, ","); tok; tok = strtok(NULL, ","))
        if (strcmp(tok, ctrl) == 0) found = 1;
    }
    if (found) snprintf(out, outlen, "%s", mp);
  }
  fclose(f);
  return found;
}

/* Our own cgroup in the v1 hierarchy of ctrl, or in v2 (ctrl NULL), from /proc/self/cgroup. */
static int self_cgroup(const char *ctrl, char *out, size_t outlen) {
  FILE *f = fopen("/proc/self/cgroup", "re");
  if (!f) return 0;
  char line[4096];
  int found = 0;
  while (!found && fgets(line, sizeof line, f)) {
    line[strcspn(line, "\n")] = 0;
    char *c1 = strchr(line, ':');
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2) continue;
    *c1 = 0;
    *c2 = 0;
    const char *ctrls = c1 + 1;
    if (ctrl == NULL) {
      if (strcmp(line, "0") == 0 && *ctrls == 0) found = 1;
    } else {
      char tmp[256];
      snprintf(tmp, sizeof tmp, "%s", ctrls);
      for (char *tok = strtok(tmp, ","); tok; tok = strtok(NULL, ","))
        if (strcmp(tok, ctrl) == 0) found = 1;
    }
    if (found) snprintf(out, outlen, "%s", strcmp(c2 + 1, "/") == 0 ? "" : c2 + 1);
  }
  fclose(f);
  return found;
}

/* Controllers cgroup v2 offers where we would create our cgroup. */
static int v2_has(const char *parent, const char *ctrl) {
  char path[MAX_PATH_LEN + 32], buf[1024];
  snprintf(path, sizeof path, "%s/cgroup.controllers", parent);
  if (read_file(path, buf, sizeof buf) < 0) return 0;
  for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n"))
    if (strcmp(tok, ctrl) == 0) return 1;
  return 0;
}

/* Kills every process left in the jail's cgroups (no pid namespace: they may outlive it). */
static void cg_kill_all(jail_ext *x) {
  for (int i = 0; i < x->ndirs; i++) {
    cgdir *d = &x->dirs[i];
    if (!d->created) continue;
    char path[MAX_PATH_LEN + 32];
    if (d->v2) {
      snprintf(path, sizeof path, "%s/cgroup.kill", d->path);
      if (write_file(path, "1") == 0) continue;
    }
    snprintf(path, sizeof path, "%s/cgroup.procs", d->path);
    char buf[8192];
    if (read_file(path, buf, sizeof buf) <= 0) continue;
    for (char *p = buf, *end; *p; p = end) {
      long pid = strtol(p, &end, 10);
      if (end == p) break;
      if (pid > 0) kill((pid_t)pid, SIGKILL);
      while (*end == '\n') end++;
    }
  }
}

/* Removes the cgroup directories; returns the number still present (busy). */
static int cg_remove(jail_ext *x) {
  int left = 0;
  for (int i = 0; i < x->ndirs; i++) {
    cgdir *d = &x->dirs[i];
    if (!d->created) continue;
    if (rmdir(d->path) == 0 || errno == ENOENT)
      d->created = 0;
    else
      left++;
  }
  return left;
}

static void cg_collect(jail_ext *x) {
  if (x->collected) return;
  x->collected = 1;
  x->oom_kills = x->mem_peak = x->pids_peak = x->pids_denied = x->cpu_usec = -1;
  for (int i = 0; i < x->ndirs; i++) {
    cgdir *d = &x->dirs[i];
    if (!d->created) continue;
    if (d->ctrls & (1u << CG_MEMORY)) {
      if (d->v2) {
        x->oom_kills = read_key(d->path, "memory.events", "oom_kill");
        x->mem_peak = read_num(d->path, "memory.peak");
      } else {
        x->oom_kills = read_key(d->path, "memory.oom_control", "oom_kill");
        x->mem_peak = read_num(d->path, "memory.max_usage_in_bytes");
      }
    }
    if (d->ctrls & (1u << CG_PIDS)) {
      x->pids_peak = read_num(d->path, "pids.peak");
      x->pids_denied = read_key(d->path, "pids.events", "max");
    }
    if (d->v2) x->cpu_usec = read_key(d->path, "cpu.stat", "usage_usec");
  }
}

static void ext_kill(cl_proc_ext *e) {
  cg_kill_all((jail_ext *)e);
}

static void on_retry(cl_timer *t) {
  jail_ext *x = (jail_ext *)((char *)t - offsetof(jail_ext, retry));
  cg_kill_all(x);
  if (cg_remove(x) && ++x->retries < 200)
    cl_timer_start(x->loop, &x->retry, cl_deadline(0.05), on_retry);
}

static void ext_reaped(cl_proc_ext *e, lua_State *L, pid_t pid) {
  jail_ext *x = (jail_ext *)e;
  cg_collect(x);
  cg_kill_all(x);              /* what the child left behind outside a pid namespace */
  if (cg_remove(x) && x->loop) /* stragglers still exiting: retry from the loop */
    cl_timer_start(x->loop, &x->retry, cl_deadline(0.02), on_retry);
  if (L && pid) {
    int top = lua_gettop(L);
    lua_createtable(L, 0, 3);
    if (x->oom_kills >= 0) {
      lua_pushboolean(L, x->oom_kills > 0);
      lua_setfield(L, -2, "oom_killed");
    }
    if (x->mem_peak >= 0) {
      lua_pushinteger(L, x->mem_peak);
      lua_setfield(L, -2, "memory_peak");
    }
    cl_audit_emit(L, "jail.exit", x->id, pid, lua_gettop(L));
    cl_audit_forget_pid(L, pid);
    lua_settop(L, top);
  }
}

static void ext_status(cl_proc_ext *e, lua_State *L) {
  jail_ext *x = (jail_ext *)e;
  lua_pushstring(L, x->id);
  lua_setfield(L, -2, "jail");
  if (!x->collected || x->ndirs == 0) return;
  lua_pushboolean(L, x->oom_kills > 0);
  lua_setfield(L, -2, "oom_killed");
  lua_createtable(L, 0, 5);
  if (x->oom_kills >= 0) lua_pushinteger(L, x->oom_kills), lua_setfield(L, -2, "oom_kills");
  if (x->mem_peak >= 0) lua_pushinteger(L, x->mem_peak), lua_setfield(L, -2, "memory_peak");
  if (x->pids_peak >= 0) lua_pushinteger(L, x->pids_peak), lua_setfield(L, -2, "pids_peak");
  if (x->pids_denied >= 0) lua_pushinteger(L, x->pids_denied), lua_setfield(L, -2, "pids_denied");
  if (x->cpu_usec >= 0) lua_pushinteger(L, x->cpu_usec), lua_setfield(L, -2, "cpu_usec");
  lua_setfield(L, -2, "cgroup");
}

static void ext_destroy(cl_proc_ext *e) {
  jail_ext *x = (jail_ext *)e;
  cl_timer_stop(&x->retry);
  /* Last chance (the loop is closing, or the handle went away): kill and wait briefly. */
  for (int i = 0; i < 100; i++) {
    cg_kill_all(x);
    if (!cg_remove(x)) break;
    usleep(10000);
  }
  free(x);
}

/* Creates the cgroups in the parent. Limits: memory bytes (0: none), pids (0: none), cpu
 * fraction of one CPU (0: none). version: 0 auto, 1, 2. */
static int cg_create(jail_ext *x, int version, long long memory, long long pids, double cpu,
                     char *err, size_t errlen) {
  static unsigned counter;
  int want[CG_NCTRL] = {memory > 0, pids > 0, cpu > 0};
  char v2mnt[256] = "", v2self[400] = "", v2parent[700] = "";
  int v2ok = 0;
  if (version != 1 && find_mount(NULL, v2mnt, sizeof v2mnt) &&
      self_cgroup(NULL, v2self, sizeof v2self)) {
    snprintf(v2parent, sizeof v2parent, "%s%s", v2mnt, v2self);
    v2ok = 1;
    for (int c = 0; c < CG_NCTRL; c++)
      if (want[c] && !v2_has(v2parent, cg_names[c])) v2ok = 0;
  }
  if (version == 2 && !v2ok) {
    if (!v2mnt[0]) {
      snprintf(err, errlen, "cgroup v2: no cgroup2 hierarchy is mounted");
      return ENOENT;
    }
    for (int c = 0; c < CG_NCTRL; c++)
      if (want[c] && !v2_has(v2parent, cg_names[c])) {
        char avail[256] = "";
        char path[MAX_PATH_LEN + 32];
        snprintf(path, sizeof path, "%s/cgroup.controllers", v2parent);
        read_file(path, avail, sizeof avail);
        avail[strcspn(avail, "\n")] = 0;
        snprintf(err, errlen, "cgroup v2 at %s has no '%s' controller (available: %s)", v2parent,
                 cg_names[c], avail[0] ? avail : "none");
        return EOPNOTSUPP;
      }
  }
  char name[64];
  snprintf(name, sizeof name, "clawlua-%d-%u", (int)getpid(), ++counter);
  if (v2ok && (version == 2 || version == 0)) {
    /* Controllers must be enabled in the parent's subtree for the child to have them. */
    char path[MAX_PATH_LEN + 64], line[64];
    for (int c = 0; c < CG_NCTRL; c++) {
      if (!want[c]) continue;
      snprintf(path, sizeof path, "%s/cgroup.subtree_control", v2parent);
      snprintf(line, sizeof line, "+%s", cg_names[c]);
      int e = write_file(path, line);
      if (e) {
        snprintf(err, errlen, "cgroup v2: enabling %s in %s: %s", cg_names[c], v2parent,
                 strerror(e));
        return e;
      }
    }
    cgdir *d = &x->dirs[x->ndirs++];
    snprintf(d->path, sizeof d->path, "%s/%s", v2parent, name);
    d->v2 = 1;
    if (mkdir(d->path, 0755) < 0) {
      snprintf(err, errlen, "cgroup v2: mkdir %s: %s", d->path, strerror(errno));
      return errno;
    }
    d->created = 1;
    char val[64];
    int e = 0;
    if (memory > 0) {
      d->ctrls |= 1u << CG_MEMORY;
      snprintf(val, sizeof val, "%lld", memory);
      snprintf(path, sizeof path, "%s/memory.max", d->path);
      e = write_file(path, val);
      snprintf(path, sizeof path, "%s/memory.swap.max", d->path);
      if (!e && access(path, F_OK) == 0) e = write_file(path, "0");
    }
    if (!e && pids > 0) {
      d->ctrls |= 1u << CG_PIDS;
      snprintf(val, sizeof val, "%lld", pids);
      snprintf(path, sizeof path, "%s/pids.max", d->path);
      e = write_file(path, val);
    }
    if (!e && cpu > 0) {
      d->ctrls |= 1u << CG_CPU;
      snprintf(val, sizeof val, "%lld 100000", (long long)(cpu * 100000));
      snprintf(path, sizeof path, "%s/cpu.max", d->path);
      e = write_file(path, val);
    }
    if (e) {
      snprintf(err, errlen, "cgroup v2: setting limits in %s: %s", d->path, strerror(e));
      return e;
    }
    return 0;
  }
  if (version == 2) {
    snprintf(err, errlen, "cgroup v2 is not usable here");
    return EOPNOTSUPP;
  }
  /* v1: one directory per controller hierarchy. */
  for (int c = 0; c < CG_NCTRL; c++) {
    if (!want[c]) continue;
    char mp[256], self[512];
    if (!find_mount(cg_names[c], mp, sizeof mp) || !self_cgroup(cg_names[c], self, sizeof self)) {
      snprintf(err, errlen, "cgroup: no '%s' controller in cgroup v1 or v2", cg_names[c]);
      return EOPNOTSUPP;
    }
    cgdir *d = &x->dirs[x->ndirs++];
    snprintf(d->path, sizeof d->path, "%s%s/%s", mp, self, name);
    d->ctrls = 1u << c;
    if (mkdir(d->path, 0755) < 0) {
      snprintf(err, errlen, "cgroup v1: mkdir %s: %s", d->path, strerror(errno));
      return errno;
    }
    d->created = 1;
    char path[MAX_PATH_LEN + 64], val[64];
    int e = 0;
    if (c == CG_MEMORY) {
      snprintf(val, sizeof val, "%lld", memory);
      snprintf(path, sizeof path, "%s/memory.limit_in_bytes", d->path);
      e = write_file(path, val);
      snprintf(path, sizeof path, "%s/memory.memsw.limit_in_bytes", d->path);
      if (!e && access(path, F_OK) == 0) e = write_file(path, val);
    } else if (c == CG_PIDS) {
      snprintf(val, sizeof val, "%lld", pids);
      snprintf(path, sizeof path, "%s/pids.max", d->path);
      e = write_file(path, val);
    } else {
      snprintf(path, sizeof path, "%s/cpu.cfs_period_us", d->path);
      e = write_file(path, "100000");
      snprintf(val, sizeof val, "%lld", (long long)(cpu * 100000));
      snprintf(path, sizeof path, "%s/cpu.cfs_quota_us", d->path);
      if (!e) e = write_file(path, val);
    }
    if (e) {
      snprintf(err, errlen, "cgroup v1: setting %s limit in %s: %s", cg_names[c], d->path,
               strerror(e));
      return e;
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Parent set-up: ids maps, cgroup attach (before the child continues)                        */

typedef struct spawn_ctx {
  jail_cfg *cfg;
  jail_ext *ext;
  char id[64];
} spawn_ctx;

static int parent_setup(void *arg, pid_t pid, char *err, size_t errlen) {
  spawn_ctx *sc = arg;
  char path[128], val[32];
  snprintf(val, sizeof val, "%d", (int)pid);
  for (int i = 0; sc->ext && i < sc->ext->ndirs; i++) {
    cgdir *d = &sc->ext->dirs[i];
    char p2[MAX_PATH_LEN + 32];
    snprintf(p2, sizeof p2, "%s/cgroup.procs", d->path);
    int e = write_file(p2, val);
    if (e) {
      snprintf(err, errlen, "cgroup: attaching to %s: %s", d->path, strerror(e));
      return e;
    }
  }
  if (sc->cfg->userns) {
    snprintf(path, sizeof path, "/proc/%d/setgroups", (int)pid);
    write_file(path, sc->cfg->ngroups ? "allow" : "deny");
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
    int e = write_file(path, sc->cfg->uid_map);
    if (!e) {
      snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
      e = write_file(path, sc->cfg->gid_map);
    }
    if (e) {
      snprintf(err, errlen, "user namespace: writing id maps: %s", strerror(e));
      return e;
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Child set-up (async-signal-safe)                                                           */

/* mkdir -p of the directories above and at path (in the child's tmpfs). */
static int mkdirs(char *path, int last) {
  size_t n = strlen(path);
  for (size_t i = 1; i <= n; i++) {
    if (path[i] != '/' && path[i] != 0) continue;
    if (path[i] == 0 && !last) break;
    char c = path[i];
    path[i] = 0;
    int r = mkdir(path, 0755);
    int e = errno;
    path[i] = c;
    if (r < 0 && e != EEXIST) return e;
  }
  return 0;
}

/* Makes a mount (and with recursive, those under it) read-only, leaving its other flags. */
static int make_readonly(const char *dst, int recursive) {
  struct mount_attr attr;
  memset(&attr, 0, sizeof attr);
  attr.attr_set = MOUNT_ATTR_RDONLY;
  if (syscall(SYS_mount_setattr, AT_FDCWD, dst, recursive ? AT_RECURSIVE : 0, &attr, sizeof attr) ==
      0)
    return 0;
  /* Kernels before 5.12: remount the top mount read-only. */
  if (mount(NULL, dst, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) == 0)
    return 0;
  return errno;
}

static int do_mount(mnt *m, const char **stage) {
  struct stat st;
  switch (m->kind) {
  case M_BIND: {
    *stage = m->dst + 8;
    if (stat(m->src, &st) < 0) {
      if (m->optional) return 0;
      *stage = m->src + 8;
      return errno;
    }
    int isdir = S_ISDIR(st.st_mode);
    int e = mkdirs(m->dst, isdir);
    if (e) return e;
    if (!isdir) {
      int fd = open(m->dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0 && errno != EEXIST && errno != EISDIR) return errno;
      if (fd >= 0) close(fd);
    }
    unsigned long fl = MS_BIND | MS_REC;
    if (mount(m->src, m->dst, NULL, fl, NULL) < 0) return errno;
    if (!m->dev || !m->rw) {
      unsigned long rf = MS_REMOUNT | MS_BIND | MS_NOSUID;
      if (!m->dev) rf |= MS_NODEV;
      if (!m->rw) rf |= MS_RDONLY;
      if (mount(NULL, m->dst, NULL, rf, NULL) < 0 && !m->rw) {
        int re = make_readonly(m->dst, 1);
        if (re) return re;
      }
      if (!m->rw) {
        int re = make_readonly(m->dst, 1); /* submounts too */
        if (re) return re;
      }
    }
    return 0;
  }
  case M_TMPFS:
  case M_PROC:
  case M_DIR: {
    *stage = m->dst + 8;
    int e = mkdirs(m->dst, 1);
    if (e) return e;
    if (m->kind == M_DIR) return 0;
    if (m->kind == M_PROC) {
      if (mount("proc", m->dst, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) return errno;
      return 0;
    }
    if (mount("tmpfs", m->dst, "tmpfs", MS_NOSUID | MS_NODEV, m->opts) < 0) return errno;
    return 0;
  }
  case M_DEV: {
    *stage = m->dst + 8;
    int fd = open(m->dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return errno;
    close(fd);
    if (mount(m->src, m->dst, NULL, MS_BIND, NULL) < 0) return errno;
    return 0;
  }
  case M_SYMLINK: {
    *stage = m->dst + 8;
    char *slash = strrchr(m->dst, '/');
    if (slash && slash != m->dst) {
      *slash = 0;
      int e = mkdirs(m->dst, 1);
      *slash = '/';
      if (e) return e;
    }
    if (symlink(m->src, m->dst) < 0 && errno != EEXIST) return errno;
    return 0;
  }
  }
  return EINVAL;
}

static int set_caps(const jail_cfg *c) {
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  memset(data, 0, sizeof data);
  for (int i = 0; i < 2; i++) {
    uint32_t v = (uint32_t)(c->caps >> (32 * i));
    data[i].effective = data[i].permitted = data[i].inheritable = v;
  }
  if (syscall(SYS_capset, &hdr, data) < 0) return errno;
  return 0;
}

static int child_setup(void *arg, const char **stage) {
  jail_cfg *c = arg;
  if (c->userns && c->root_mapped) {
    /* Become the namespace's root (a mapped host id): files the child creates from here on
     * (its tmpfs roots) need an owner the namespace can represent. */
    *stage = "setresuid(0) in the user namespace";
    if (setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0) return errno;
  }
  if (c->utsns && c->hostname[0]) {
    *stage = "sethostname";
    if (sethostname(c->hostname, strlen(c->hostname)) < 0) return errno;
  }
  if (c->netns_new) { /* loopback up, as on any host */
    *stage = "loopback up";
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s >= 0) {
      struct ifreq ifr;
      memset(&ifr, 0, sizeof ifr);
      strcpy(ifr.ifr_name, "lo");
      if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP;
        ioctl(s, SIOCSIFFLAGS, &ifr);
      }
      close(s);
    }
  }
  if (c->cgroupns) { /* after the parent moved us: the namespace is rooted at our cgroup */
    *stage = "unshare(cgroup)";
    if (unshare(CLONE_NEWCGROUP) < 0) return errno;
  }
  if (c->mountns) {
    *stage = "mount propagation";
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) return errno;
    *stage = "tmpfs " BASE;
    if (mount("tmpfs", BASE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") < 0) return errno;
    if (chdir(BASE) < 0) return errno;
    if (mkdir("newroot", 0755) < 0 || mkdir("oldroot", 0755) < 0) return errno;
    *stage = "pivot_root (set-up)";
    if (syscall(SYS_pivot_root, ".", "oldroot") < 0) return errno;
    if (chdir("/") < 0) return errno;
    if (c->have_root) {
      *stage = "root";
      if (mount(c->root_src, "/newroot", NULL, MS_BIND | MS_REC, NULL) < 0) return errno;
    } else {
      *stage = "root tmpfs";
      if (mount("tmpfs", "/newroot", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0) return errno;
    }
    for (int i = 0; i < c->nmounts; i++) {
      int e = do_mount(&c->mounts[i], stage);
      if (e) return e;
    }
    if (!c->root_rw) { /* last, so the mount points above could still be made */
      *stage = "root read-only";
      int e = make_readonly("/newroot", 0);
      if (e) return e;
    }
    *stage = "pivot_root";
    if (chdir("/newroot") < 0) return errno;
    if (syscall(SYS_pivot_root, ".", ".") < 0) return errno;
    if (umount2(".", MNT_DETACH) < 0) return errno;
    if (chdir("/") < 0) return errno;
  }
  *stage = "setrlimit";
  for (int i = 0; i < c->nrlimits; i++)
    if (setrlimit(c->rlimits[i].res, &c->rlimits[i].lim) < 0) return errno;
  *stage = "capability bounding set";
  for (int cap = 0; cap <= c->cap_last; cap++)
    if (!(c->caps & (1ull << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
      return errno;
  if (c->set_ids) {
    *stage = "keepcaps";
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0) return errno;
    *stage = "setgroups";
    if (setgroups((size_t)c->ngroups, c->groups) < 0 && !(c->ngroups == 0 && errno == EPERM))
      return errno;
    *stage = "setresgid";
    if (setresgid(c->gid, c->gid, c->gid) < 0) return errno;
    *stage = "setresuid";
    if (setresuid(c->uid, c->uid, c->uid) < 0) return errno;
  }
  *stage = "capset";
  int e = set_caps(c);
  if (e) return e;
  *stage = "ambient capabilities";
  prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  if (c->set_ids && c->uid != 0)
    for (int cap = 0; cap <= c->cap_last; cap++)
      if ((c->caps & (1ull << cap)) && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) < 0)
        return errno;
  if (c->no_new_privs) {
    *stage = "no_new_privs";
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return errno;
  }
  return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Options                                                                                    */

static const char *const jail_fields[] = {
    "root",         "root_readonly", "binds",  "tmpfs",  "symlinks", "devices", "proc",
    "namespaces",   "uid",           "gid",    "groups", "uid_map",  "gid_map", "caps",
    "no_new_privs", "rlimits",       "cgroup", "net",    "hostname", "id",      NULL,
};

static const char *const default_devices[] = {"null",    "zero", "full", "random",
                                              "urandom", "tty",  NULL};

/* Normalises an absolute path in place: collapses "//" and "/./", rejects "..". */
static int clean_path(const char *in, char *out, size_t outlen) {
  if (in[0] != '/') return 0;
  size_t o = 0;
  for (const char *p = in; *p;) {
    while (*p == '/') p++;
    if (!*p) break;
    const char *e = strchr(p, '/');
    size_t n = e ? (size_t)(e - p) : strlen(p);
    if (n == 1 && p[0] == '.') {
      p += n;
      continue;
    }
    if (n == 2 && p[0] == '.' && p[1] == '.') return 0;
    if (o + n + 2 > outlen) return 0;
    out[o++] = '/';
    memcpy(out + o, p, n);
    o += n;
    p += n;
  }
  if (o == 0) out[o++] = '/';
  out[o] = 0;
  return 1;
}

static mnt *add_mount(lua_State *L, jail_cfg *c, const char *field) {
  if (c->nmounts >= MAX_MOUNTS)
    cl_field_error(L, field, lua_pushfstring(L, "more than %d mounts", MAX_MOUNTS));
  mnt *m = &c->mounts[c->nmounts++];
  memset(m, 0, sizeof *m);
  return m;
}

/* Sets m->dst = "/newroot" + path; checks it against earlier mounts. */
static void set_dst(lua_State *L, jail_cfg *c, mnt *m, const char *path, const char *field) {
  char clean[MAX_PATH_LEN - 16];
  if (!path || !clean_path(path, clean, sizeof clean))
    cl_field_error(
        L, field,
        lua_pushfstring(L, "absolute path without '..' expected, got '%s'", path ? path : "nil"));
  if (strcmp(clean, "/") == 0) cl_field_error(L, field, "cannot mount over / (use root=)");
  snprintf(m->dst, sizeof m->dst, "/newroot%s", clean);
  size_t dl = strlen(m->dst);
  for (mnt *o = c->mounts; o < m; o++) {
    size_t ol = strlen(o->dst);
    /* Same place twice, or a mount over a parent of an earlier one (which it would hide). */
    if (strcmp(o->dst, m->dst) == 0 ||
        (ol > dl && strncmp(o->dst, m->dst, dl) == 0 && o->dst[dl] == '/'))
      cl_field_error(
          L, field,
          lua_pushfstring(L, "'%s' overlaps an earlier mount at '%s'", clean, o->dst + 8));
  }
}

static void parse_binds(lua_State *L, int opts, jail_cfg *c) {
  if (lua_getfield(L, opts, "binds") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1)) cl_field_error(L, "binds", "list expected");
  int t = lua_gettop(L);
  lua_Integer n = (lua_Integer)lua_rawlen(L, t);
  for (lua_Integer i = 1; i <= n; i++) {
    const char *field = lua_pushfstring(L, "binds[%I]", i);
    int b = lua_gettop(L) + 1;
    lua_rawgeti(L, t, i);
    const char *src, *dst;
    mnt *m = add_mount(L, c, field);
    m->kind = M_BIND;
    if (lua_type(L, b) == LUA_TSTRING) {
      src = dst = lua_tostring(L, b);
    } else if (lua_istable(L, b)) {
      static const char *const bf[] = {"src", "dst", "rw", "dev", "optional", NULL};
      cl_check_fields(L, b, bf);
      lua_getfield(L, b, "src");
      lua_getfield(L, b, "dst");
      src = lua_tostring(L, -2);
      dst = lua_isnil(L, -1) ? src : lua_tostring(L, -1);
      m->rw = cl_opt_boolean(L, b, "rw", 0);
      m->dev = cl_opt_boolean(L, b, "dev", 0);
      m->optional = cl_opt_boolean(L, b, "optional", 0);
    } else {
      cl_field_error(L, field, "path or {src=, dst=, rw=} expected");
    }
    char clean[MAX_PATH_LEN - 16];
    if (!src || !clean_path(src, clean, sizeof clean))
      cl_field_error(
          L, field,
          lua_pushfstring(L, "absolute source path expected, got '%s'", src ? src : "nil"));
    snprintf(m->src, sizeof m->src, "/oldroot%s", strcmp(clean, "/") ? clean : "");
    set_dst(L, c, m, dst, field);
    lua_settop(L, t);
  }
  lua_pop(L, 1);
}

static void parse_tmpfs(lua_State *L, int opts, jail_cfg *c) {
  if (lua_getfield(L, opts, "tmpfs") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1)) cl_field_error(L, "tmpfs", "list expected");
  int t = lua_gettop(L);
  lua_Integer n = (lua_Integer)lua_rawlen(L, t);
  for (lua_Integer i = 1; i <= n; i++) {
    const char *field = lua_pushfstring(L, "tmpfs[%I]", i);
    int b = lua_gettop(L) + 1;
    lua_rawgeti(L, t, i);
    mnt *m = add_mount(L, c, field);
    m->kind = M_TMPFS;
    const char *path;
    lua_Integer size = 0;
    if (lua_type(L, b) == LUA_TSTRING) {
      path = lua_tostring(L, b);
    } else if (lua_istable(L, b)) {
      static const char *const tf[] = {"path", "size", NULL};
      cl_check_fields(L, b, tf);
      lua_getfield(L, b, "path");
      path = lua_tostring(L, -1);
      size = cl_opt_integer(L, b, "size", 0);
      if (size < 0) cl_field_error(L, field, "size must be >= 0");
    } else {
      cl_field_error(L, field, "path or {path=, size=} expected");
    }
    if (size > 0)
      snprintf(m->opts, sizeof m->opts, "mode=1777,size=%lld", (long long)size);
    else
      snprintf(m->opts, sizeof m->opts, "mode=1777");
    set_dst(L, c, m, path, field);
    lua_settop(L, t);
  }
  lua_pop(L, 1);
}

static void parse_symlinks(lua_State *L, int opts, jail_cfg *c) {
  if (lua_getfield(L, opts, "symlinks") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1)) cl_field_error(L, "symlinks", "table {[path] = target} expected");
  int t = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      cl_field_error(L, "symlinks", "string keys (paths) and values (targets) expected");
    const char *path = lua_tostring(L, -2), *target = lua_tostring(L, -1);
    const char *field = lua_pushfstring(L, "symlinks[%s]", path);
    mnt *m = add_mount(L, c, field);
    m->kind = M_SYMLINK;
    if (strlen(target) >= sizeof m->src) cl_field_error(L, field, "target too long");
    snprintf(m->src, sizeof m->src, "%s", target);
    set_dst(L, c, m, path, field);
    lua_pop(L, 2);
  }
  lua_pop(L, 1);
}

static void add_devices(lua_State *L, int opts, jail_cfg *c) {
  int t = 0;
  int ty = lua_getfield(L, opts, "devices");
  if (ty == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  if (ty != LUA_TNIL) {
    if (!lua_istable(L, -1)) cl_field_error(L, "devices", "list of device names expected");
    t = lua_gettop(L);
  }
  mnt *m = add_mount(L, c, "devices");
  m->kind = M_TMPFS;
  snprintf(m->opts, sizeof m->opts, "mode=0755,size=64k");
  set_dst(L, c, m, "/dev", "devices");
  lua_Integer n =
      t ? (lua_Integer)lua_rawlen(L, t) : (lua_Integer)CL_ARRAY_LEN(default_devices) - 1;
  if (n > MAX_DEVICES) cl_field_error(L, "devices", "too many devices");
  for (lua_Integer i = 1; i <= n; i++) {
    const char *name;
    if (t) {
      lua_rawgeti(L, t, i);
      name = lua_tostring(L, -1);
      lua_pop(L, 1); /* anchored in the option table */
    } else {
      name = default_devices[i - 1];
    }
    const char *field = lua_pushfstring(L, "devices[%I]", i);
    char host[300], clean[256];
    if (!name || !clean_path(lua_pushfstring(L, "/%s", name), clean, sizeof clean))
      cl_field_error(L, field, "device name under /dev expected (\"null\", \"net/tun\", ...)");
    snprintf(host, sizeof host, "/dev%s", clean);
    struct stat st;
    if (stat(host, &st) < 0 || !(S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)))
      cl_field_error(L, field, lua_pushfstring(L, "%s is not a device on this host", host));
    if (strchr(clean + 1, '/')) { /* a directory under /dev (net/tun) */
      mnt *d = add_mount(L, c, field);
      d->kind = M_DIR;
      char dir[300];
      snprintf(dir, sizeof dir, "/dev%s", clean);
      *strrchr(dir, '/') = 0;
      snprintf(d->dst, sizeof d->dst, "/newroot%s", dir);
    }
    mnt *dv = add_mount(L, c, field);
    dv->kind = M_DEV;
    snprintf(dv->src, sizeof dv->src, "/oldroot%s", host);
    snprintf(dv->dst, sizeof dv->dst, "/newroot%s", host);
    lua_pop(L, 2);
  }
  static const struct {
    const char *path, *target;
  } links[] = {{"/dev/fd", "/proc/self/fd"},
               {"/dev/stdin", "/proc/self/fd/0"},
               {"/dev/stdout", "/proc/self/fd/1"},
               {"/dev/stderr", "/proc/self/fd/2"}};
  for (size_t i = 0; i < CL_ARRAY_LEN(links); i++) {
    mnt *l = add_mount(L, c, "devices");
    l->kind = M_SYMLINK;
    snprintf(l->src, sizeof l->src, "%s", links[i].target);
    snprintf(l->dst, sizeof l->dst, "/newroot%s", links[i].path);
  }
  mnt *shm = add_mount(L, c, "devices");
  shm->kind = M_TMPFS;
  snprintf(shm->opts, sizeof shm->opts, "mode=1777,size=16m");
  snprintf(shm->dst, sizeof shm->dst, "/newroot/dev/shm");
  lua_pop(L, 1); /* the devices field */
}

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
  if (read_file("/proc/sys/user/max_user_namespaces", buf, sizeof buf) <= 0) return 0;
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
    cl_check_fields_at(L, -1, "namespaces", nf);
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

/* root = a host directory (checked now: a clear error rather than a failure in the child). */
static int parse_root(lua_State *L, int opts, jail_cfg *c, char *err, size_t errlen) {
  if (!c->mountns) {
    static const char *const need[] = {"root", "binds", "tmpfs", "symlinks", NULL};
    for (const char *const *f = need; *f; f++)
      if (lua_getfield(L, opts, *f) != LUA_TNIL)
        cl_field_error(L, *f, "needs the mount namespace (namespaces.mount = false)");
      else
        lua_pop(L, 1);
  }
  const char *root = cl_opt_string(L, opts, "root", NULL);
  c->root_rw = !cl_opt_boolean(L, opts, "root_readonly", 1);
  if (!root) return 0;
  char clean[MAX_PATH_LEN - 16];
  if (!clean_path(root, clean, sizeof clean))
    cl_field_error(L, "root", "absolute path without '..' expected");
  struct stat st;
  if (stat(clean, &st) < 0) {
    snprintf(err, errlen, "root %s: %s", clean, strerror(errno));
    return errno;
  }
  if (!S_ISDIR(st.st_mode)) {
    snprintf(err, errlen, "root %s: not a directory", clean);
    return ENOTDIR;
  }
  c->have_root = 1;
  snprintf(c->root_src, sizeof c->root_src, "/oldroot%s", strcmp(clean, "/") ? clean : "");
  return 0;
}

/* Every mount's source and target must exist now, for the same reason. */
static int check_mounts(jail_cfg *c, char *err, size_t errlen) {
  for (int i = 0; i < c->nmounts; i++) {
    mnt *m = &c->mounts[i];
    struct stat st;
    char inroot[2 * MAX_PATH_LEN];
    snprintf(inroot, sizeof inroot, "%s%s", c->root_src + 8, m->dst + 8);
    if (c->have_root && (m->kind == M_TMPFS || m->kind == M_PROC) &&
        strncmp(m->dst, "/newroot/dev/", 13) != 0 &&
        (stat(inroot, &st) < 0 || !S_ISDIR(st.st_mode))) {
      snprintf(err, errlen, "root %s has no directory %s to mount on", c->root_src + 8, m->dst + 8);
      return ENOENT;
    }
    if (m->kind != M_BIND || m->optional) continue;
    if (stat(m->src + 8, &st) < 0) {
      snprintf(err, errlen, "bind source %s: %s", m->src + 8, strerror(errno));
      return errno;
    }
    /* Nothing is created in a host directory: the target must exist. */
    if (c->have_root && stat(inroot, &st) < 0) {
      snprintf(err, errlen, "bind target %s does not exist in root %s", m->dst + 8,
               c->root_src + 8);
      return ENOENT;
    }
  }
  return 0;
}

static int parse_mounts(lua_State *L, int opts, jail_cfg *c, char *err, size_t errlen) {
  if (!c->mountns) return 0;
  parse_binds(L, opts, c);
  parse_tmpfs(L, opts, c);
  add_devices(L, opts, c);
  if (cl_opt_boolean(L, opts, "proc", 1)) {
    mnt *m = add_mount(L, c, "proc");
    m->kind = M_PROC;
    set_dst(L, c, m, "/proc", "proc");
    if (c->userns && !c->pidns)
      cl_field_error(L, "proc",
                     "mounting /proc in a new user namespace needs a new pid "
                     "namespace too (or proc = false)");
  }
  int before = c->nmounts;
  parse_symlinks(L, opts, c);
  if (c->have_root && c->nmounts > before)
    cl_field_error(L, "symlinks", "not with root= (they would be made in the host directory)");
  return check_mounts(c, err, errlen);
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
  c->cap_last = read_file("/proc/sys/kernel/cap_last_cap", buf, sizeof buf) > 0
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
    cl_check_fields_at(L, -1, "cgroup", cf);
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
  int e = parse_root(L, opts, c, err, errlen);
  if (!e) e = parse_mounts(L, opts, c, err, errlen);
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
  x->ext.kill = ext_kill;
  x->ext.reaped = ext_reaped;
  x->ext.status = ext_status;
  x->ext.destroy = ext_destroy;
  x->loop = cl_loop_get(L);
  snprintf(x->id, sizeof x->id, "%s", sc->id);
  *extp = &x->ext;
  sc->ext = x;
  /* cgroups last: only now is the input known to be good. */
  if (cg.has && (e = cg_create(x, cg.version, cg.memory, cg.pids, cg.cpu, err, errlen))) {
    if (c->netfd >= 0) close(c->netfd), c->netfd = -1;
    return e;
  }
  unsigned long flags = 0;
  if (c->userns) flags |= CLONE_NEWUSER;
  if (c->pidns) flags |= CLONE_NEWPID;
  if (c->mountns) flags |= CLONE_NEWNS;
  if (c->netns_new) flags |= CLONE_NEWNET;
  if (c->ipcns) flags |= CLONE_NEWIPC;
  if (c->utsns) flags |= CLONE_NEWUTS;
  req->clone_flags = flags;
  req->child_setup = child_setup;
  req->child_arg = c;
  req->parent_setup = parent_setup;
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
  spawn_ctx *sc = lua_newuserdatauv(L, sizeof *sc, 0);
  memset(sc, 0, sizeof *sc);
  cl_spawn_hooks h;
  memset(&h, 0, sizeof h);
  h.fields = jail_fields;
  h.in_jail = 1;
  h.prepare = prepare;
  h.started = started;
  h.arg = sc;
  h.sandbox = sc->id;
  int n = cl_proc_spawn(L, opts, &h);
  /* A failed spawn may leave a joined-netns fd open in the config. */
  if (sc->cfg && sc->cfg->netfd >= 0) close(sc->cfg->netfd), sc->cfg->netfd = -1;
  lua_remove(L, lua_gettop(L) - n); /* the context, below the results */
  return n;
}

/* Lua: jail.cgroup_info() -> {v1 = {memory=path|nil, ...}, v2 = path|nil, v2_controllers=} */
static int l_cgroup_info(lua_State *L) {
  lua_createtable(L, 0, 3);
  lua_createtable(L, 0, CG_NCTRL);
  for (int c = 0; c < CG_NCTRL; c++) {
    char mp[512], self[512];
    if (find_mount(cg_names[c], mp, sizeof mp) && self_cgroup(cg_names[c], self, sizeof self)) {
      lua_pushfstring(L, "%s%s", mp, self);
      lua_setfield(L, -2, cg_names[c]);
    }
  }
  lua_setfield(L, -2, "v1");
  char mp[512], self[512];
  if (find_mount(NULL, mp, sizeof mp) && self_cgroup(NULL, self, sizeof self)) {
    lua_pushfstring(L, "%s%s", mp, self);
    lua_setfield(L, -2, "v2");
    char path[1200], buf[512];
    snprintf(path, sizeof path, "%s%s/cgroup.controllers", mp, self);
    if (read_file(path, buf, sizeof buf) >= 0) {
      buf[strcspn(buf, "\n")] = 0;
      lua_pushstring(L, buf);
      lua_setfield(L, -2, "v2_controllers");
    }
  }
  return 1;
}

static const luaL_Reg funcs[] = {
    {"spawn", l_spawn},
    {"cgroup_info", l_cgroup_info},
    {NULL, NULL},
};

int luaopen_clawlua_jail(lua_State *L) {
  if (cl_entry_redirect(L, "jail")) return 1;
  luaL_newlib(L, funcs);
  return 1;
}
