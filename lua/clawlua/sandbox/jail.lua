-- The jail backend of clawlua.sandbox: every exec is one clawlua.jail process (user, pid,
-- mount, ipc, uts, cgroup namespaces; the network namespace of the sandbox's network, or a new
-- one with loopback only) in the same root:
--   /bin          busybox (static, read-only) and a link per applet: sh, ls, cat, wget, nc, ...
--   /etc          passwd, group, hosts (read-only files of the sandbox's state dir)
--   <workdir>     the sandbox's scratch dir (/work by default), writable, the cwd
--   /tmp          writable, the sandbox's own
--   files.readonly binds of the policy; /proc, /dev (null zero full random urandom tty)
-- The scratch dir and /tmp are directories of the state dir on the host, so what one exec
-- writes the next one sees; everything else is rebuilt (in ~a millisecond) by each exec.
-- Resources apply per exec through the jail's cgroups (memory, pids, cpu); the sandbox's
-- lifetime is enforced by clawlua.sandbox.
local claw = require "clawlua"
local pseccomp = require "clawlua.policy.seccomp"

local M = {}

M.busybox = "/bin/busybox"
M.applets = {
  "sh", "ash", "ls", "cat", "echo", "printf", "test", "[", "true", "false", "env", "pwd", "mkdir",
  "rm", "rmdir", "cp", "mv", "ln", "touch", "chmod", "stat", "find", "grep", "egrep", "sed", "awk",
  "head", "tail", "wc", "sort", "uniq", "cut", "tr", "tee", "xargs", "basename", "dirname", "sleep",
  "date", "id", "whoami", "hostname", "uname", "ps", "kill", "wget", "nslookup", "nc", "ping",
  "ip", "ifconfig", "netstat", "tar", "gzip", "gunzip", "zcat", "md5sum", "sha256sum", "base64",
  "od", "hexdump", "xxd", "diff", "cmp", "seq", "expr", "timeout", "readlink", "realpath", "du",
  "df", "which", "yes", "vi", "less", "more", "dd", "truncate", "mktemp", "nproc", "free", "top",
  "usleep", "tac", "rev", "fold", "nl", "paste", "split", "bc", "dc", "sha1sum", "sha512sum",
  "traceroute", "telnet", "ftpget", "unzip", "xz", "unxz", "bzip2", "bunzip2", "unshare",
  "mount", "umount", "nsenter", "setsid",
}

local ETC = {
  passwd = "root:x:0:0:root:/work:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
  group = "root:x:0:\nnogroup:x:65534:\n",
  hosts = "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost\n",
}

-- The jail's /bin: a copy of busybox and a link per applet, made once per busybox binary in
-- the state base (<base>/bin-busybox-<size>, shared by every sandbox and kept), because one
-- bind of a directory costs far less per exec than a hundred symlinks.
local bin_dirs = {}
local function bin_dir()
  local base = require("clawlua.sandbox.state").base()
  if bin_dirs[base] then return bin_dirs[base] end
  local f = io.open(M.busybox, "rb")
  if not f then return nil, M.busybox .. " not found (Debian package busybox-static)" end
  local size = f:seek("end")
  f:close()
  local dir = ("%s/bin-busybox-%d"):format(base, size)
  local probe = io.open(dir .. "/sh", "rb")
  if probe then
    probe:close()
  else
    local argv = { "/bin/busybox", "sh", "-c", [[
set -e
t="$1"; d="$1.new.$$"; src="$2"
shift 2
rm -rf "$d"
mkdir -p "$d"
cp "$src" "$d/busybox"
chmod 0755 "$d" "$d/busybox"
for a in "$@"; do ln -s busybox "$d/$a"; done
if [ -e "$t/sh" ] || ! mv "$d" "$t" 2>/dev/null; then rm -rf "$d"; fi
]], "sh", dir, M.busybox, timeout = 60 }
    table.move(M.applets, 1, #M.applets, #argv + 1, argv)
    local r, err = claw.proc.run(argv)
    if not r then return nil, "jail root: " .. err end
    if r.code ~= 0 then return nil, "jail root " .. dir .. ": " .. r.stderr end
  end
  bin_dirs[base] = dir
  return dir
end

-- The options every exec of this sandbox shares.
local function base_options(p, st, net, bin)
  local workdir = p.files.workdir
  local binds = {
    { src = bin, dst = "/bin" },
    { src = st.dir .. "/work", dst = workdir, rw = true },
    { src = st.dir .. "/tmp", dst = "/tmp", rw = true },
  }
  for _, name in ipairs { "passwd", "group", "hosts" } do
    binds[#binds + 1] = { src = st.dir .. "/etc/" .. name, dst = "/etc/" .. name }
  end
  local has = {}
  for _, b in ipairs(p.files.readonly) do
    binds[#binds + 1] = { src = b.src, dst = b.dst }
    has[b.dst] = true
  end
  local symlinks = {}
  if has["/usr"] then -- a merged-/usr host tree: its libraries where its programs expect them
    for _, l in ipairs { "lib", "lib64", "sbin" } do
      if not has["/" .. l] then symlinks["/" .. l] = "usr/" .. l end
    end
  end
  local env = { PATH = "/bin:/usr/local/bin:/usr/bin", HOME = workdir, TMPDIR = "/tmp",
    LANG = "C.UTF-8", USER = "root" }
  for k, v in pairs(p.env) do env[k] = v end
  local o = {
    binds = binds, symlinks = symlinks, hostname = "sandbox", net = "new",
    cgroup = { memory = p.resources.memory_mib << 20, pids = p.resources.pids, cpu = p.resources.cpu },
    rlimits = { core = 0 },
  }
  if net then
    for k, v in pairs(net:jail_options() or {}) do
      if k == "binds" then
        for _, b in ipairs(v) do binds[#binds + 1] = b end
      else
        o[k] = v
      end
    end
  end
  return o, env
end

---@class clawlua.sandbox.jail
local J = {}
J.__index = J

--- Starts the jail backend of a sandbox (nothing runs until the first exec).
---@param opts {id: string, policy: clawlua.policy, net: table|nil, state: clawlua.sandbox.state}
---@return clawlua.sandbox.jail|nil, string|nil
function M.start(opts)
  local p, st = opts.policy, opts.state
  local filter, ferr = pseccomp.filter(p.seccomp)
  if filter == nil then return nil, "seccomp " .. p.seccomp .. ": " .. tostring(ferr) end
  for name, text in pairs(ETC) do
    local f = io.open(st.dir .. "/etc/" .. name, "wb")
    if not f then return nil, "state dir " .. st.dir .. ": cannot write etc/" .. name end
    f:write(text)
    f:close()
  end
  local bin, berr = bin_dir()
  if not bin then return nil, berr end
  local o, env = base_options(p, st, opts.net, bin)
  o.seccomp = filter or nil
  -- the jail's cgroups are named clawlua-<runtime pid>-<n> under the runtime's own cgroup
  local cgroups = require("clawlua.sandbox.state").cgroup_prefixes()
  for _, c in ipairs(cgroups) do st:record("cgroup", c) end
  return setmetatable({ id = opts.id, policy = p, state = st, options = o, env = env,
    workdir = p.files.workdir, running = {}, cgroups = cgroups, paused = false }, J)
end

-- Reads a stream to its end: keeps at most max bytes (the rest is counted and dropped),
-- hands every chunk to cb when given.
local function drain(s, max, cb)
  local parts, kept, dropped = {}, 0, 0
  while true do
    local chunk = s:read(65536)
    if not chunk or chunk == "" then break end
    if cb then cb(chunk) end
    local room = max - kept
    if room > 0 then
      local piece = #chunk > room and chunk:sub(1, room) or chunk
      parts[#parts + 1] = piece
      kept = kept + #piece
    end
    dropped = dropped + #chunk - math.min(#chunk, math.max(room, 0))
  end
  return table.concat(parts), dropped
end

local function release(self, proc, rec)
  if self.running[proc] then
    self.running[proc] = nil
    if proc:running() then proc:kill("KILL", "group") end
    proc:close()
    self.state:forget("pid", rec)
  end
end

--- Runs one command in the sandbox. o: argv (array part), stdin, env, env_clear, cwd,
--- timeout, max_output, on_stdout, on_stderr (validated by clawlua.sandbox).
function J:exec(o)
  local spawn = {}
  for k, v in pairs(self.options) do spawn[k] = v end
  for i, a in ipairs(o) do spawn[i] = a end
  local env = {}
  if not o.env_clear then
    for k, v in pairs(self.env) do env[k] = v end
  end
  for k, v in pairs(o.env or {}) do env[k] = v end
  spawn.env, spawn.env_clear = env, true -- nothing of the runtime's own environment gets in
  spawn.cwd = o.cwd or self.workdir
  spawn.stdin = o.stdin and "pipe" or "null"
  spawn.stdout, spawn.stderr = "pipe", "pipe"
  local t0 = claw.now()
  local proc, err, code = claw.jail.spawn(spawn)
  if not proc then return nil, err, code end
  local pid = proc:pid()
  local rec = ("%d:%d"):format(pid, require("clawlua.sandbox.state").start_time(pid) or 0)
  self.state:record("pid", rec)
  self.running[proc] = rec
  if self.paused then proc:kill("STOP", "group") end
  local _guard <close> = setmetatable({}, { __close = function() release(self, proc, rec) end })
  local max = o.max_output
  local out_t = claw.spawn(drain, proc.stdout, max, o.on_stdout)
  local err_t = claw.spawn(drain, proc.stderr, max, o.on_stderr)
  local _readers <close> = setmetatable({}, { __close = function()
    out_t:cancel()
    err_t:cancel()
  end })
  local in_t
  if o.stdin then
    in_t = claw.spawn(function()
      pcall(proc.stdin.write, proc.stdin, o.stdin)
      proc.stdin:close()
    end)
  end
  local status = proc:wait(o.timeout)
  local timed_out = false
  if not status then
    timed_out = true
    proc:kill("KILL", "group")
    status = assert(proc:wait())
  end
  local stdout, dout = out_t:join()
  local stderr, derr = err_t:join()
  if in_t then in_t:cancel() end
  return {
    code = status.code, signal = status.signal, signal_name = status.signal_name,
    stdout = stdout, stderr = stderr, timed_out = timed_out, truncated = dout + derr > 0,
    duration = claw.now() - t0, oom_killed = status.oom_killed or nil,
  }
end

local function signal_all(self, sig)
  for proc in pairs(self.running) do
    if proc:running() then proc:kill(sig, "group") end
  end
end

--- Stops every running command (SIGSTOP to each exec's process group).
function J:pause()
  self.paused = true
  signal_all(self, "STOP")
  return true
end

function J:resume()
  self.paused = false
  signal_all(self, "CONT")
  return true
end

--- A tarball of the scratch dir and /tmp (the jail's whole writable state).
function J:snapshot(o)
  local path = ("%s/%s.tar.gz"):format(o.dir, self.id)
  local r, err = claw.proc.run { "/bin/busybox", "tar", "-czf", path, "-C", self.state.dir, "work",
    "tmp", timeout = 300 }
  if not r then return nil, "snapshot: " .. err end
  if r.code ~= 0 then return nil, "snapshot: " .. r.stderr:gsub("%s+$", "") end
  local f = io.open(path, "rb")
  local size = f and f:seek("end")
  if f then f:close() end
  return { path = path, format = "tar.gz", bytes = size, contents = { self.workdir, "/tmp" } }
end

function J:info()
  local n = 0
  for _ in pairs(self.running) do n = n + 1 end
  return { running = n, root = "busybox", scratch = self.state.dir .. "/work",
    workdir = self.workdir }
end

--- Kills every running command (their jail handles remove their cgroups) and crosses the
--- cgroup prefixes off the state record. Does not yield.
function J:close()
  -- killed, not closed: an exec waiting on the process collects it and returns its result
  for proc, rec in pairs(self.running) do
    if proc:running() then proc:kill("KILL", "group") end
    self.state:forget("pid", rec)
  end
  for _, c in ipairs(self.cgroups) do self.state:forget("cgroup", c) end
  return true
end

return M
