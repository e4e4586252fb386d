/*
 * The cgroups of a jail (v1 or v2): made before the child runs, the child attached from the
 * parent, read at reap (OOM kills, peaks, CPU time) and removed on every path (retried on the
 * loop while the kernel still counts tasks); jail.cgroup_info().
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

int cl_jail_write_file(const char *path, const char *data) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  size_t n = strlen(data);
  ssize_t w = write(fd, data, n);
  int e = w == (ssize_t)n ? 0 : (w < 0 ? errno : EIO);
  close(fd);
  return e;
}

int cl_jail_read_file(const char *path, char *buf, size_t len) {
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
  if (cl_jail_read_file(path, buf, sizeof buf) < 0) return -1;
  size_t kl = strlen(key);
  for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
    if (strncmp(line, key, kl) == 0 && line[kl] == ' ') return strtoll(line + kl + 1, NULL, 10);
  return -1;
}

static long long read_num(const char *dir, const char *file) {
  char path[MAX_PATH_LEN + 64], buf[64];
  snprintf(path, sizeof path, "%s/%s", dir, file);
  if (cl_jail_read_file(path, buf, sizeof buf) < 0) return -1;
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
  if (cl_jail_read_file(path, buf, sizeof buf) < 0) return 0;
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
      if (cl_jail_write_file(path, "1") == 0) continue;
    }
    snprintf(path, sizeof path, "%s/cgroup.procs", d->path);
    char buf[8192];
    if (cl_jail_read_file(path, buf, sizeof buf) <= 0) continue;
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

void cl_jail_ext_kill(cl_proc_ext *e) {
  cg_kill_all((jail_ext *)e);
}

static void on_retry(cl_timer *t) {
  jail_ext *x = (jail_ext *)((char *)t - offsetof(jail_ext, retry));
  cg_kill_all(x);
  if (cg_remove(x) && ++x->retries < 200)
    cl_timer_start(x->loop, &x->retry, cl_deadline(0.05), on_retry);
}

void cl_jail_ext_reaped(cl_proc_ext *e, lua_State *L, pid_t pid) {
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

void cl_jail_ext_status(cl_proc_ext *e, lua_State *L) {
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

void cl_jail_ext_destroy(cl_proc_ext *e) {
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

/* v2: one directory under the runtime's own cgroup, the controllers enabled in the parent's
 * subtree first. */
