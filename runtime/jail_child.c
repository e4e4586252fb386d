/*
 * Both sides of a jail's clone: the parent writes the id maps and attaches the cgroup v2
 * directory before the child goes on; the child (fork path of cl_spawn, async-signal-safe code
 * only) joins its cgroup v1 directories, sets its hostname, brings up loopback, builds its root
 * from mounts and pivots into it, sets rlimits, the capability bounding set, ids, capabilities and
 * no_new_privs.
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

int cl_jail_parent_setup(void *arg, pid_t pid, char *err, size_t errlen) {
  spawn_ctx *sc = arg;
  char path[128], val[32];
  snprintf(val, sizeof val, "%d", (int)pid);
  for (int i = 0; sc->ext && i < sc->ext->ndirs; i++) {
    cgdir *d = &sc->ext->dirs[i];
    if (!d->v2) continue; /* v1: the child joins through `tasks` (cl_jail_child_setup) */
    char p2[MAX_PATH_LEN + 32];
    snprintf(p2, sizeof p2, "%s/cgroup.procs", d->path);
    int e = cl_jail_write_file(p2, val);
    if (e) {
      snprintf(err, errlen, "cgroup: attaching to %s: %s", d->path, strerror(e));
      return e;
    }
  }
  if (sc->cfg->userns) {
    snprintf(path, sizeof path, "/proc/%d/setgroups", (int)pid);
    cl_jail_write_file(path, sc->cfg->ngroups ? "allow" : "deny");
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
    int e = cl_jail_write_file(path, sc->cfg->uid_map);
    if (!e) {
      snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
      e = cl_jail_write_file(path, sc->cfg->gid_map);
    }
    if (e) {
      snprintf(err, errlen, "user namespace: writing id maps: %s", strerror(e));
      return e;
    }
  }
  return 0;
}

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

int cl_jail_child_setup(void *arg, const char **stage) {
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
  /* Our cgroup v1 directories, joined now that the set-up (our own code) is done and only rlimits,
   * ids, capabilities and exec are left: "0" in `tasks` moves this single-threaded process; the
   * parent opened the files, and the kernel checks its credentials. (Joining a cpu cgroup earlier
   * made every step after it wait behind the new group's first turn on the CPU.) */
  *stage = "joining the cgroups";
  for (int i = 0; i < c->ntasks; i++) {
    if (write(c->tasks[i], "0", 1) != 1) return errno ? errno : EIO;
    close(c->tasks[i]);
  }
  if (c->cgroupns) { /* after joining: the namespace is rooted at our cgroup */
    *stage = "unshare(cgroup)";
    if (unshare(CLONE_NEWCGROUP) < 0) return errno;
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
