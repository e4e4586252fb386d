-- The clawlua host command line, signals, and the module under both hosts.
local claw = require "clawlua"
local H = require "helper"

local dir
setup(function() dir = H.tmpdir() end)
teardown(function() H.rm_rf(dir) end)

describe("clawlua script.lua", function()
  it("passes arguments as ... and in arg, like lua5.4", function()
    H.write_file(dir .. "/args.lua",
      "#!/usr/bin/env clawlua\nprint(select('#', ...), ...)\nprint(arg[0], arg[1], arg[2], arg[-1] ~= nil)\n")
    local r = H.clawlua { dir .. "/args.lua", "a", "b c" }
    assert.are.equal(0, r.code)
    assert.are.equal("2\ta\tb c\n" .. dir .. "/args.lua\ta\tb c\ttrue\n", r.stdout)
  end)

  it("runs -e chunks and -l libraries in order, then the script", function()
    H.write_file(dir .. "/s.lua", "print('script', J.encode({1}))")
    local r = H.clawlua { "-e", "print('e1')", "-l", "J=clawlua.json", dir .. "/s.lua" }
    assert.are.equal("e1\nscript\t[1]\n", r.stdout)
  end)

  it("reads the script from stdin with '-', #! line allowed", function()
    local r = H.clawlua({ "-", "x" }, { stdin = "#!/bin/clawlua\nprint('stdin', ...)\n" })
    assert.are.equal(0, r.code)
    assert.are.equal("stdin\tx\n", r.stdout)
  end)

  it("prints a traceback with file:line for an uncaught error and exits 1", function()
    H.write_file(dir .. "/boom.lua", "local function f()\n  error('kaboom')\nend\nf()\n")
    local r = H.clawlua { dir .. "/boom.lua" }
    assert.are.equal(1, r.code)
    assert.matches("boom%.lua:2: kaboom", r.stderr)
    assert.matches("stack traceback:", r.stderr)
    assert.matches("boom%.lua:4: in main chunk", r.stderr)
  end)

  it("honours os.exit(n)", function()
    assert.are.equal(3, H.clawlua({ "-e", "os.exit(3)" }).code)
    assert.are.equal(0, H.clawlua({ "-e", "os.exit(true)" }).code)
  end)

  it("version and help", function()
    local r = H.clawlua { "-v" }
    assert.are.equal(0, r.code)
    assert.matches("^clawlua %d+%.%d+%.%d+ %(Lua 5%.4", r.stdout)
    assert.are.equal(r.stdout, H.clawlua({ "version" }).stdout)
    r = H.clawlua { "--help" }
    assert.are.equal(0, r.code)
    assert.matches("usage: clawlua", r.stdout)
    assert.matches("\n  version%s+print the versions", r.stdout)
    r = H.clawlua { "help", "version" }
    assert.matches("usage: clawlua version", r.stdout)
    -- every command in the list answers `help CMD`, `CMD --help` and `CMD -h` alike
    local listed = H.clawlua({ "--help" }).stdout:match("\ncommands:\n(.-)\n\n")
    local n = 0
    for name, summary in listed:gmatch("  (%S+)%s+([^\n]+)") do
      n = n + 1
      local h = H.clawlua { "help", name }
      assert.are.equal(0, h.code, name)
      assert.matches("^usage: clawlua " .. name:gsub("%p", "%%%0"), h.stdout)
      assert.is_truthy(h.stdout:find(summary, 1, true), name)
      for _, flag in ipairs { "--help", "-h" } do
        local r2 = H.clawlua { name, flag }
        assert.are.equal(0, r2.code, name .. " " .. flag)
        assert.are.equal(h.stdout, r2.stdout, name .. " " .. flag)
      end
    end
    assert.is_true(n >= 3)
  end)

  it("unknown commands and flags print usage and exit 2; a missing script exits 1", function()
    local r = H.clawlua { "frobnicate" }
    assert.are.equal(2, r.code)
    assert.matches("unknown command 'frobnicate'", r.stderr)
    assert.matches("usage: clawlua", r.stderr)
    r = H.clawlua { "--frobnicate" }
    assert.are.equal(2, r.code)
    assert.matches("unrecognized option '%-%-frobnicate'", r.stderr)
    r = H.clawlua { "-e" }
    assert.are.equal(2, r.code)
    r = H.clawlua { dir .. "/missing.lua" }
    assert.are.equal(1, r.code)
    assert.matches("cannot open .*missing%.lua", r.stderr)
    r = H.clawlua { "help", "nope" }
    assert.are.equal(2, r.code)
    assert.matches("unknown command 'nope'.*\ncommands:\n.*  audit ", r.stderr)
  end)

  it("a script file wins over a subcommand of the same name only when it exists", function()
    H.write_file(dir .. "/version", "print('the script')")
    local r = H.clawlua({ "version" }, { cwd = dir })
    assert.are.equal("the script\n", r.stdout)
    os.remove(dir .. "/version")
    r = H.clawlua({ "version" }, { cwd = dir })
    assert.matches("^clawlua ", r.stdout)
  end)

  it("runs the loop until spawned tasks finish, reporting task errors", function()
    H.write_file(dir .. "/tasks.lua", [[
      local claw = require "clawlua"
      claw.spawn(function() claw.sleep(0.05) print("late task done") end)
      claw.spawn(function() error("task exploded") end)
      print("main done")
    ]])
    local r = H.clawlua { dir .. "/tasks.lua" }
    assert.are.equal("main done\nlate task done\n", r.stdout)
    assert.matches("task failed: .*tasks%.lua:3: task exploded\nstack traceback:", r.stderr)
    assert.are.equal(1, r.code)
  end)

  it("names embedded library files in tracebacks", function()
    local r = H.clawlua { "-e", "require('clawlua').proc.run('x')" }
    assert.are.equal(1, r.code)
    assert.matches("lua/clawlua/proc_run%.lua:%d+", r.stderr)
  end)

  it("loads the Lua libraries from CLAWLUA_LUA_DIR when set", function()
    H.sh(("cp -r '%s/lua' '%s/lua'"):format(H.src, dir))
    local path = dir .. "/lua/clawlua/proc_run.lua"
    H.write_file(path, "io.stdout:write('from disk\\n')\n" .. H.read_file(path))
    local chunk = "require('clawlua').proc.run { 'true' }"
    local r = H.clawlua({ "-e", chunk }, { env = { CLAWLUA_LUA_DIR = dir .. "/lua" } })
    assert.are.equal("from disk\n", r.stdout)
    r = H.clawlua { "-e", chunk }
    assert.are.equal("", r.stdout)
  end)
end)

