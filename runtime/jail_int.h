/*
 * What the files of the jail share: jail.c (options, jail.spawn, the Lua module), jail_child.c
 * (both sides of the clone) and jail_cgroup.c (cgroups). Nothing else includes it.
 */
#ifndef CLAWLUA_JAIL_INT_H
#define CLAWLUA_JAIL_INT_H

#include "clawlua.h"
#include "jail.h"

#include <linux/mount.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#define CFG_MT       "clawlua.jail.config"
#define MAX_MOUNTS   128
#define MAX_PATH_LEN 1024
#define MAX_DEVICES  32
#define MAX_MAPS     8
#define MAX_GROUPS   32
#define MAX_RLIMITS  15     /* entries of rlimit_names (jail.c) */
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

enum { M_BIND, M_TMPFS, M_DIR, M_SYMLINK, M_DEV, M_PROC };

typedef struct mnt {
  int kind;
  int rw, dev, is_dir, optional;
  char src[MAX_PATH_LEN]; /* "/oldroot/<host path>", or a symlink's target */
  char dst[MAX_PATH_LEN]; /* "/newroot/<path in the jail>" */
  char opts[64];          /* tmpfs options */
} mnt;

enum { CG_MEMORY, CG_PIDS, CG_CPU, CG_NCTRL };

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
  } rlimits[MAX_RLIMITS];
  /* parent side */
  char uid_map[256], gid_map[256];
  int root_mapped; /* both maps give the namespace a root (inside id 0) */
  int netfd;
  /* The `tasks` files of the jail's cgroup v1 directories, opened by the parent: the child
   * joins them itself by writing "0" (moving one thread needs no RCU grace period, which
   * moving a process from outside through cgroup.procs waits for: milliseconds per spawn). */
  int ntasks;
  int tasks[CG_NCTRL];
} jail_cfg;

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

typedef struct spawn_ctx {
  jail_cfg *cfg; /* a userdata anchored as the context's user value */
  jail_ext *ext;
  int idx; /* stack index of the context (a userdata) in cl_jail_spawn's frame */
  char id[64];
} spawn_ctx;

int cl_jail_write_file(const char *path, const char *data);
int cl_jail_read_file(const char *path, char *buf, size_t len);
void cl_jail_ext_kill(cl_proc_ext *e);
void cl_jail_ext_reaped(cl_proc_ext *e, lua_State *L, pid_t pid);
void cl_jail_ext_status(cl_proc_ext *e, lua_State *L);
void cl_jail_ext_destroy(cl_proc_ext *e);
int cl_jail_cg_create(jail_ext *x, int version, long long memory, long long pids, double cpu,
                      char *err, size_t errlen);
int cl_jail_cgroup_info(lua_State *L);
int cl_jail_cgroup_mounts(lua_State *L);

/* One mount that brings the cgroup hierarchies into a mount namespace that has none. */
#define CG_ROOT       "/sys/fs/cgroup"
#define CG_MAX_MOUNTS 20
typedef struct cl_cg_mount {
  char fstype[8];
  char options[256];
  char target[300];
} cl_cg_mount;
int cl_jail_cg_mount_plan(const char *text, cl_cg_mount *out, int max);
int cl_jail_parent_setup(void *arg, pid_t pid, char *err, size_t errlen);
int cl_jail_child_setup(void *arg, const char **stage);

/* jail_mounts.c: root= (checked to exist), then the mounts (binds, tmpfs, devices, proc,
 * symlinks). Raise on misuse; return 0 or an errno with a message in err. */
int cl_jail_parse_root(lua_State *L, int opts, jail_cfg *c, char *err, size_t errlen);
int cl_jail_parse_mounts(lua_State *L, int opts, jail_cfg *c, char *err, size_t errlen);

#endif
