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

  it("has Lua libraries whose requires flow one way (no module reaches back to one that needs it)", function()
    -- Every string literal in code that names a clawlua module (require "x", pcall(require,
    -- "x"), a table of modules loaded by name later) is an edge; a cycle means a folder whose
    -- files call each other in a circle.
    local files = H.sh(("cd '%s' && find lua/clawlua -name '*.lua'"):format(H.src))
    local edges = {}
    for f in files:gmatch("[^\n]+") do
      local mod = f:gsub("^lua/", ""):gsub("/init%.lua$", ""):gsub("%.lua$", ""):gsub("/", ".")
      edges[mod] = {}
      for line in H.read_file(H.src .. "/" .. f):gmatch("[^\n]*") do
        local code = line:gsub("%-%-.*$", "")
        for dep in code:gmatch('"(clawlua%.[%w_.]+)"') do
          if dep ~= mod then edges[mod][dep] = true end
        end
      end
    end
    for _, deps in pairs(edges) do
      for dep in pairs(deps) do
        if not edges[dep] then deps[dep] = nil end -- a C module, or not a module at all
      end
    end
    local state, path = {}, {}
    local function visit(m)
      if state[m] == "done" then return end
      assert(state[m] ~= "open", "require cycle: " .. table.concat(path, " -> ") .. " -> " .. m)
      state[m] = "open"
      path[#path + 1] = m
      for dep in pairs(edges[m] or {}) do visit(dep) end
      path[#path] = nil
      state[m] = "done"
    end
    for m in pairs(edges) do visit(m) end
    assert.is_truthy(edges["clawlua.sandbox"]["clawlua.policy"]) -- the scan sees requires
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

  it("keeps its top level to the fixed layout", function()
    local allowed = {}
    for _, n in ipairs { "CMakeLists.txt", "README.md", "LICENSE", "runtime", "lua", "scripts", "tests", "examples",
      ".ci", ".gitignore", ".clang-format", ".clang-tidy", ".luacheckrc" } do allowed[n] = true end
    -- what git tracks; from an export without .git, what is there (builds and caches aside)
    local out, r = H.sh("cd '" .. H.src .. "' && git ls-files 2>/dev/null | cut -d/ -f1 | sort -u", { may_fail = true })
    if r.code ~= 0 or out == "" then
      out = H.sh("ls -A '" .. H.src .. "' | grep -Ev '^(\\.git|build.*|\\.cache|compile_commands\\.json)$' || true")
    end
    local stray = {}
    for n in out:gmatch("[^\n]+") do
      if not allowed[n] then stray[#stray + 1] = n end
    end
    assert.same({}, stray)
  end)

  it("runs its tests from a plain clone: nothing reads the team's shared material beside it", function()
    -- A user's clone has nothing beside it: the spec files the tests read are copies in
    -- tests/fixtures/specs/, with their origin, commit and license in its README.
    local files = H.sh(("cd '%s' && find tests scripts .ci CMakeLists.txt -type f"
      .. " ! -path 'tests/fixtures/*' ! -name '*.pyc'"):format(H.src))
    local bad = {}
    for f in files:gmatch("[^\n]+") do
      local fh = io.open(H.src .. "/" .. f, "rb")
      local body = fh and fh:read("a") or ""
      if fh then fh:close() end
      for _, pat in ipairs { "%.%./shared", "/work/s[h]ared", "[\"']shared[\"'][^\n]-specs" } do
        if body:find(pat) then bad[#bad + 1] = f .. " (" .. pat .. ")" end
      end
    end
    assert.are.same({}, bad)
    local readme_specs = H.read_file(H.src .. "/tests/fixtures/specs/README.md")
    local fixtures = H.sh(("cd '%s/tests/fixtures/specs' && find . -type f ! -name README.md"):format(H.src))
    for f in fixtures:gmatch("%./([^\n]+)") do
      assert.is_truthy(readme_specs:find("`" .. f .. "`", 1, true), f .. " is not in tests/fixtures/specs/README.md")
    end
    assert.matches("Apache%-2%.0", readme_specs)
    assert.matches("MIT", readme_specs)
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

  -- The system clawlua replaces shipped modules that were never compiled and a client that
  -- started a subcommand that did not exist. Here every C file is built, every Lua library
  -- loads in both hosts, and every command the CLI lists answers.
  it("compiles every C source, loads every Lua library and runs every listed command", function()
    local build = H.so_dir:gsub("/lib$", "")
    local cc = H.read_file(build .. "/compile_commands.json")
    local sources = H.sh("cd '" .. H.src .. "' && find runtime tests/c tests/helpers tests/bench -name '*.c' | sort")
    local n = 0
    for f in sources:gmatch("[^\n]+") do
      n = n + 1
      assert.is_truthy(cc:find("/" .. f .. '"', 1, true), f .. " is not compiled by the build")
    end
    assert.is_true(n > 10)
    local mods = {}
    for f in H.sh("ls '" .. H.src .. "/lua/clawlua'"):gmatch("([%w_]+)%.lua") do mods[#mods + 1] = f end
    local chunk = "for _, m in ipairs{" .. ("%q,"):rep(#mods):format(table.unpack(mods)) ..
      "} do require('clawlua.' .. m) end print('ok')"
    assert.are.equal("ok\n", H.clawlua({ "-e", chunk }, { env = { PATH = os.getenv("PATH") } }).stdout)
    local r = assert(claw.proc.run { "lua5.4", "-e", chunk, env = H.lua_env(), timeout = 60 })
    assert.are.equal("ok\n", r.stdout, r.stderr)
    local help = H.clawlua({ "help" }).stdout
    local cmds = {}
    for line in (help:match("commands:\n(.-)\n\n") or ""):gmatch("[^\n]+") do
      cmds[#cmds + 1] = line:match("^  (%S+)")
    end
    assert.is_true(#cmds >= 3, help)
    for _, c in ipairs(cmds) do
      local h = H.clawlua({ "help", c })
      assert.are.equal(0, h.code, c .. ": " .. h.stderr)
      assert.matches("usage: clawlua " .. c, h.stdout)
    end
  end)
end)
