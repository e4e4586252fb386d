-- labels: slow
-- timeout: 600
-- The module installs the Lua way: luarocks builds it from the rockspec into a private tree,
-- and stock lua5.4 loads it from there with every embedded library.
local claw = require "clawlua"
local H = require "helper"

describe("luarocks", function()
  it("builds and installs clawlua from scripts/clawlua-dev-1.rockspec", function()
    local dir = H.tmpdir()
    -- build from a copy: luarocks builds in the source tree, and the other host's run of this
    -- spec may be building at the same time
    H.sh(("mkdir '%s/src' && cd '%s' && cp -r CMakeLists.txt runtime lua scripts '%s/src/'"):format(
      dir, H.src, dir))
    local r = assert(claw.proc.run { "luarocks", "--lua-version=5.4", "--tree", dir .. "/tree", "make",
                                     "scripts/clawlua-dev-1.rockspec", cwd = dir .. "/src", timeout = 600 })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local so = H.sh(("find '%s/tree' -name clawlua.so"):format(dir)):gsub("%s+$", "")
    assert.matches("/lib/lua/5%.4/clawlua%.so$", so)
    r = assert(claw.proc.run { "lua5.4", "-e", [[
      local claw = require "clawlua"
      local cli = require "clawlua.cli"
      print(claw.version, type(cli.main), claw.run(function() return claw.json.encode { 1 } end))
    ]], env = H.lua_env { LUA_CPATH = so:gsub("clawlua%.so$", "?.so") } })
    assert.are.equal(claw.version .. "\tfunction\t[1]\n", r.stdout)
    H.rm_rf(dir)
  end)
end)
