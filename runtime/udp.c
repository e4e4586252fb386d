/*
 * clawlua.udp: datagram sockets on the loop. The sandbox DNS forwarder listens on one per
 * sandbox and asks its upstream resolvers through another; receiving yields to the loop, so a
 * slow resolver never holds up anything else. IPv4 and IPv6; one datagram per call, at most
 * 64 KiB (what UDP can carry), never truncated silently.
 */
#include "udp.h"

#include "clawlua.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lauxlib.h>

#define UDP_MT    "clawlua.udp"
#define MAX_DGRAM 65535

typedef struct {
  int fd;
  int closed;
  int family;
  cl_watch watch;
} cl_udp;

static const char *const OPEN_FIELDS[] = {"host", "port", "reuse", NULL};

static cl_udp *check_udp(lua_State *L) {
  cl_udp *u = luaL_checkudata(L, 1, UDP_MT);
  if (u->closed) luaL_error(L, "attempt to use a closed udp socket");
  return u;
}

static void udp_release(cl_udp *u) {
  if (u->closed) return;
  u->closed = 1; /* first: waits woken below see a closed socket */
  cl_watch_stop(&u->watch);
  close(u->fd);
  u->fd = -1;
}

/* Parses host (an IPv4 or IPv6 literal) and port into ss; returns its length or 0. */
static socklen_t make_addr(const char *host, lua_Integer port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof *ss);
  struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
  if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    return sizeof *a4;
  }
  if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    return sizeof *a6;
  }
  return 0;
}

/* Pushes host and port of ss; returns 2. */
static int push_addr(lua_State *L, const struct sockaddr_storage *ss) {
  char buf[INET6_ADDRSTRLEN];
  if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)ss;
    lua_pushstring(L, inet_ntop(AF_INET6, &a6->sin6_addr, buf, sizeof buf));
    lua_pushinteger(L, ntohs(a6->sin6_port));
  } else {
    const struct sockaddr_in *a4 = (const struct sockaddr_in *)ss;
    lua_pushstring(L, inet_ntop(AF_INET, &a4->sin_addr, buf, sizeof buf));
    lua_pushinteger(L, ntohs(a4->sin_port));
  }
  return 2;
}

/* Lua: udp.open{host="0.0.0.0", port=0, reuse=false} -> socket | nil, err, code */
static int l_open(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  cl_check_fields(L, 1, OPEN_FIELDS);
  const char *host = cl_opt_string(L, 1, "host", "0.0.0.0");
  lua_Integer port = cl_opt_integer(L, 1, "port", 0);
  int reuse = cl_opt_boolean(L, 1, "reuse", 0);
  if (port < 0 || port > 65535) return cl_field_error(L, "port", "0..65535 expected");
  struct sockaddr_storage ss;
  socklen_t len = make_addr(host, port, &ss);
  if (!len) return cl_field_error(L, "host", "an IPv4 or IPv6 address expected");

  cl_udp *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  u->fd = -1;
  u->closed = 1; /* until set up: a failure below leaves nothing to release */
  luaL_setmetatable(L, UDP_MT);
  int fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return cl_fail(L, "udp socket", errno);
  int one = 1;
  if (reuse) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (ss.ss_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (bind(fd, (struct sockaddr *)&ss, len) != 0) {
    int err = errno;
    close(fd);
    return cl_failf(L, err, "udp bind %s:%d: %s", host, (int)port, strerror(err));
  }
  int err = cl_watch_start(cl_loop_get(L), &u->watch, fd, 0, NULL);
  if (err) {
    close(fd);
    return cl_fail(L, "udp watch", err);
  }
  u->fd = fd;
  u->family = ss.ss_family;
  u->closed = 0;
  return 1;
}

static int do_recv(lua_State *L, cl_udp *u);
static int recv_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  cl_wait *w = cl_wait_resumed(L, ctx);
  cl_udp *u = lua_touserdata(L, 1);
  if (u->closed) return cl_failf(L, EBADF, "udp recv: socket closed");
  if (w->state == CL_WAIT_TIMEOUT) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    lua_pushliteral(L, "ETIMEDOUT");
    return 3;
  }
  return do_recv(L, u);
}

