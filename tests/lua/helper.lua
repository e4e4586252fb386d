-- Shared test helpers. Specs run both inside the clawlua host and under stock lua5.4.
local claw = require "clawlua"

local H = {}

H.bin = os.getenv("CLAWLUA_BIN") or "build/bin/clawlua"
H.src = os.getenv("CLAWLUA_SRC") or "."
H.so_dir = os.getenv("CLAWLUA_SO_DIR") or "build/lib"
-- Timing bounds in specs are multiplied by this under sanitizers and valgrind.
H.scale = tonumber(os.getenv("CLAWLUA_TIME_SCALE")) or 1
-- True when the specs run under stock lua5.4 (with clawlua.so), false inside the clawlua host.
H.stock = ((arg and arg[-1]) or ""):match("lua5%.4$") ~= nil

--- A published spec file the tests read (tests/fixtures/specs/, unmodified copies), by its
--- canonical path (jails bind canonical paths).
function H.spec(rel)
  local p = H.src .. "/tests/fixtures/specs/" .. rel
  local rp = io.popen("realpath -e '" .. p:gsub("'", "'\\''") .. "'")
  local canonical = rp:read("l")
  rp:close()
  return assert(canonical, p .. ": no such fixture")
end

--- Runs the clawlua binary with args; returns proc.run's result.
function H.clawlua(args, opts)
  opts = opts or {}
  local cmd = { H.bin }
  for _, a in ipairs(args) do cmd[#cmd + 1] = a end
  for k, v in pairs(opts) do cmd[k] = v end
  if cmd.timeout == nil then cmd.timeout = 60 end
  return assert(claw.proc.run(cmd))
end

--- Environment for a stock lua5.4 child that loads this build's clawlua.so. Under the
--- sanitizer build the .so needs its runtime preloaded into the interpreter.
function H.lua_env(extra)
  local env = { LUA_CPATH = H.so_dir .. "/?.so;;" }
  local preload = os.getenv("CLAWLUA_LUA_PRELOAD")
  if preload and preload ~= "" then env.LD_PRELOAD = preload end
  for k, v in pairs(extra or {}) do env[k] = v end
  return env
end

--- Runs stock lua5.4 with clawlua.so on the cpath.
function H.lua(args, opts)
  opts = opts or {}
  local cmd = { "lua5.4" }
  for _, a in ipairs(args) do cmd[#cmd + 1] = a end
  for k, v in pairs(opts) do cmd[k] = v end
  cmd.env = H.lua_env(cmd.env)
  if cmd.timeout == nil then cmd.timeout = 60 end
  return assert(claw.proc.run(cmd))
end

--- Runs a shell command line; returns stdout, or raises with its stderr.
function H.sh(line, opts)
  opts = opts or {}
  local r = assert(claw.proc.run { "sh", "-c", line, timeout = opts.timeout or 60, stdin = opts.stdin })
  if r.code ~= 0 and not opts.may_fail then
    error(("sh -c %q failed (%s): %s"):format(line, tostring(r.code or r.signal_name), r.stderr), 2)
  end
  return r.stdout, r
end

function H.fds() return claw.proc.diagnostics().fds end

--- The cgroup directories (every hierarchy clawlua uses) that process pid's jails made.
function H.cgroups_of(pid)
  local info = claw.jail.cgroup_info()
  local dirs = {}
  for _, d in pairs(info.v1 or {}) do dirs[#dirs + 1] = d end
  if info.v2 then dirs[#dirs + 1] = info.v2 end
  local found = {}
  for _, d in ipairs(dirs) do
    local out = H.sh(("ls -d '%s'/clawlua-%d-* 2>/dev/null || true"):format(d, pid))
    for line in out:gmatch("[^\n]+") do found[#found + 1] = line end
  end
  return found
end


function H.children() return #claw.proc.diagnostics().children end

--- Waits until pred() is true or the timeout passes; returns pred()'s last value.
function H.eventually(pred, timeout)
  local deadline = claw.now() + (timeout or 5)
  while true do
    local v = pred()
    if v or claw.now() > deadline then return v end
    claw.sleep(0.01)
  end
end

--- Lets the loop settle (reaping dropped children, closing handles) and runs a full GC.
function H.settle()
  for _ = 1, 3 do
    collectgarbage("collect")
    claw.sleep(0.02)
  end
end

function H.is_root()
  local out = H.sh("id -u")
  return out:match("^0") ~= nil
end

--- Creates a temporary directory; returns its path.
--- Creates a temporary directory; returns its path. A tag ("jail") names the spec that owns it,
--- so a spec can tell its own mounts from those of specs running beside it.
function H.tmpdir(tag)
  local prefix = tag and ("/tmp/clawlua-test." .. tag .. ".") or "/tmp/clawlua-test."
  return (H.sh("mktemp -d " .. prefix .. "XXXXXX"):gsub("%s+$", ""))
end

function H.rm_rf(path)
  assert(path:match("^/tmp/clawlua%-test"), "refusing to remove " .. path)
  H.sh("rm -rf '" .. path .. "'")
end

function H.write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

function H.read_file(path)
  local f = assert(io.open(path, "rb"))
  local d = f:read("a")
  f:close()
  return d
end

--- Starts tests/integration/httpd.py. Returns a server table with url(path) and close().
function H.httpd(unix_path)
  local argv = { "python3", H.src .. "/tests/integration/httpd.py", stdout = "pipe", stderr = "inherit" }
  if unix_path then
    argv[#argv + 1] = "--unix"
    argv[#argv + 1] = unix_path
  end
  local p = assert(claw.proc.spawn(argv))
  p.stdout:set_timeout(15)
  local first = assert(p.stdout:read_line(), "httpd did not start")
  local srv = { proc = p, port = tonumber(first), unix = unix_path }
  function srv.url(path) return ("http://127.0.0.1:%d%s"):format(srv.port or 0, path) end
  function srv.close()
    p:kill("KILL", "group")
    p:wait()
    p:close()
  end
  return srv
end

return H
