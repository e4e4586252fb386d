/* clawlua.udp: datagram sockets on the loop (udp.c). */
#ifndef CLAWLUA_UDP_H
#define CLAWLUA_UDP_H

#include <lua.h>

int luaopen_clawlua_udp(lua_State *L);

#endif
