#include "clawlua.h"
int luaopen_clawlua_jail(lua_State *L) {
  if (cl_entry_redirect(L, "jail")) return 1;
  lua_newtable(L);
  return 1;
}