static int do_recv(lua_State *L, cl_udp *u) {
  static char buf[MAX_DGRAM + 1]; /* one loop thread; the copy goes to Lua at once */
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  for (;;) {
    socklen_t sl = sizeof ss;
    ssize_t n = recvfrom(u->fd, buf, sizeof buf, MSG_TRUNC, (struct sockaddr *)&ss, &sl);
    if (n >= 0) {
      if (n > MAX_DGRAM) continue; /* cannot happen over UDP; never hand out a cut datagram */
      lua_pushlstring(L, buf, (size_t)n);
      return 1 + push_addr(L, &ss);
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) break;
    if (errno == ECONNREFUSED) continue; /* an ICMP error from an earlier send */
    return cl_fail(L, "udp recv", errno);
  }
  cl_wait *w;
  if (lua_gettop(L) < 3) {
    double timeout = luaL_optnumber(L, 2, -1);
    lua_settop(L, 2);
    w = cl_wait_push(L);
    w->deadline = cl_deadline(timeout);
    if (timeout == 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      lua_pushliteral(L, "ETIMEDOUT");
      return 3;
    }
  } else {
    w = lua_touserdata(L, 3);
  }
  return cl_watch_wait(L, w, &u->watch, 0, recv_k, 3);
}

/* Lua: s:recv([timeout]) -> data, host, port | nil, "timeout", "ETIMEDOUT" | nil, err, code */
static int l_recv(lua_State *L) {
  cl_udp *u = check_udp(L);
  if (!lua_isnoneornil(L, 2)) luaL_checknumber(L, 2);
  lua_settop(L, 2);
  return do_recv(L, u);
}

/* Lua: s:send(data, host, port) -> true | nil, err, code. A datagram socket's send buffer
 * takes a datagram or refuses it: EAGAIN is reported, not waited for (callers drop, as the
 * network would). */
static int l_send(lua_State *L) {
  cl_udp *u = check_udp(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  const char *host = luaL_checkstring(L, 3);
  lua_Integer port = luaL_checkinteger(L, 4);
  luaL_argcheck(L, port > 0 && port <= 65535, 4, "1..65535 expected");
  luaL_argcheck(L, len <= MAX_DGRAM, 2, "datagram over 65535 bytes");
  struct sockaddr_storage ss;
  socklen_t sl = make_addr(host, port, &ss);
  if (!sl) luaL_argerror(L, 3, "an IPv4 or IPv6 address expected");
  if ((int)ss.ss_family != u->family)
    return cl_failf(L, EAFNOSUPPORT, "udp send %s: another address family than the socket's", host);
  for (;;) {
    if (sendto(u->fd, data, len, 0, (struct sockaddr *)&ss, sl) >= 0) break;
    if (errno == EINTR) continue;
    return cl_failf(L, errno, "udp send %s:%d: %s", host, (int)port, strerror(errno));
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* Lua: s:address() -> host, port (where the socket is bound) */
static int l_address(lua_State *L) {
  cl_udp *u = check_udp(L);
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  socklen_t sl = sizeof ss;
  if (getsockname(u->fd, (struct sockaddr *)&ss, &sl) != 0) return cl_fail(L, "udp", errno);
  return push_addr(L, &ss);
}

static int l_fileno(lua_State *L) {
  lua_pushinteger(L, check_udp(L)->fd);
  return 1;
}

static int l_close(lua_State *L) {
  udp_release(luaL_checkudata(L, 1, UDP_MT));
  return 0;
}

static int l_is_closed(lua_State *L) {
  lua_pushboolean(L, ((cl_udp *)luaL_checkudata(L, 1, UDP_MT))->closed);
  return 1;
}

static int l_tostring(lua_State *L) {
  cl_udp *u = luaL_checkudata(L, 1, UDP_MT);
  if (u->closed)
    lua_pushliteral(L, "clawlua.udp (closed)");
  else
    lua_pushfstring(L, "clawlua.udp (fd %d)", u->fd);
  return 1;
}

static const luaL_Reg methods[] = {
    {"recv", l_recv},   {"send", l_send},           {"address", l_address}, {"fileno", l_fileno},
    {"close", l_close}, {"is_closed", l_is_closed}, {NULL, NULL},
};

static const luaL_Reg funcs[] = {
    {"open", l_open},
    {NULL, NULL},
};

int luaopen_clawlua_udp(lua_State *L) {
  if (cl_entry_redirect(L, "udp")) return 1;
  static const luaL_Reg meta[] = {{"__tostring", l_tostring}, {NULL, NULL}};
  static const cl_class cls = {UDP_MT, methods, l_close, meta};
  cl_class_register(L, &cls);
  luaL_newlib(L, funcs);
  lua_pushinteger(L, MAX_DGRAM);
  lua_setfield(L, -2, "max_datagram");
  return 1;
}