static int cg_create_v2(jail_ext *x, const char *v2parent, const char *name, const int want[],
                        long long memory, long long pids, double cpu, char *err, size_t errlen) {
  /* Controllers must be enabled in the parent's subtree for the child to have them. */
  char path[MAX_PATH_LEN + 64], line[64];
  for (int c = 0; c < CG_NCTRL; c++) {
    if (!want[c]) continue;
    snprintf(path, sizeof path, "%s/cgroup.subtree_control", v2parent);
    snprintf(line, sizeof line, "+%s", cg_names[c]);
    int e = cl_jail_write_file(path, line);
    if (e) {
      snprintf(err, errlen, "cgroup v2: enabling %s in %s: %s", cg_names[c], v2parent, strerror(e));
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
    e = cl_jail_write_file(path, val);
    snprintf(path, sizeof path, "%s/memory.swap.max", d->path);
    if (!e && access(path, F_OK) == 0) e = cl_jail_write_file(path, "0");
  }
  if (!e && pids > 0) {
    d->ctrls |= 1u << CG_PIDS;
    snprintf(val, sizeof val, "%lld", pids);
    snprintf(path, sizeof path, "%s/pids.max", d->path);
    e = cl_jail_write_file(path, val);
  }
  if (!e && cpu > 0) {
    d->ctrls |= 1u << CG_CPU;
    snprintf(val, sizeof val, "%lld 100000", (long long)(cpu * 100000));
    snprintf(path, sizeof path, "%s/cpu.max", d->path);
    e = cl_jail_write_file(path, val);
  }
  if (e) {
    snprintf(err, errlen, "cgroup v2: setting limits in %s: %s", d->path, strerror(e));
    return e;
  }
  return 0;
}

/* Whether any cgroup or cgroup2 filesystem is mounted in our mount namespace. */
static int any_cgroup_mount(void) {
  char mp[256];
  for (int c = 0; c < CG_NCTRL; c++)
    if (find_mount(cg_names[c], mp, sizeof mp)) return 1;
  return find_mount(NULL, mp, sizeof mp);
}

/* The mounts that give a process whose /proc/self/cgroup reads `text` its hierarchies where a
 * systemd host has them: cgroup v2 alone on /sys/fs/cgroup; else a tmpfs there, each v1
 * hierarchy on a directory named after its controllers (name=X: X), and cgroup2 (hybrid) on
 * /sys/fs/cgroup/unified. Returns the number of entries (at most max). */
int cl_jail_cg_mount_plan(const char *text, cl_cg_mount *out, int max) {
  int n = 0, v2 = 0, v1 = 0;
  char buf[4096];
  snprintf(buf, sizeof buf, "%s", text);
  /* tmpfs first (filled in below if any v1 hierarchy is named) */
  cl_cg_mount *m = &out[n++];
  snprintf(m->fstype, sizeof m->fstype, "tmpfs");
  snprintf(m->options, sizeof m->options, "mode=755");
  snprintf(m->target, sizeof m->target, "%s", CG_ROOT);
  char *save = NULL;
  for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    char *c1 = strchr(line, ':');
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2) continue;
    *c2 = 0;
    const char *ctrls = c1 + 1;
    if (*ctrls == 0) {
      v2 = strncmp(line, "0:", 2) == 0;
      continue;
    }
    if (n >= max) break;
    v1 = 1;
    m = &out[n++];
    snprintf(m->fstype, sizeof m->fstype, "cgroup");
    /* a named hierarchy without controllers ("name=systemd") mounts with "none" */
    snprintf(m->options, sizeof m->options, "%s%s", strncmp(ctrls, "name=", 5) == 0 ? "none," : "",
             ctrls);
    snprintf(m->target, sizeof m->target, CG_ROOT "/%s",
             strncmp(ctrls, "name=", 5) == 0 ? ctrls + 5 : ctrls);
  }
  if (v2 && !v1) { /* unified: cgroup2 itself on /sys/fs/cgroup, no tmpfs */
    snprintf(out[0].fstype, sizeof out[0].fstype, "cgroup2");
    out[0].options[0] = 0;
    return 1;
  }
  if (!v1) return 0;
  if (v2 && n < max) {
    m = &out[n++];
    snprintf(m->fstype, sizeof m->fstype, "cgroup2");
    m->options[0] = 0;
    snprintf(m->target, sizeof m->target, CG_ROOT "/unified");
  }
  return n;
}

/* The optional fields ("shared:N master:M") of the mount that holds path, from mountinfo. */
static void holder_tags(const char *path, char *tags, size_t len) {
  FILE *f = fopen("/proc/self/mountinfo", "re");
  tags[0] = 0;
  if (!f) return;
  char line[4096];
  size_t best = 0;
  while (fgets(line, sizeof line, f)) {
    char mp[256];
    int off = 0;
    if (sscanf(line, "%*s %*s %*s %*s %255s %*s%n", mp, &off) != 1 || off == 0) continue;
    size_t ml = strlen(mp);
    int holds =
        strcmp(mp, "/") == 0 || (strncmp(path, mp, ml) == 0 && (path[ml] == '/' || path[ml] == 0));
    if (!holds || ml < best) continue;
    best = ml;
    char *sep = strstr(line + off, " - ");
    const char *t = line + off + strspn(line + off, " ");
    size_t n = sep && sep > t ? (size_t)(sep - t) : 0;
    snprintf(tags, len, "%.*s", (int)n, t);
  }
  fclose(f);
}

/* The id of the topmost mount on "/" in a mountinfo file (-1: none, or unreadable). */
static long root_mount_id(const char *mountinfo, long want) {
  FILE *f = fopen(mountinfo, "re");
  if (!f) return -1;
  char line[4096];
  long id = -1;
  while (fgets(line, sizeof line, f)) {
    char *end, mp[8];
    long i = strtol(line, &end, 10);
    if (end == line || sscanf(end, "%*s %*s %*s %7s", mp) != 1) continue;
    if (want >= 0 ? i == want : strcmp(mp, "/") == 0) id = i;
  }
  fclose(f);
  return id;
}

