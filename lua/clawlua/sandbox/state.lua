-- The state dir: what every sandbox owns, written down before it is made, so that a runtime
-- that dies (kill -9) leaves a list `clawlua cleanup` can reclaim.
--
--   <base>/sandboxes/<id>/owner     "pid starttime netns\n" of the runtime that owns the sandbox
--                                   (netns: the network namespace its network objects live in)
--   <base>/sandboxes/<id>/objects   append-only log: "+ kind name\n" before an object is made,
--                                   "- kind name\n" once it is released
--   <base>/sandboxes/<id>/...       the sandbox's own files (scratch dirs)
--
-- <base> is $CLAWLUA_STATE_DIR, else /run/clawlua for root, else $XDG_RUNTIME_DIR/clawlua,
-- else /tmp/clawlua-<uid>. Kinds: pid ("pid:starttime"), cgroup (a directory prefix: every
-- directory whose path starts with it), dir, mount, and the network kinds of
-- clawlua.sandbox.net (netns, link, nft, ...).
local claw = require "clawlua"

local M = {}

--- A whole file's text, or nil when it cannot be read.
---@param path string
---@return string|nil
function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end
local read_file = M.read_file

--- The start time (clock ticks since boot) of a process, or nil when it does not exist (or is
--- a zombie: it has exited).
---@param pid integer
---@return integer|nil
function M.start_time(pid)
  local s = read_file(("/proc/%d/stat"):format(pid))
  if not s then return nil end
  -- comm may hold spaces and parentheses: fields restart after the last ')'
  local rest = s:match("^.*%)%s(.*)$")
  if not rest or rest:match("^[ZX]") then return nil end
  local i = 2 -- rest starts at field 3
  for field in rest:gmatch("%S+") do
    i = i + 1
    if i == 22 then return math.tointeger(tonumber(field)) end
  end
  return nil
end

local self_pid, self_start
--- This process's pid and start time.
function M.self()
  if not self_pid then
    local s = assert(read_file("/proc/self/stat"), "/proc/self/stat unreadable")
    self_pid = math.tointeger(tonumber(s:match("^(%d+)")))
    self_start = M.start_time(self_pid)
  end
  return self_pid, self_start
end

local self_netns
--- This process's network namespace ("net:[4026531840]"): the namespace a sandbox's addresses,
--- links and nft tables live in.
---@return string
function M.netns()
  if not self_netns then self_netns = claw.proc.namespace("net") or "net:[?]" end
  return self_netns
end

