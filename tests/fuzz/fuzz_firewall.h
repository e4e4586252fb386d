/* Shared by the firewall harnesses: a firewall handle in a network namespace of the harness's
 * own, so that nothing it does reaches the host's nf_tables or network. */
#ifndef CLAWLUA_FUZZ_FIREWALL_H
#define CLAWLUA_FUZZ_FIREWALL_H

#include <net/if.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_lua_state.h"

/* Moves the process into a new network namespace (root needed), with its loopback up when
 * lo_up, and opens a firewall there whose one resolver is `resolver`. Returns a registry
 * reference to the handle. */
static inline int fz_firewall_open(lua_State *L, int lo_up, const char *resolver) {
  if (unshare(CLONE_NEWNET) != 0) fz_abort("unshare(CLONE_NEWNET) (needs root)", NULL);
  if (lo_up) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    ifr.ifr_flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING;
    if (s < 0 || ioctl(s, SIOCSIFFLAGS, &ifr) != 0) fz_abort("cannot bring lo up", NULL);
    close(s);
  }
  fz_push_field(L, "firewall", "open");
  lua_createtable(L, 0, 4);
  lua_pushliteral(L, "fuzz");
  lua_setfield(L, -2, "table");
  lua_createtable(L, 1, 0);
  lua_pushstring(L, resolver);
  lua_rawseti(L, -2, 1);
  lua_setfield(L, -2, "resolvers");
  lua_pushnumber(L, 0.05);
  lua_setfield(L, -2, "dns_timeout");
  lua_pushinteger(L, 7); /* an NFLOG group, so that specs with log = true compile */
  lua_setfield(L, -2, "log_group");
  fz_call(L, 1, 2, "firewall.open raised");
  if (lua_isnil(L, -2)) fz_abort("firewall.open", lua_tostring(L, -1));
  lua_pop(L, 1);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

/* fw:<method>(...) with the nargs arguments on top; leaves nres results (fz_pcall's return). */
static inline int fz_fw_method(lua_State *L, int ref, const char *method, int nargs, int nres) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_getfield(L, -1, method);
  lua_insert(L, -2 - nargs);
  lua_insert(L, -1 - nargs);
  return fz_pcall(L, nargs + 1, nres);
}

#endif