/* Is this process in pid 1's mount namespace? 1 yes, 0 no, -1 cannot tell. The namespace
 * links when they can be read; else mount ids (unique to one namespace's copy of a mount):
 * does pid 1's mount table hold our root mount? (pid 1's links need ptrace access to it, which
 * root lacks in some containers; its mountinfo does not.) */
static int in_pid1_mount_ns(void) {
  struct stat sa, sb;
  if (stat("/proc/self/ns/mnt", &sa) == 0 && stat("/proc/1/ns/mnt", &sb) == 0)
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
  long ours = root_mount_id("/proc/self/mountinfo", -1);
  if (ours < 0) return -1;
  FILE *f = fopen("/proc/1/mountinfo", "re");
  if (!f) return -1;
  fclose(f);
  return root_mount_id("/proc/1/mountinfo", ours) == ours;
}

static int private_mounted;

/* No cgroup hierarchy here (`ip netns exec` unshares the mount namespace and remounts /sys for
 * the network namespace, without /sys/fs/cgroup): when this process has a mount namespace of its
 * own whose /sys propagates nothing to another namespace, mount the hierarchies of
 * /proc/self/cgroup on /sys/fs/cgroup there (they go with the namespace). Never in pid 1's
 * mount namespace. Returns 0 (mounted, or already there) or an errno with a message in err. */
static int cg_mount_private(char *err, size_t errlen) {
  if (any_cgroup_mount()) return 0;
  const char *how = "enter the namespace with `nsenter --net=/run/netns/NAME` instead, or set "
                    "cgroup = false";
  int same = in_pid1_mount_ns();
  if (same != 0) {
    snprintf(err, errlen,
             "cgroup: no cgroup hierarchy is mounted here, and this is %s mount namespace "
             "(clawlua mounts cgroups only in a mount namespace of its own): %s",
             same > 0 ? "the host's (pid 1's)" : "perhaps the host's (pid 1's cannot be read)",
             how);
    return EOPNOTSUPP;
  }
  char tags[256];
  holder_tags(CG_ROOT, tags, sizeof tags);
  if (strstr(tags, "shared:")) {
    snprintf(err, errlen,
             "cgroup: no cgroup hierarchy is mounted here, and the mount holding " CG_ROOT
             " is shared (%s): a mount there would propagate to another namespace, so clawlua "
             "does not make one: %s",
             tags, how);
    return EOPNOTSUPP;
  }
  char text[4096];
  if (cl_jail_read_file("/proc/self/cgroup", text, sizeof text) < 0) {
    snprintf(err, errlen, "cgroup: reading /proc/self/cgroup: %s", strerror(errno));
    return errno;
  }
  cl_cg_mount plan[CG_MAX_MOUNTS];
  int n = cl_jail_cg_mount_plan(text, plan, CG_MAX_MOUNTS);
  if (n == 0) {
    snprintf(err, errlen, "cgroup: /proc/self/cgroup names no hierarchy to mount");
    return ENOENT;
  }
  int root_mounted = 0;
  for (int i = 0; i < n; i++) {
    cl_cg_mount *m = &plan[i];
    int e = 0;
    if (i > 0 && mkdir(m->target, 0755) < 0 && errno != EEXIST) e = errno;
    if (!e && mount(m->fstype, m->target, m->fstype, MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    m->options[0] ? m->options : NULL) < 0)
      e = errno;
    root_mounted |= !e && i == 0;
    /* ours alone: nothing mounted under it goes anywhere else either */
    if (!e && i == 0 && mount(NULL, m->target, NULL, MS_PRIVATE, NULL) < 0) e = errno;
    if (e) {
      if (root_mounted) umount2(CG_ROOT, MNT_DETACH);
      snprintf(err, errlen, "cgroup: mounting %s (%s) on %s in this mount namespace: %s", m->fstype,
               m->options[0] ? m->options : "no options", m->target, strerror(e));
      return e;
    }
  }
  private_mounted = 1;
  return 0;
}