--- The cgroup prefixes of this runtime's jails and VMMs (clawlua-<pid>- under each hierarchy
--- it is in, sorted): a sandbox records them before its first jail or VMM, so that `clawlua
--- cleanup` reclaims the cgroups a killed runtime left.
---@return string[]
function M.cgroup_prefixes()
  local info = claw.jail.cgroup_info()
  local pid = M.self()
  local dirs = {}
  for _, d in pairs(info.v1 or {}) do dirs[#dirs + 1] = d end
  if info.v2 then dirs[#dirs + 1] = info.v2 end
  table.sort(dirs)
  for i, d in ipairs(dirs) do dirs[i] = ("%s/clawlua-%d-"):format(d, pid) end
  return dirs
end

--- Whether the process pid with that start time still runs.
function M.alive(pid, start)
  local st = M.start_time(pid)
  return st ~= nil and (start == nil or st == start)
end

--- Sets the base state directory for this process (nil: back to the default).
---@param dir string|nil
function M.set_base(dir)
  assert(dir == nil or (type(dir) == "string" and dir:sub(1, 1) == "/"), "state.set_base: absolute path expected")
  M.override = dir
end

--- The base state directory.
---@return string
function M.base()
  if M.override then return M.override end
  local env = os.getenv("CLAWLUA_STATE_DIR")
  if env and env ~= "" then return env end
  local uid = read_file("/proc/self/status")
  uid = uid and uid:match("\nUid:%s*(%d+)") or "0"
  if uid == "0" then return "/run/clawlua" end
  local xdg = os.getenv("XDG_RUNTIME_DIR")
  if xdg and xdg ~= "" then return xdg .. "/clawlua" end
  return "/tmp/clawlua-" .. uid
end

local function sandboxes_dir(base) return (base or M.base()) .. "/sandboxes" end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
M.shell_quote = shell_quote

--- Runs busybox (static, so it starts fast) with args; its stdout, or nil and the message
--- (prefixed with `what` when given).
function M.busybox(args, what)
  local argv = { "/bin/busybox" }
  for i, a in ipairs(args) do argv[i + 1] = a end
  argv.timeout = 30
  local r, err = claw.proc.run(argv)
  if r and r.code ~= 0 then err = (r.stderr ~= "" and r.stderr or r.stdout):gsub("%s+$", "") end
  if not r or r.code ~= 0 then return nil, what and ("%s: %s"):format(what, err) or err end
  return r.stdout
end

---@class clawlua.sandbox.state
---@field id string
---@field dir string
local Record = {}
Record.__index = Record

-- Spare state dirs: directories cost a process (busybox mkdir) to make, so they are made a few
-- at a time, each with its owner file, as sandboxes/.spare-<pid>-<n>, and a new sandbox takes
-- one with rename(2). A batch is refilled in the background when the last spare is taken. Spares
-- of a dead runtime are reclaimed by `clawlua cleanup` like any sandbox; this runtime's are
-- removed when its Lua state closes.
M.spare_batch = 4
M.subdirs = { "work", "tmp", "etc" }
local spares, spare_seq, refilling = {}, 0, nil

local function write_owner(dir)
  local pid, start = M.self()
  local f = io.open(dir .. "/owner", "wb")
  if not f then return nil, "state dir " .. dir .. ": cannot write owner" end
  f:write(("%d %d %s\n"):format(pid, start, M.netns()))
  f:close()
  return true
end

local function make_spares(base)
  local pid = M.self()
  local args, made = { "mkdir", "-p", "-m", "0700" }, {}
  for _ = 1, M.spare_batch do
    spare_seq = spare_seq + 1
    local d = ("%s/.spare-%d-%d"):format(sandboxes_dir(base), pid, spare_seq)
    for _, sub in ipairs(M.subdirs) do args[#args + 1] = d .. "/" .. sub end
    made[#made + 1] = d
  end
  local ok, err = M.busybox(args, "state dir " .. sandboxes_dir(base))
  if not ok then return nil, err end
  for _, d in ipairs(made) do
    if write_owner(d) then spares[#spares + 1] = { dir = d, base = base } end
  end
  return true
end

-- Removes this runtime's spares when its Lua state closes (a finaliser cannot wait: blocking).
local sentinel = setmetatable({}, { __gc = function()
  for _, s in ipairs(spares) do os.execute("/bin/busybox rm -rf " .. M.shell_quote(s.dir)) end
end })
M._sentinel = sentinel

local function take_spare(base)
  for i = #spares, 1, -1 do
    local s = table.remove(spares, i)
    if s.base == base then return s.dir end
    os.execute("/bin/busybox rm -rf " .. M.shell_quote(s.dir)) -- the base changed: drop it
  end
  local ok, err = make_spares(base)
  if not ok then return nil, err end
  return table.remove(spares).dir
end

local function refill(base)
  if #spares > 0 or refilling then return end
  refilling = claw.spawn(function()
    make_spares(base)
    refilling = nil
  end)
  refilling:set_daemon(true)
end

--- Creates the state dir of sandbox id (with work/, tmp/ and etc/) and writes the owner.
---@param id string
---@return clawlua.sandbox.state|nil, string|nil
function M.open(id)
  assert(type(id) == "string" and id:match("^[%w_.-]+$") and id:sub(1, 1) ~= ".",
    "state.open: bad sandbox id")
  local base = M.base()
  local dir = sandboxes_dir(base) .. "/" .. id
  if refilling and #spares == 0 then refilling:join() end
  local spare, err = take_spare(base)
  if not spare then return nil, err end
  local ok, rerr = os.rename(spare, dir)
  if not ok then
    os.execute("/bin/busybox rm -rf " .. M.shell_quote(spare))
    return nil, ("state dir %s: %s"):format(dir, rerr)
  end
  refill(base)
  local log, lerr = io.open(dir .. "/objects", "ab")
  if not log then return nil, "state dir " .. dir .. ": " .. tostring(lerr) end
  log:setvbuf("no")
  return setmetatable({ id = id, dir = dir, log = log, live = {} }, Record)
end

--- Writes what `clawlua ps` shows about the sandbox (a flat table of strings and numbers).
function Record:write_meta(t)
  local f = io.open(self.dir .. "/meta", "wb")
  if not f then return nil, "state dir " .. self.dir .. ": cannot write meta" end
  f:write(claw.json.encode(t))
  f:close()
  return true
end

--- Writes down an object before it is made.
-- The log is usable: open, and not already finalized (finalizers at exit run in any order).
local function usable(self) return io.type(self.log) == "file" end

function Record:record(kind, name)
  assert(usable(self), "state record is closed")
  assert(not tostring(name):find("\n"), "state: object names cannot hold newlines")
  self.log:write(("+ %s %s\n"):format(kind, name))
  self.live[kind .. " " .. name] = true
end

--- Crosses an object off once released.
function Record:forget(kind, name)
  if not usable(self) then return end
  if not self.live[kind .. " " .. name] then return end
  self.log:write(("- %s %s\n"):format(kind, name))
  self.live[kind .. " " .. name] = nil
end

--- Crosses off everything still recorded (released, or written down by a new owner now) and
--- removes the state dir.
---@return boolean|nil, string|nil
function Record:release_all()
  if usable(self) then
    local keys = {}
    for key in pairs(self.live) do keys[#keys + 1] = key end
    table.sort(keys)
    for _, key in ipairs(keys) do self:forget(key:match("^(%S+) (.*)$")) end
  end
  return self:close()
end

--- Removes the state dir itself. When something recorded was not released, the dir is kept
--- and handed over to `clawlua cleanup` (its owner becomes pid 0, which never runs).
---@return boolean|nil, string|nil
function Record:close()
  if not self.log then return true end
  if usable(self) then self.log:close() end
  self.log = nil
  local left = {}
  for key in pairs(self.live) do left[#left + 1] = key end
  if #left > 0 then
    table.sort(left)
    local f = io.open(self.dir .. "/owner", "wb")
    if f then
      f:write(("0 0 %s\n"):format(M.netns()))
      f:close()
    end
    return nil, ("state dir %s kept for clawlua cleanup: %s not released"):format(self.dir,
      table.concat(left, ", "))
  end
  return M.busybox({ "rm", "-rf", self.dir }, "state dir " .. self.dir)
end

--- Replays an objects log into a list of live {kind=, name=} in creation order.
function M.replay(text)
  local order, live = {}, {}
  for op, kind, name in (text or ""):gmatch("([+-]) (%S+) ([^\n]*)\n") do
    local key = kind .. " " .. name
    if op == "+" then
      if not live[key] then order[#order + 1] = { kind = kind, name = name } end
      live[key] = true
    else
      live[key] = nil
    end
  end
  local out = {}
  for _, o in ipairs(order) do
    if live[o.kind .. " " .. o.name] then out[#out + 1] = o end
  end
  return out
end

--- Every sandbox in the state dir: {id, dir, pid, start, alive, meta, objects = {{kind, name}...}}.
---@param base string|nil
---@return table[]
function M.list(base)
  local dir = sandboxes_dir(base)
  local r = claw.proc.run { "/bin/busybox", "ls", "-1A", dir, timeout = 30 }
  local out = {}
  if not r or r.code ~= 0 then return out end
  for id in r.stdout:gmatch("[^\n]+") do
    local d = dir .. "/" .. id
    local owner = read_file(d .. "/owner") or ""
    local pid, start, netns = owner:match("^(%d+) (%d+) ?(%S*)")
    pid, start = math.tointeger(tonumber(pid)), math.tointeger(tonumber(start))
    local meta = read_file(d .. "/meta")
    meta = meta and claw.json.decode(meta) or {}
    out[#out + 1] = { id = id, dir = d, pid = pid, start = start, meta = meta,
      netns = netns ~= "" and netns or nil,
      alive = pid ~= nil and M.alive(pid, start), objects = M.replay(read_file(d .. "/objects")) }
  end
  return out
end

return M
