/*
 * proc.try_lock(path): an exclusive flock(2) on a file, for runtimes that share a state dir
 * (e.g. the sandboxes' subnets). Never waits: the caller retries on the loop, so that a lock held
 * by another process does not block this one's loop. The lock goes with the handle's fd.
 */
#include "clawlua.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#define LOCK_MT "clawlua.lock"

typedef struct lock_handle {
  int fd;
  int closed;
} lock_handle;

static int l_unlock(lua_State *L) {
  lock_handle *h = luaL_checkudata(L, 1, LOCK_MT);
  if (!h->closed) {
    h->closed = 1;
    close(h->fd); /* releases the lock */
    h->fd = -1;
  }
  return 0;
}

/* Lua: proc.try_lock(path) -> lock | nil, "<path>: busy", "EWOULDBLOCK" | nil, err, errno.
 * The file is created (0600) when missing; lock:unlock() (also __close, __gc) releases it. */
int cl_proc_try_lock(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  static const luaL_Reg methods[] = {{"unlock", l_unlock}, {NULL, NULL}};
  static const cl_class cls = {LOCK_MT, methods, l_unlock, NULL};
  cl_class_register(L, &cls);
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return cl_fail(L, path, errno);
  if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
    int e = errno;
    close(fd);
    if (e == EWOULDBLOCK) {
      lua_pushnil(L);
      lua_pushfstring(L, "%s: busy", path);
      lua_pushliteral(L, "EWOULDBLOCK");
      return 3;
    }
    return cl_fail(L, path, e);
  }
  lock_handle *h = lua_newuserdatauv(L, sizeof *h, 0);
  h->fd = fd;
  h->closed = 0;
  luaL_setmetatable(L, LOCK_MT);
  return 1;
}
