/*
 * The jail's C entry points, for the Lua binding (jail.spawn) and the primitives that confine
 * their processes (the vm's VMM). Options are jail.spawn's table: see README "jail".
 */
#ifndef CLAWLUA_JAIL_H
#define CLAWLUA_JAIL_H

#include "clawlua.h"

/* Validates the jail options table at opts completely without making anything (no process,
 * cgroup, fd or mount). strict: also rejects fields that are not the jail's own (proc.spawn's
 * argv, env, stdio... are accepted only when strict is 0). Raises "bad field 'cgroup.memory'
 * (...)" on misuse; returns 0, or an errno with a message in err when the host does not have
 * what the options name (a bind source, a root directory). */
int cl_jail_check(lua_State *L, int opts, int strict, char *err, size_t errlen);

/* jail.spawn: starts the process the options at opts describe. Pushes what jail.spawn returns
 * (a clawlua.proc handle, or nil, err, code) and returns their count. Raises on misuse. */
int cl_jail_spawn(lua_State *L, int opts);

#endif
