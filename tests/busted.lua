-- Runs busted under whichever Lua 5.4 host executes this file (the clawlua host, or stock
-- lua5.4 with clawlua.so on LUA_CPATH). Debian's /usr/bin/busted would pick Lua 5.1.
-- usage: clawlua tests/busted.lua tests/lua/x_spec.lua [busted options]
assert(_VERSION == "Lua 5.4", "busted must run under Lua 5.4, not " .. _VERSION)
-- The helpers next to the specs, and (for stock lua5.4) the freshly built clawlua.so.
local src = os.getenv("CLAWLUA_SRC") or "."
local so_dir = os.getenv("CLAWLUA_SO_DIR") or "build/lib"
package.path = src .. "/tests/lua/?.lua;" .. package.path
package.cpath = so_dir .. "/?.so;" .. package.cpath
local has_output = false
for _, a in ipairs(arg) do
  if a:match("^%-o") or a:match("^%-%-output") then has_output = true end
end
if not has_output then
  table.insert(arg, 1, "--output=utfTerminal")
end
table.insert(arg, 1, "--verbose")
-- CLAWLUA_GC_STRESS=1 (the "gc" stage of scripts/test): the collector never rests (a new cycle
-- as soon as one ends, a step every KiB allocated), so a C object whose Lua anchor is missing is
-- freed while still in use, and the test shows it (it found jail.spawn's unanchored config).
if os.getenv("CLAWLUA_GC_STRESS") == "1" then
  collectgarbage("incremental", 1, 1000, 10)
end
require "busted.runner" { standalone = false }
