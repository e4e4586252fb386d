-- Sandboxes from policies: one call wires a backend (jail or vm), its network, seccomp, the
-- state dir and audit. Every step is an audit event carrying the sandbox id; destroy releases
-- everything in reverse order, also after a partial create, and is what <close>, __gc and the
-- end of the policy's lifetime call.
local claw = require "clawlua"
local policy = require "clawlua.policy"
local state = require "clawlua.sandbox.state"

local M = {}

local audit = claw.audit
local registry = setmetatable({}, { __mode = "v" })

local function bad_field(name, msg) error(("bad field '%s' (%s)"):format(name, msg), 3) end

local function random_id()
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(6) or tostring(claw.now())
  if f then f:close() end
  return "sb-" .. b:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
end

local function wants_network(p)
  return p.network.egress == "allow" or #p.network.allow > 0
end

local function load_backend(name)
  if name == "jail" then return require "clawlua.sandbox.jail" end
  local ok, mod = pcall(require, "clawlua.sandbox." .. name)
  if not ok then
    return nil, ("sandbox: the %s backend is not available (%s)"):format(name,
      tostring(mod):match("^[^\n]*"))
  end
  return mod
end

---@class clawlua.sandbox.handle
---@field id string
---@field backend string
local SB = {}

-- Process-wide use, held against the quota of the policy a sandbox is created (or exec'd) under:
-- sandboxes being created or live, their memory, commands running.
local usage = { sandboxes = 0, memory_mib = 0, execs = 0 }

local function over_quota(what, q, fields)
  audit.emit("sandbox.quota", fields)
  return nil, ("%s: quota: %s"):format(what, q), "EDQUOT"
end

-- Reserves a sandbox's share of the quota (released by teardown); nil, msg, "EDQUOT" if over.
local function reserve(priv, p)
  local q = p.quota
  if usage.sandboxes >= q.max_sandboxes then
    return over_quota("sandbox.create", ("%d sandboxes live (max_sandboxes = %d)")
      :format(usage.sandboxes, q.max_sandboxes), { sandbox = priv.id, policy = p.name,
      field = "max_sandboxes", used = usage.sandboxes, limit = q.max_sandboxes })
  end
  local mem = p.resources.memory_mib
  if usage.memory_mib + mem > q.memory_mib then
    return over_quota("sandbox.create", ("%d MiB of memory live + %d MiB asked > memory_mib = %d")
      :format(usage.memory_mib, mem, q.memory_mib), { sandbox = priv.id, policy = p.name,
      field = "memory_mib", used = usage.memory_mib, asked = mem, limit = q.memory_mib })
  end
  usage.sandboxes, usage.memory_mib = usage.sandboxes + 1, usage.memory_mib + mem
  priv.reserved = mem
  return true
end

local function release(priv)
  if priv.reserved then
    usage.sandboxes, usage.memory_mib = usage.sandboxes - 1, usage.memory_mib - priv.reserved
    priv.reserved = nil
  end
end

--- What the live sandboxes of this runtime use of the quotas: {sandboxes, memory_mib, execs}.
function M.usage() return { sandboxes = usage.sandboxes, memory_mib = usage.memory_mib, execs = usage.execs } end

local function emit(self, kind, fields)
  fields = fields or {}
  fields.sandbox = self.id
  audit.emit(kind, fields)
end

-- Releases what the sandbox owns, in reverse order of creation. sync: from __gc (no yield).
local function teardown(priv, sync)
  release(priv)
  if priv.timer then
    priv.timer:cancel()
    priv.timer = nil
  end
  local errs = {}
  if priv.handle then
    local ok, err = pcall(priv.handle.close, priv.handle, sync)
    if not ok then errs[#errs + 1] = tostring(err) end
    priv.handle = nil
  end
  if priv.net then
    local ok, err = pcall(priv.net.close, priv.net)
    if not ok then errs[#errs + 1] = tostring(err) end
    priv.net = nil
  end
  if priv.state then
    local st = priv.state
    priv.state = nil
    if sync then -- a finalizer: no waiting (the log may be finalized already at exit)
      if io.type(st.log) == "file" then st.log:close() end
      st.log = nil
      os.execute("/bin/busybox rm -rf " .. state.shell_quote(st.dir))
    else
      local ok, err = st:close()
      if not ok then errs[#errs + 1] = err end
    end
  end
  return #errs == 0 or table.concat(errs, "; ")
end

local privs = setmetatable({}, { __mode = "k" })

local function priv_of(self)
  local p = privs[self]
  if not p then error("sandbox: not a sandbox handle", 3) end
  return p
end

local function live(self, what)
  local p = priv_of(self)
  if p.state_name == "destroyed" then
    return nil, ("%s: sandbox %s is destroyed"):format(what, self.id), "ESRCH"
  end
  return p
end

-- id and backend are read-only fields: they live in the private part, not in the handle.
SB.__index = function(self, k)
  if k == "id" or k == "backend" then
    local p = privs[self]
    return p and p[k]
  end
  return SB[k]
end
SB.__name = "clawlua.sandbox"
SB.__tostring = function(self) return ("clawlua.sandbox (%s, %s)"):format(self.id, self.backend) end
SB.__newindex = function(_, k) error(("sandbox: field '%s' is read-only"):format(tostring(k)), 2) end

--- Creates a sandbox from a policy (a table from clawlua.policy, a raw policy table, or a path).
---@param p clawlua.policy|table|string
---@param opts {id: string|nil, backend: string|nil}|nil
---@return clawlua.sandbox.handle|nil, string|nil, string|nil
function M.create(p, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("bad argument #2 to 'create' (table expected)", 2) end
  local err
  if type(p) == "string" then
    p, err = policy.load(p)
    if not p then return nil, err, "EINVAL" end
  elseif type(p) == "table" and not policy.is_policy(p) then
    p, err = policy.from_table(p, "policy")
    if not p then return nil, err, "EINVAL" end
  elseif type(p) ~= "table" then
    error("bad argument #1 to 'create' (policy expected, got " .. type(p) .. ")", 2)
  end
  local id = opts.id or random_id()
  if type(id) ~= "string" or not id:match("^[%w_.-]+$") or #id > 64 then
    bad_field("id", "1 to 64 of [A-Za-z0-9_.-] expected")
  end
  if registry[id] then return nil, ("sandbox %s exists already"):format(id), "EEXIST" end
  local backend_name = opts.backend or p.backend
  if backend_name ~= "jail" and backend_name ~= "vm" then bad_field("backend", "\"jail\" or \"vm\" expected") end
  local mine = {} -- this sandbox's copy: update_policy replaces its network, not the caller's
  for k, v in pairs(p) do mine[k] = v end
  local origin = p -- policy.reload(origin) reaches this sandbox
  p = mine
  local self = setmetatable({}, SB)
  local priv = { id = id, backend = backend_name, policy = p, origin = origin,
    created = claw.loop.time(), state_name = "creating" }
  local reserved, qerr, qcode = reserve(priv, p)
  if not reserved then return nil, qerr, qcode end
  privs[self] = priv
  emit(self, "sandbox.create", { policy = p.name, backend = backend_name })
  local function fail(msg, code)
    teardown(priv, false)
    priv.state_name = "destroyed"
    emit(self, "sandbox.create_failed", { error = msg })
    return nil, msg, code
  end
  -- a step that raises (a bug, or the calling task cancelled while a step waits) releases
  -- what the earlier steps made before the error goes on
  local function step(fn, ...)
    local res = table.pack(pcall(fn, ...))
    if res[1] then return table.unpack(res, 2, res.n) end
    teardown(priv, false)
    priv.state_name = "destroyed"
    emit(self, "sandbox.create_failed", { error = tostring(res[2]) })
    error(res[2], 0)
  end
  local backend, berr = load_backend(backend_name)
  if not backend then return fail(berr, "ENOTSUP") end
  local st, serr = step(state.open, id)
  if not st then return fail(serr, "EIO") end
  priv.state = st
  st:write_meta { backend = backend_name, policy = p.name, created = priv.created }
  if wants_network(p) then
    local ok, net = pcall(require, "clawlua.sandbox.net")
    if not ok then
      return fail(("sandbox: policy %s allows egress but clawlua.sandbox.net is not available")
        :format(p.name), "ENOTSUP")
    end
    local n, nerr = step(net.create, { id = id, network = p.network, kind = backend_name,
      record = function(kind, name) st:record(kind, name) end,
      forget = function(kind, name) st:forget(kind, name) end })
    if not n then return fail(nerr, "EIO") end
    priv.net = n
  end
  local h, herr = step(backend.start, { id = id, policy = p, net = priv.net, state = st })
  if not h then return fail(herr, "EIO") end
  priv.handle = h
  priv.state_name = "running"
  registry[id] = self
  local weak = setmetatable({ self }, { __mode = "v" })
  priv.timer = claw.spawn(function()
    claw.sleep(p.resources.lifetime_s)
    local sb = weak[1]
    if sb then
      emit(sb, "sandbox.lifetime", { lifetime_s = p.resources.lifetime_s })
      priv.timer = nil
      sb:destroy()
    end
  end)
  priv.timer:set_daemon(true)
  emit(self, "sandbox.start", { backend = backend_name, state_dir = st.dir })
  return self
end

local function check_exec(o)
  if type(o) ~= "table" then error("bad argument #1 to 'exec' (table expected)", 3) end
  if #o == 0 then bad_field("1", "a command (argv) expected") end
  for i, a in ipairs(o) do
    if type(a) ~= "string" then bad_field(tostring(i), "string expected, got " .. type(a)) end
  end
  for k, v in pairs(o) do
    if type(k) ~= "number" then
      local t = ({ stdin = "string", env = "table", env_clear = "boolean", cwd = "string",
        timeout = "number", max_output = "number", on_stdout = "function", on_stderr = "function" })[k]
      if not t then bad_field(tostring(k), "unknown field") end
      if type(v) ~= t then bad_field(k, t .. " expected, got " .. type(v)) end
    end
  end
  for k, v in pairs(o.env or {}) do
    if type(k) ~= "string" or type(v) ~= "string" then bad_field("env", "string keys and values expected") end
  end
  if o.timeout and o.timeout < 0 then bad_field("timeout", "non-negative seconds expected") end
  if o.cwd and o.cwd:sub(1, 1) ~= "/" then bad_field("cwd", "an absolute path expected") end
end

-- A hook said no: audited, then the policy's on_denied hook is told (its answer is ignored).
local function denied(self, priv, fields)
  emit(self, "policy.deny", fields)
  policy.call_hook(priv.policy, "on_denied", fields.hook, fields.reason, self)
end

-- One command without hooks (exec and the file calls use it).
local function run(self, priv, o)
  if priv.state_name == "paused" then
    return nil, ("exec: sandbox %s is paused"):format(self.id), "EAGAIN"
  end
  local cap = priv.policy.resources.max_output
  local x = {}
  for k, v in pairs(o) do x[k] = v end
  x.max_output = math.min(math.tointeger(o.max_output) or cap, cap)
  return priv.handle:exec(x)
end

--- Runs a command: {argv..., stdin=, env=, env_clear=, cwd=, timeout=, max_output=,
--- on_stdout=fn, on_stderr=fn} -> {code, signal?, stdout, stderr, timed_out, truncated, duration}.
function SB:exec(o)
  local priv, err, code = live(self, "exec")
  if not priv then return nil, err, code end
  check_exec(o)
  local argv = { table.unpack(o) }
  local ok, reason = policy.call_hook(priv.policy, "on_exec", argv, self)
  if not ok then
    denied(self, priv, { hook = "on_exec", argv = argv, reason = reason })
    return nil, ("exec: denied by policy %s: %s"):format(priv.policy.name, reason), "EPERM"
  end
  local q = priv.policy.quota
  if usage.execs >= q.max_execs then
    return over_quota("exec", ("%d commands running (max_execs = %d)"):format(usage.execs, q.max_execs),
      { sandbox = self.id, policy = priv.policy.name, field = "max_execs", used = usage.execs,
        limit = q.max_execs })
  end
  usage.execs = usage.execs + 1
  local _ <close> = setmetatable({}, { __close = function() usage.execs = usage.execs - 1 end })
  emit(self, "sandbox.exec", { argv = argv, cwd = o.cwd })
  local r, rerr, rcode = run(self, priv, o)
  if not r then
    emit(self, "sandbox.exec_failed", { argv = argv, error = rerr })
    return nil, rerr, rcode
  end
  emit(self, "sandbox.exec_done", { code = r.code, signal = r.signal, timed_out = r.timed_out,
    truncated = r.truncated, duration = r.duration, stdout_bytes = #r.stdout, stderr_bytes = #r.stderr })
  return r
end

local function file_hook(self, priv, op, path)
  local ok, reason = policy.call_hook(priv.policy, "on_file", op, path, self)
  if ok then return true end
  denied(self, priv, { hook = "on_file", op = op, path = path, reason = reason })
  return nil, ("%s %s: denied by policy %s: %s"):format(op, path, priv.policy.name, reason), "EPERM"
end

local function check_path(path, fn)
  if type(path) ~= "string" or path:sub(1, 1) ~= "/" or path:find("%z") then
    error(("bad argument #1 to '%s' (an absolute path expected)"):format(fn), 3)
  end
end

local function failure(op, path, r)
  local msg = (r.stderr ~= "" and r.stderr or r.stdout):gsub("%s+$", ""):gsub("^[^:]*: ", "")
  local code = msg:find("No such file") and "ENOENT" or msg:find("ermission denied") and "EACCES"
    or msg:find("Read%-only") and "EROFS" or msg:find("Not a directory") and "ENOTDIR" or "EIO"
  return nil, ("%s %s: %s"):format(op, path, msg), code
end

--- Writes a file in the sandbox (parents created): true | nil, msg, code.
function SB:write_file(path, data, o)
  local priv, err, code = live(self, "write_file")
  if not priv then return nil, err, code end
  check_path(path, "write_file")
  if type(data) ~= "string" then error("bad argument #2 to 'write_file' (string expected)", 2) end
  o = o or {}
  local mode = o.mode or tonumber("644", 8)
  if math.type(mode) ~= "integer" or mode < 0 or mode > tonumber("7777", 8) then
    bad_field("mode", "permission bits expected")
  end
  local ok, herr, hcode = file_hook(self, priv, "write_file", path)
  if not ok then return nil, herr, hcode end
  local r, rerr = run(self, priv, { "/bin/sh", "-c",
    'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1"', "sh", path,
    ("%o"):format(mode), stdin = data, timeout = o.timeout or 60 })
  if not r then return nil, rerr end
  if r.code ~= 0 then return failure("write_file", path, r) end
  emit(self, "sandbox.write_file", { path = path, bytes = #data, mode = ("%o"):format(mode) })
  return true
end

--- Reads a file of the sandbox: data | nil, msg, code ("EFBIG" when over max).
function SB:read_file(path, o)
  local priv, err, code = live(self, "read_file")
  if not priv then return nil, err, code end
  check_path(path, "read_file")
  o = o or {}
  local max = o.max or priv.policy.resources.max_output
  if math.type(max) ~= "integer" or max < 0 then bad_field("max", "a byte count expected") end
  local ok, herr, hcode = file_hook(self, priv, "read_file", path)
  if not ok then return nil, herr, hcode end
  local r, rerr = run(self, priv, { "/bin/cat", "--", path, max_output = max, timeout = o.timeout or 60 })
  if not r then return nil, rerr end
  if r.code ~= 0 then return failure("read_file", path, r) end
  if r.truncated then
    return nil, ("read_file %s: larger than %d bytes"):format(path, max), "EFBIG"
  end
  emit(self, "sandbox.read_file", { path = path, bytes = #r.stdout })
  return r.stdout
end

local TYPES = { ["directory"] = "dir", ["symbolic link"] = "link", ["regular file"] = "file",
  ["regular empty file"] = "file" }

--- Lists a directory of the sandbox: { {name=, type="file"|"dir"|"link"|"other", size=}, ... }
--- sorted by name.
function SB:list_dir(path)
  local priv, err, code = live(self, "list_dir")
  if not priv then return nil, err, code end
  check_path(path, "list_dir")
  local ok, herr, hcode = file_hook(self, priv, "list_dir", path)
  if not ok then return nil, herr, hcode end
  local r, rerr = run(self, priv, { "/bin/sh", "-c",
    'cd -- "$1" && for f in .* *; do case "$f" in .|..) continue;; esac; ' ..
    '[ -e "$f" ] || [ -L "$f" ] || continue; stat -c "%F/%s/%n" -- "$f"; printf "\\0"; done',
    "sh", path, timeout = 60 })
  if not r then return nil, rerr end
  if r.code ~= 0 then return failure("list_dir", path, r) end
  local out = {}
  for line in r.stdout:gmatch("([^%z]*)%z") do
    local t, size, name = line:match("^([^/]*)/(%d+)/(.*)\n$")
    if t then out[#out + 1] = { name = name, type = TYPES[t] or "other", size = tonumber(size) } end
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  emit(self, "sandbox.list_dir", { path = path, entries = #out })
  return out
end

--- Changes the network part of the policy live (one atomic update): true | nil, msg.
function SB:update_policy(u)
  local priv, err, code = live(self, "update_policy")
  if not priv then return nil, err, code end
  if type(u) ~= "table" then error("bad argument #1 to 'update_policy' (table expected)", 2) end
  for k in pairs(u) do
    if k ~= "network" then bad_field(tostring(k), "only 'network' changes live") end
  end
  if u.network == nil then return true end
  local n, nerr = policy.check_network(u.network, "update_policy")
  if not n then return nil, nerr, "EINVAL" end
  if not priv.net then
    if n.egress == "deny" and #n.allow == 0 then
      priv.policy.network = n
      emit(self, "sandbox.update_policy", { network = "none" })
      return true
    end
    return nil, ("update_policy: sandbox %s has no network (its policy denied all egress when it " ..
      "was created); create it with an allow list to change it live"):format(self.id), "ENOTSUP"
  end
  local ok, uerr = priv.net:update(n)
  if not ok then
    emit(self, "sandbox.update_policy_failed", { error = uerr })
    return nil, uerr, "EIO"
  end
  priv.policy.network = n
  emit(self, "sandbox.update_policy", { allow = #n.allow, egress = n.egress })
  return true
end

function SB:pause()
  local priv, err, code = live(self, "pause")
  if not priv then return nil, err, code end
  local ok, perr = priv.handle:pause()
  if not ok then return nil, perr end
  priv.state_name = "paused"
  emit(self, "sandbox.pause")
  return true
end

function SB:resume()
  local priv, err, code = live(self, "resume")
  if not priv then return nil, err, code end
  local ok, rerr = priv.handle:resume()
  if not ok then return nil, rerr end
  priv.state_name = "running"
  emit(self, "sandbox.resume")
  return true
end

--- Saves the sandbox's state under o.dir (jail: a tarball of the scratch dir and /tmp).
function SB:snapshot(o)
  local priv, err, code = live(self, "snapshot")
  if not priv then return nil, err, code end
  if type(o) ~= "table" or type(o.dir) ~= "string" then bad_field("dir", "a directory expected") end
  local r, serr = priv.handle:snapshot(o)
  if not r then return nil, serr end
  emit(self, "sandbox.snapshot", { dir = o.dir, path = r.path, bytes = r.bytes })
  return r
end

function SB:info()
  local priv = priv_of(self)
  local net = priv.net and priv.net:info() or { mode = priv.state_name == "destroyed" and "none" or "loopback" }
  local i = { id = self.id, backend = self.backend, state = priv.state_name,
    policy = policy.describe(priv.policy), created = priv.created, network = net,
    state_dir = priv.state and priv.state.dir or nil }
  if priv.handle then i.backend_info = priv.handle:info() end
  -- a VM whose VMM died (killed, crashed) runs nothing any more: "dead" until destroyed
  local bstate = i.backend_info and i.backend_info.state
  if (bstate == "exited" or bstate == "failed") and (i.state == "running" or i.state == "paused") then
    i.state = "dead"
  end
  return i
end

--- The policy the sandbox runs under (live network changes included).
function SB:policy() return priv_of(self).policy end

--- Releases everything (idempotent): true, or nil and what could not be released.
function SB:destroy()
  local priv = priv_of(self)
  if priv.state_name == "destroyed" then return true end
  priv.state_name = "destroyed"
  registry[self.id] = nil
  local ok = teardown(priv, false)
  emit(self, "sandbox.destroy", { error = ok ~= true and ok or nil })
  if ok ~= true then return nil, "destroy: " .. ok end
  return true
end

SB.__close = function(self) self:destroy() end
SB.__gc = function(self)
  local priv = privs[self]
  if priv and priv.state_name ~= "destroyed" then
    priv.state_name = "destroyed"
    teardown(priv, true)
    pcall(audit.emit, "sandbox.destroy", { sandbox = self.id, reason = "collected" })
  end
end

-- policy.reload(p): every live sandbox created from p takes its hooks and quota, and its
-- network through update_policy (one atomic firewall batch each); a sandbox whose update fails
-- keeps its network, and the failure is reported and audited.
policy.on_reload(function(p)
  local r = { updated = {}, failed = {} }
  local ids = {}
  for id in pairs(registry) do ids[#ids + 1] = id end
  table.sort(ids)
  for _, id in ipairs(ids) do
    local sb = registry[id]
    local priv = sb and privs[sb]
    if priv and priv.origin == p and priv.state_name ~= "destroyed" then
      priv.policy.hooks, priv.policy.quota = p.hooks, p.quota
      local ok, err = sb:update_policy { network = p.network }
      if ok then
        r.updated[#r.updated + 1] = id
      else
        r.failed[#r.failed + 1] = { id = id, error = err }
        emit(sb, "policy.reload_failed", { policy = p.name, error = err })
      end
    end
  end
  return r
end)

--- info() of every live sandbox of this runtime.
function M.list()
  local ids = {}
  for id in pairs(registry) do ids[#ids + 1] = id end
  table.sort(ids)
  local out = {}
  for _, id in ipairs(ids) do out[#out + 1] = registry[id]:info() end
  return out
end

--- The live sandbox with that id, or nil.
function M.get(id) return registry[id] end

--- Starts n sandboxes of a policy ahead of time when its backend can (vm); no-op otherwise.
function M.prewarm(p, n)
  local backend = load_backend(p.backend)
  if backend and backend.prewarm then return backend.prewarm(p, n) end
  return true
end

return M
