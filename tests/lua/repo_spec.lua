-- The repository keeps its promises: README commands, package list, install layout.
local claw = require "clawlua"
local H = require "helper"

local function words(s)
  local t = {}
  for w in s:gmatch("%S+") do t[#t + 1] = w end
  table.sort(t)
  return t
end

describe("the repository", function()
  local readme = H.read_file(H.src .. "/README.md")

  it("names in README.md exactly the packages scripts/deps installs", function()
    local deps = H.read_file(H.src .. "/scripts/deps"):match('PACKAGES="(.-)"')
    local listed = readme:match("### Packages.-```\n(.-)```")
    assert.is_truthy(deps)
    assert.is_truthy(listed)
    assert.are.same(words(deps), words(listed))
  end)

  it("has the two README commands, executable, and CI runs the test command", function()
    assert.matches("%./scripts/run ", readme)
    assert.matches("%./scripts/test ", readme)
    for _, f in ipairs { "scripts/run", "scripts/test", "scripts/deps", "scripts/build", ".ci/run" } do
      H.sh("test -x '" .. H.src .. "/" .. f .. "'") -- raises when not executable
    end
    assert.matches("scripts/test", H.read_file(H.src .. "/.ci/run"))
    assert.is_truthy(io.open(H.src .. "/LICENSE"))
  end)

  it("installs binary, module and Lua files with cmake --install", function()
    local dir = H.tmpdir()
    local build = H.so_dir:gsub("/lib$", "")
    H.sh(("cmake --install '%s' --prefix '%s/p' >/dev/null"):format(build, dir))
    assert.is_truthy(io.open(dir .. "/p/bin/clawlua"))
    assert.is_truthy(io.open(dir .. "/p/share/lua/5.4/clawlua/cli.lua"))
    local so = H.sh(("find '%s/p' -name clawlua.so"):format(dir))
    assert.matches("/lua/5%.4/clawlua%.so", so)
    local r = assert(claw.proc.run { dir .. "/p/bin/clawlua", "-e", "print(require('clawlua').version)" })
    assert.are.equal(claw.version .. "\n", r.stdout)
    H.rm_rf(dir)
  end)
end)