describe("signals", function()
  local script = [[
    local claw = require "clawlua"
    local out = ...
    local function mark(s) local f = io.open(out, "a"); f:write(s, "\n"); f:close() end
    claw.on_shutdown(function(sig) mark("handler " .. sig) end)
    claw.spawn(function()
      local _guard <close> = setmetatable({}, { __close = function() mark("task closed") end })
      claw.sleep(60)
    end)
    io.stdout:write("ready\n"); io.stdout:flush()
    claw.run(function() claw.sleep(60) end)
  ]]

  for _, host in ipairs { "clawlua", "lua5.4" } do
    for sig, code in pairs { INT = 130, TERM = 143 } do
      it(("SIG%s shuts down in order and exits %d (%s)"):format(sig, code, host), function()
        local marks = dir .. "/marks-" .. host .. sig
        H.write_file(dir .. "/sig.lua", script)
        local argv = { host == "clawlua" and H.bin or "lua5.4", dir .. "/sig.lua", marks,
                       stdout = "pipe", stderr = "pipe", env = H.lua_env() }
        local p = assert(claw.proc.spawn(argv))
        p.stdout:set_timeout(20)
        assert.are.equal("ready", p.stdout:read_line())
        assert(p:kill(sig))
        local st = assert(p:wait(20))
        assert.are.equal(code, st.code)
        local got = H.read_file(marks)
        assert.matches("task closed\n", got)
        assert.matches("handler " .. (sig == "INT" and 2 or 15) .. "\n", got)
        assert.matches("SIG" .. sig .. " received, shutting down", p.stderr:read_all())
        p:close()
      end)
    end

    -- a script busy in pure Lua (or a call stuck in C) does not turn the loop: the first signal
    -- is taken and said at once, the second ends the process whatever it is doing
    local busy = [[
      require "clawlua"
      local seconds = tonumber((...))
      io.stdout:write("ready\n"); io.stdout:flush()
      local t0 = os.clock()
      while os.clock() - t0 < seconds do end
      io.stdout:write("done\n")
    ]]

    it(("a second SIGTERM ends a busy script at once (%s)"):format(host), function()
      H.write_file(dir .. "/busy.lua", busy)
      local p = assert(claw.proc.spawn { host == "clawlua" and H.bin or "lua5.4", dir .. "/busy.lua", "60",
                                         stdout = "pipe", stderr = "pipe", env = H.lua_env() })
      p.stdout:set_timeout(20)
      p.stderr:set_timeout(20)
      assert.are.equal("ready", p.stdout:read_line())
      local t0 = claw.now()
      assert(p:kill("TERM"))
      assert.matches("SIGTERM received, shutting down", p.stderr:read_line())
      assert(p:kill("TERM"))
      local st = assert(p:wait(20))
      assert.are.equal(143, st.code)
      assert.is_true(claw.now() - t0 < 10, "it took the whole busy loop")
      assert.matches("SIGTERM again, exiting now", p.stderr:read_all())
      p:close()
    end)

    it(("a signal taken while the script was busy still ends it by that signal (%s)"):format(host), function()
      H.write_file(dir .. "/busy.lua", busy)
      local p = assert(claw.proc.spawn { host == "clawlua" and H.bin or "lua5.4", dir .. "/busy.lua", "1",
                                         stdout = "pipe", stderr = "pipe", env = H.lua_env() })
      p.stdout:set_timeout(20)
      assert.are.equal("ready", p.stdout:read_line())
      assert(p:kill("INT"))
      local st = assert(p:wait(20))
      -- the script ran to its end without a loop turn; then the signal had its own action
      assert.are.equal("done", p.stdout:read_line())
      assert.are.equal(2, st.signal)
      p:close()
    end)
  end
end)

