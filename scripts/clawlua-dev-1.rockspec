-- luarocks make scripts/clawlua-dev-1.rockspec   (from the repository root)
rockspec_format = "3.0"
package = "clawlua"
version = "dev-1"
source = { url = "git+https://example.invalid/clawlua.git" }
description = {
  summary = "Sandboxes for untrusted work, scripted in Lua: microVMs, nftables, seccomp, audit",
  license = "MIT",
}
dependencies = { "lua == 5.4" }
-- C libraries (liblua5.4, libcjson, libcurl, libseccomp, libnftnl, libmnl, libcrypto) are
-- found by CMake through pkg-config, which names any that is missing.
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    CLAWLUA_TESTS = "OFF",
    CLAWLUA_LMOD_DIR = "$(LIBDIR)",
    CLAWLUA_LUA_INSTALL_DIR = "$(LUADIR)",
  },
  copy_directories = {},
}
