/*
 * A jail's root and mounts from its options: root=, binds=, tmpfs=, symlinks=, devices=, proc=,
 * paths normalised and checked, bind sources and targets required to exist before the clone
 * (a clear error rather than a failure in the child).
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

/* root = a host directory (checked now: a clear error rather than a failure in the child). */
int cl_jail_parse_root(lua_State *L, int opts, jail_cfg *c, char *err, size_t errlen) {
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

int cl_jail_parse_mounts(lua_State *L, int opts, jail_cfg *c, char *err, size_t errlen) {
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