/* v1: one directory per controller hierarchy. */
static int cg_create_v1(jail_ext *x, const char *name, const int want[], long long memory,
                        long long pids, double cpu, char *err, size_t errlen) {
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
      e = cl_jail_write_file(path, val);
      snprintf(path, sizeof path, "%s/memory.memsw.limit_in_bytes", d->path);
      if (!e && access(path, F_OK) == 0) e = cl_jail_write_file(path, val);
    } else if (c == CG_PIDS) {
      snprintf(val, sizeof val, "%lld", pids);
      snprintf(path, sizeof path, "%s/pids.max", d->path);
      e = cl_jail_write_file(path, val);
    } else {
      snprintf(path, sizeof path, "%s/cpu.cfs_period_us", d->path);
      e = cl_jail_write_file(path, "100000");
      snprintf(val, sizeof val, "%lld", (long long)(cpu * 100000));
      snprintf(path, sizeof path, "%s/cpu.cfs_quota_us", d->path);
      if (!e) e = cl_jail_write_file(path, val);
    }
    if (e) {
      snprintf(err, errlen, "cgroup v1: setting %s limit in %s: %s", cg_names[c], d->path,
               strerror(e));
      return e;
    }
  }
  return 0;
}

/* Makes the jail's cgroups (v2 where it has every controller asked for, else v1; version 1 or 2
 * insists) with their limits. Returns 0 or an errno with a message in err. */
int cl_jail_cg_create(jail_ext *x, int version, long long memory, long long pids, double cpu,
                      char *err, size_t errlen) {
  static unsigned counter;
  int want[CG_NCTRL] = {memory > 0, pids > 0, cpu > 0};
  int me = cg_mount_private(err, errlen);
  if (me) return me;
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
        cl_jail_read_file(path, avail, sizeof avail);
        avail[strcspn(avail, "\n")] = 0;
        snprintf(err, errlen, "cgroup v2 at %s has no '%s' controller (available: %s)", v2parent,
                 cg_names[c], avail[0] ? avail : "none");
        return EOPNOTSUPP;
      }
  }
  char name[64];
  snprintf(name, sizeof name, "clawlua-%d-%u", (int)getpid(), ++counter);
  if (v2ok && (version == 2 || version == 0))
    return cg_create_v2(x, v2parent, name, want, memory, pids, cpu, err, errlen);
  if (version == 2) {
    snprintf(err, errlen, "cgroup v2 is not usable here");
    return EOPNOTSUPP;
  }
  return cg_create_v1(x, name, want, memory, pids, cpu, err, errlen);
}

/* Lua: jail.cgroup_info() -> {v1 = {memory=path|nil, ...}, v2 = path|nil, v2_controllers=} */
int cl_jail_cgroup_info(lua_State *L) {
  char err[512];
  int me = cg_mount_private(err, sizeof err);
  lua_createtable(L, 0, 3);
  if (me) {
    lua_pushstring(L, err);
    lua_setfield(L, -2, "mount_error");
  } else if (private_mounted) {
    lua_pushliteral(L, "private");
    lua_setfield(L, -2, "mounted");
  }
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
    if (cl_jail_read_file(path, buf, sizeof buf) >= 0) {
      buf[strcspn(buf, "\n")] = 0;
      lua_pushstring(L, buf);
      lua_setfield(L, -2, "v2_controllers");
    }
  }
  return 1;
}

/* Lua: jail.cgroup_mounts([text]) -> {{fstype=, options=, target=}, ...}: what a mount namespace
 * of its own without cgroups gets mounted, for /proc/self/cgroup's content (default: ours). */
int cl_jail_cgroup_mounts(lua_State *L) {
  char text[4096];
  const char *t = luaL_optstring(L, 1, NULL);
  if (!t) {
    if (cl_jail_read_file("/proc/self/cgroup", text, sizeof text) < 0)
      return luaL_fileresult(L, 0, "/proc/self/cgroup");
    t = text;
  }
  cl_cg_mount plan[CG_MAX_MOUNTS];
  int n = cl_jail_cg_mount_plan(t, plan, CG_MAX_MOUNTS);
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, plan[i].fstype);
    lua_setfield(L, -2, "fstype");
    lua_pushstring(L, plan[i].options);
    lua_setfield(L, -2, "options");
    lua_pushstring(L, plan[i].target);
    lua_setfield(L, -2, "target");
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}