describe("one API, two hosts", function()
  local probe = [[
    local claw = require "clawlua"
    local names = {}
    local function walk(prefix, t, depth)
      for k, v in pairs(t) do
        if type(k) == "string" and k ~= "host" then
          names[#names + 1] = prefix .. k .. ":" .. type(v)
          if type(v) == "table" and depth < 1 and k ~= "cancelled" then walk(prefix .. k .. ".", v, depth + 1) end
        end
      end
    end
    walk("", claw, 0)
    table.sort(names)
    print(table.concat(names, "\n"))
    print(claw.host)
  ]]

  it("require 'clawlua' gives the same namespace in the host and in stock lua5.4", function()
    H.write_file(dir .. "/probe.lua", probe)
    local a = H.clawlua { dir .. "/probe.lua" }
    local b = H.lua { dir .. "/probe.lua" }
    assert.are.equal(0, a.code)
    assert.are.equal(0, b.code)
    local ca, cb = a.stdout:gsub("clawlua\n$", ""), b.stdout:gsub("lua\n$", "")
    assert.are.equal(ca, cb)
    assert.matches("proc%.spawn:function", ca)
    assert.matches("json%.decode:function", ca)
  end)

  it("works with only clawlua.so present: no Lua files on any path", function()
    H.sh(("mkdir -p '%s/only' && cp '%s/clawlua.so' '%s/only/'"):format(dir, H.so_dir, dir))
    local r = assert(claw.proc.run { "lua5.4", "-e", [[
      package.path = ""
      local cli = require "clawlua.cli"         -- embedded Lua, before "clawlua" itself
      local claw = require "clawlua"
      assert(require("clawlua.json") == claw.json)
      print(type(cli.main), claw.run(function() return "ok" end))
    ]], env = H.lua_env { LUA_CPATH = dir .. "/only/?.so", PATH = os.getenv("PATH") }, cwd = "/" })
    assert.are.equal("", r.stderr)
    assert.are.equal("function\tok\n", r.stdout)
  end)
end)
