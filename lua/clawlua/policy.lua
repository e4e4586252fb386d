-- Sandbox policies: Lua files that return a table, loaded as text only in an environment with
-- a small allow-list (no io, os, require, load, debug, pcall, metatables) under an instruction
-- budget, then validated field by field (unknown fields rejected, every error naming the file,
-- the line and the field path) and normalized (sizes in bytes, ports as integers, protocols
-- lower case) with a safe default for every field.
local claw = require "clawlua"

local M = {}

--- Instructions a policy file (or one hook call) may run.
M.budget = 250000
--- Bytes of source a policy file may have, entries in one list.
M.max_source = 1 << 20
M.max_list = 1024
--- Bytes of a policy's name (it names the policy in errors, audit records and describe()).
M.max_name = 256
--- Bytes a policy file (or one hook call) may allocate.
M.max_memory = 64 << 20

---@class clawlua.policy
---@field name string
---@field backend "jail"|"vm"
---@field resources {vcpus: integer, memory_mib: integer, pids: integer, cpu: number,
---  lifetime_s: number, max_output: integer}
---@field quota {max_sandboxes: integer, max_execs: integer, memory_mib: integer}
---@field network {egress: "deny"|"allow", allow: table[], resolvers: string[]}
---@field seccomp string
---@field files {readonly: {src: string, dst: string}[], workdir: string}
---@field env table<string, string>
---@field hooks table<string, function>
---@field source string|nil

local HOOKS = { on_tool_call = true, on_exec = true, on_file = true, on_denied = true }

-- Fields, with their defaults, in the order describe() shows them.
local DEFAULTS = {
  resources = { vcpus = 1, memory_mib = 256, pids = 256, cpu = 1.0, lifetime_s = 600,
    max_output = 16 << 20 },
  -- process-wide: counted over every live sandbox of the runtime, checked against the policy of
  -- the sandbox being created (or exec'd in)
  quota = { max_sandboxes = 32, max_execs = 64, memory_mib = 16384 },
}

-- A validation failure: raised inside validate() and turned into `nil, msg` by its callers.
local Invalid = {}
Invalid.__index = Invalid

local function invalid(path, fmt, ...)
  error(setmetatable({ path = path, msg = fmt:format(...) }, Invalid), 0)
end

local function tname(v)
  return math.type(v) or type(v)
end

local function check_type(v, want, path)
  if type(v) ~= want then invalid(path, "%s expected, got %s", want, tname(v)) end
  return v
end

local function check_keys(t, allowed, path)
  for k in pairs(t) do
    if type(k) ~= "string" or not allowed[k] then
      invalid(path == "" and tostring(k) or (path .. "." .. tostring(k)), "unknown field")
    end
  end
end

local function check_list(t, path)
  check_type(t, "table", path)
  local n = #t
  if n > M.max_list then invalid(path, "at most %d entries expected, got %d", M.max_list, n) end
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then
      invalid(path, "a list expected (found key %s)", tostring(k))
    end
  end
  return n
end

local function join(path, key)
  if type(key) == "number" then return ("%s[%d]"):format(path, key) end
  return path == "" and key or (path .. "." .. key)
end

local UNITS = { [""] = 1, K = 1 << 10, M = 1 << 20, G = 1 << 30, T = 1 << 40 }

--- Parses a size: an integer (bytes) or "16M", "512K", "1G", "4096".
---@return integer|nil bytes
function M.parse_size(v)
  if math.type(v) == "integer" then return v >= 0 and v or nil end
  if type(v) ~= "string" then return nil end
  local num, unit = v:upper():match("^%s*(%d+)%s*([KMGT]?)I?B?%s*$")
  if not num then return nil end
  local n = math.tointeger(tonumber(num))
  if not n or n > (1 << 50) then return nil end
  return n * UNITS[unit]
end

local function size_field(v, path, min, max)
  local n = M.parse_size(v)
  if not n then invalid(path, "a size expected (bytes or \"16M\"), got %s", tname(v)) end
  if n < min or n > max then invalid(path, "%d to %d bytes expected, got %d", min, max, n) end
  return n
end

local function number_field(v, path, min, max, integer)
  if type(v) ~= "number" or (integer and math.type(v) ~= "integer") then
    invalid(path, "%s expected, got %s", integer and "integer" or "number", tname(v))
  end
  if v ~= v or v < min or v > max then invalid(path, "%s to %s expected, got %s", min, max, v) end
  return v
end

local function absolute_path(v, path)
  check_type(v, "string", path)
  if v:sub(1, 1) ~= "/" or v:find("%z") or v:find("/%.%.?/") or v:find("/%.%.?$") then
    invalid(path, "an absolute path without '.' or '..' expected, got %q", v)
  end
  return (#v > 1 and v:gsub("/+$", "") or v)
end

local function memory_field(v, path, min_mib, max_mib)
  if type(v) == "string" then return size_field(v, path, min_mib << 20, max_mib << 20) >> 20 end
  return number_field(v, path, min_mib, max_mib, true)
end

local function resources(t, path)
  check_type(t, "table", path)
  check_keys(t, { vcpus = 1, memory_mib = 1, pids = 1, cpu = 1, lifetime_s = 1, max_output = 1 },
    path)
  local d = DEFAULTS.resources
  local r = {}
  r.vcpus = t.vcpus == nil and d.vcpus or number_field(t.vcpus, join(path, "vcpus"), 1, 64, true)
  r.memory_mib = t.memory_mib == nil and d.memory_mib
    or memory_field(t.memory_mib, join(path, "memory_mib"), 16, 1 << 20)
  r.pids = t.pids == nil and d.pids or number_field(t.pids, join(path, "pids"), 1, 4194304, true)
  r.cpu = t.cpu == nil and d.cpu or number_field(t.cpu, join(path, "cpu"), 0.01, 1024)
  r.lifetime_s = t.lifetime_s == nil and d.lifetime_s
    or number_field(t.lifetime_s, join(path, "lifetime_s"), 0.001, 7 * 86400)
  r.max_output = t.max_output == nil and d.max_output
    or size_field(t.max_output, join(path, "max_output"), 1, 1 << 30)
  return r
end

local function quota(t, path, res)
  check_type(t, "table", path)
  check_keys(t, { max_sandboxes = 1, max_execs = 1, memory_mib = 1 }, path)
  local d = DEFAULTS.quota
  local q = {}
  q.max_sandboxes = t.max_sandboxes == nil and d.max_sandboxes
    or number_field(t.max_sandboxes, join(path, "max_sandboxes"), 1, 4096, true)
  q.max_execs = t.max_execs == nil and d.max_execs
    or number_field(t.max_execs, join(path, "max_execs"), 1, 65536, true)
  q.memory_mib = t.memory_mib == nil and math.max(d.memory_mib, res.memory_mib)
    or memory_field(t.memory_mib, join(path, "memory_mib"), 16, 1 << 24)
  if q.memory_mib < res.memory_mib then
    invalid(join(path, "memory_mib"), "at least resources.memory_mib (%d) expected, got %d",
      res.memory_mib, q.memory_mib)
  end
  return q
end

local PROTOS = { tcp = true, udp = true }

local function port_field(v, path)
  local n = math.tointeger(type(v) == "string" and tonumber(v) or v)
  if not n or n < 1 or n > 65535 then invalid(path, "a port 1..65535 expected, got %s", tostring(v)) end
  return n
end

local function host_field(v, path)
  check_type(v, "string", path)
  local ok = #v > 0 and #v <= 253 and (v:match("^[%w%.%-%*]+$") or v:match("^[%x:%.]+/?%d*$")
    or v:match("^%d+%.%d+%.%d+%.%d+/%d+$"))
  if not ok then invalid(path, "a host name, address or cidr expected, got %q", v) end
  return v:lower()
end

local ALLOW_SHAPE = 'expected "host:port/proto" or {host=, port=, proto=}'

local function allow_entry(e, path)
  if type(e) == "string" then
    local host, rest = e:match("^%[([%x:%.]+/?%d*)%](.*)$")
    if not host then host, rest = e:match("^(%d+%.%d+%.%d+%.%d+/%d+)(.*)$") end
    if not host then host, rest = e:match("^([^:/]+)(.*)$") end
    if not host then invalid(path, ALLOW_SHAPE) end
    local port, proto = rest:match("^:(%d+)/(%a+)$")
    if not port then port = rest:match("^:(%d+)$") end
    if not port and rest:match("^/(%a+)$") then proto = rest:match("^/(%a+)$") end
    if not port and not proto and rest ~= "" then invalid(path, ALLOW_SHAPE) end
    e = { host = host, port = port, proto = proto }
  elseif type(e) ~= "table" then
    invalid(path, ALLOW_SHAPE)
  end
  check_keys(e, { host = 1, port = 1, proto = 1 }, path)
  if e.host == nil then invalid(join(path, "host"), ALLOW_SHAPE) end
  local proto = e.proto == nil and "tcp" or check_type(e.proto, "string", join(path, "proto")):lower()
  if not PROTOS[proto] then invalid(join(path, "proto"), "\"tcp\" or \"udp\" expected, got %q", proto) end
  return { host = host_field(e.host, join(path, "host")),
    port = e.port ~= nil and port_field(e.port, join(path, "port")) or nil, proto = proto }
end

local function ip_field(v, path)
  check_type(v, "string", path)
  local a, b, c, d = v:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  local ok = a and tonumber(a) < 256 and tonumber(b) < 256 and tonumber(c) < 256 and tonumber(d) < 256
  if not ok and not (v:find(":") and v:match("^[%x:%.]+$")) then
    invalid(path, "an IP address expected, got %q", v)
  end
  return v
end

local function network(t, path)
  check_type(t, "table", path)
  check_keys(t, { egress = 1, allow = 1, resolvers = 1 }, path)
  local egress = t.egress == nil and "deny" or check_type(t.egress, "string", join(path, "egress"))
  if egress ~= "deny" and egress ~= "allow" then
    invalid(join(path, "egress"), "\"deny\" or \"allow\" expected, got %q", egress)
  end
  local allow, resolvers = {}, {}
  if t.allow ~= nil then
    for i = 1, check_list(t.allow, join(path, "allow")) do
      allow[i] = allow_entry(t.allow[i], join(path, ("allow[%d]"):format(i)))
    end
  end
  if t.resolvers ~= nil then
    for i = 1, check_list(t.resolvers, join(path, "resolvers")) do
      resolvers[i] = ip_field(t.resolvers[i], join(path, ("resolvers[%d]"):format(i)))
    end
  end
  return { egress = egress, allow = allow, resolvers = resolvers }
end

local function files(t, path)
  check_type(t, "table", path)
  check_keys(t, { readonly = 1, workdir = 1 }, path)
  local f = { readonly = {}, workdir = "/work" }
  if t.workdir ~= nil then f.workdir = absolute_path(t.workdir, join(path, "workdir")) end
  if f.workdir == "/" or f.workdir == "/tmp" or f.workdir:match("^/proc") or f.workdir:match("^/dev")
    or f.workdir == "/bin" then
    invalid(join(path, "workdir"), "%q is reserved", f.workdir)
  end
  if t.readonly ~= nil then
    local p = join(path, "readonly")
    for i = 1, check_list(t.readonly, p) do
      local e, ep = t.readonly[i], ("%s[%d]"):format(p, i)
      if type(e) == "string" then e = { src = e } end
      check_type(e, "table", ep)
      check_keys(e, { src = 1, dst = 1 }, ep)
      local src = absolute_path(e.src, join(ep, "src"))
      local dst = e.dst == nil and src or absolute_path(e.dst, join(ep, "dst"))
      if dst == "/" or dst == f.workdir or dst == "/tmp" or dst == "/bin" or dst == "/proc"
        or dst == "/dev" then
        invalid(ep, "%q cannot be bound over", dst)
      end
      f.readonly[i] = { src = src, dst = dst }
    end
  end
  return f
end

local function env_field(t, path)
  check_type(t, "table", path)
  local e, n = {}, 0
  for k, v in pairs(t) do
    if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") then
      invalid(path, "variable names expected, got %s", tostring(k))
    end
    if type(v) ~= "string" and type(v) ~= "number" then invalid(join(path, k), "string expected, got %s", tname(v)) end
    n = n + 1
    if n > M.max_list then invalid(path, "at most %d variables expected", M.max_list) end
    e[k] = tostring(v)
    -- execve refuses a "NAME=value" string longer than MAX_ARG_STRLEN (128 KiB)
    if #k + 1 + #e[k] > 131072 then invalid(join(path, k), "at most 128 KiB expected, got %d bytes", #e[k]) end
  end
  return e
end

local function seccomp_field(v, path, dir)
  check_type(v, "string", path)
  if v == "docker-default" or v == "unconfined" then return v end
  if v:match("%.json$") then
    if v:sub(1, 1) ~= "/" then v = dir .. "/" .. v end
    return v
  end
  invalid(path, "\"docker-default\", \"unconfined\" or a profile path (.json) expected, got %q", v)
end

-- The VM backend's own settings: a guest image (paths relative to the policy file), which
-- kernel of the built-in image (kernel_flavor), whether an own kernel has ACPI, how it starts,
-- and the accelerator (clawlua.vm's accel).
local VM_START = { auto = true, cold = true, snapshot = true }
local VM_ACCEL = { auto = true, kvm = true, tcg = true, probe = true }
local VM_FLAVOR = { minimal = true, stock = true }
local function vm_field(t, path, dir)
  check_type(t, "table", path)
  check_keys(t, { kernel = 1, initrd = 1, rootfs = 1, start = 1, accel = 1, kernel_flavor = 1, acpi = 1 }, path)
  local v = {}
  for _, k in ipairs { "kernel", "initrd", "rootfs" } do
    if t[k] ~= nil then
      local f = check_type(t[k], "string", join(path, k))
      if f == "" then invalid(join(path, k), "a file path expected") end
      v[k] = f:sub(1, 1) == "/" and f or (dir .. "/" .. f)
    end
  end
  if (v.kernel == nil) ~= (v.initrd == nil) then
    invalid(join(path, v.kernel and "initrd" or "kernel"), "kernel and initrd go together")
  end
  if t.start ~= nil and not VM_START[t.start] then
    invalid(join(path, "start"), "\"auto\", \"cold\" or \"snapshot\" expected, got %s", tostring(t.start))
  end
  if t.accel ~= nil and not VM_ACCEL[t.accel] then
    invalid(join(path, "accel"), "\"auto\", \"kvm\", \"tcg\" or \"probe\" expected, got %s", tostring(t.accel))
  end
  if t.kernel_flavor ~= nil then
    if not VM_FLAVOR[t.kernel_flavor] then
      invalid(join(path, "kernel_flavor"), "\"minimal\" or \"stock\" expected, got %s", tostring(t.kernel_flavor))
    end
    if v.kernel then invalid(join(path, "kernel_flavor"), "picks the built-in image's kernel: not with vm.kernel") end
  end
  if t.acpi ~= nil then
    check_type(t.acpi, "boolean", join(path, "acpi"))
    if not v.kernel then invalid(join(path, "acpi"), "describes an own kernel: needs vm.kernel") end
  end
  v.start, v.accel, v.kernel_flavor, v.acpi = t.start, t.accel, t.kernel_flavor, t.acpi
  return v
end

local function validate(t, name, dir)
  check_type(t, "table", "")
  check_keys(t, { name = 1, backend = 1, resources = 1, network = 1, seccomp = 1, files = 1,
    env = 1, hooks = 1, vm = 1, quota = 1 }, "")
  local p = {}
  p.name = t.name == nil and name or check_type(t.name, "string", "name")
  if #p.name > M.max_name then invalid("name", "at most %d bytes expected, got %d", M.max_name, #p.name) end
  p.backend = t.backend == nil and "jail" or check_type(t.backend, "string", "backend")
  if p.backend ~= "jail" and p.backend ~= "vm" then
    invalid("backend", "\"jail\" or \"vm\" expected, got %q", p.backend)
  end
  p.resources = resources(t.resources or {}, "resources")
  p.quota = quota(t.quota or {}, "quota", p.resources)
  p.network = network(t.network or {}, "network")
  p.seccomp = t.seccomp == nil and "docker-default" or seccomp_field(t.seccomp, "seccomp", dir)
  p.files = files(t.files or {}, "files")
  p.env = env_field(t.env or {}, "env")
  if t.vm ~= nil then
    p.vm = vm_field(t.vm, "vm", dir)
    if p.backend ~= "vm" then invalid("vm", "only for backend = \"vm\"") end
    if p.vm.rootfs and #p.files.readonly > 0 then
      invalid("files.readonly", "the VM's one disk is vm.rootfs already")
    end
  end
  p.hooks = {}
  if t.hooks ~= nil then
    check_type(t.hooks, "table", "hooks")
    check_keys(t.hooks, HOOKS, "hooks")
    for k, f in pairs(t.hooks) do p.hooks[k] = check_type(f, "function", "hooks." .. k) end
  end
  return p
end

-- The line of the source that most likely holds the field at path (the last key of the path
-- found, in order, after the previous one); nil when the source does not name it.
local function line_of(src, path)
  if not src then return nil end
  local pos, found = 1, nil
  for key in path:gmatch("[%a_][%w_]*") do
    local s = src:find("%f[%w_]" .. key .. "%s*=", pos)
    if s then
      pos, found = s, s
    end
  end
  if not found then return nil end
  local _, n = src:sub(1, found):gsub("\n", "")
  return n + 1
end

local function format_error(e, file, src)
  local line = line_of(src, e.path)
  local where = line and ("%s:%d"):format(file, line) or file
  if e.path == "" then return ("%s: %s"):format(where, e.msg) end
  return ("%s: %s: %s"):format(where, e.path, e.msg)
end

-- Policies that went through validation (sandbox.create takes them as they are).
local validated = setmetatable({}, { __mode = "k" })

--- Whether t is a validated policy (from load, from_table or default).
function M.is_policy(t) return validated[t] == true end

local function run_validation(t, name, dir, file, src)
  local ok, res = pcall(validate, t, name, dir)
  if ok then
    res.source = file ~= name and file or nil
    validated[res] = true
    return res
  end
  if getmetatable(res) == Invalid then return nil, format_error(res, file, src) end
  error(res, 0)
end

--- Validates and normalizes a policy table.
---@param t table
---@param name string|nil shown in errors and as the default name
---@return clawlua.policy|nil, string|nil
function M.from_table(t, name)
  name = name or "policy"
  return run_validation(t, name, ".", name, nil)
end

--- The built-in default: jail backend, no egress, Docker-like seccomp, 1 vCPU, 256 MiB.
---@return clawlua.policy
function M.default()
  return assert(M.from_table({}, "default"))
end

-- What a policy file can reach: pure functions only. The few library calls that can build a
-- large string in one step, where no instruction hook sees it (rep, gsub with a string
-- replacement, concat), refuse a result over the caps before building it.
local MAX_REP = 1 << 20
local string_rep, string_gsub, table_concat = string.rep, string.gsub, table.concat
-- Pattern matching in Lua (the C matcher backtracks where no hook sees it: a pattern like
-- ("a*"):rep(20) .. "b" on a client's argument ran for hours under any budget).
-- (loaded with the first policy file or hook: a runtime on the default policy never needs it)
local pattern = setmetatable({}, { __index = function(t, k)
  local m = require "clawlua.policy.pattern"
  setmetatable(t, nil)
  for name, f in pairs(m) do t[name] = f end
  return m[k]
end })
local string_find, string_match, string_gmatch = string.find, string.match, string.gmatch
local function capped_rep(s, n, sep)
  local len = #tostring(s) * math.max(0, math.tointeger(n) or 0)
    + (sep and #tostring(sep) * math.max(0, (math.tointeger(n) or 1) - 1) or 0)
  if len > MAX_REP then
    error(("string.rep: result of %d bytes over the limit of %d"):format(len, MAX_REP), 2)
  end
  return string_rep(s, n, sep)
end

local function capped_gsub(s, pat, repl, n)
  if type(repl) == "string" or type(repl) == "number" then
    local bound = (#tostring(s) + 1) * (#tostring(repl) + 1)
    if bound > M.max_memory then
      error(("string.gsub: a result of up to %d bytes over the limit of %d"):format(bound, M.max_memory), 2)
    end
  end
  return pattern.gsub(s, pat, repl, n)
end

local function capped_concat(t, sep, i, j)
  i, j = i or 1, j or #t
  local len = (j - i) * #(sep or "")
  for k = i, j do
    local v = t[k]
    len = len + (type(v) == "string" and #v or 24)
    if len > M.max_memory then
      error(("table.concat: result over the limit of %d bytes"):format(M.max_memory), 2)
    end
  end
  return table_concat(t, sep, i, j)
end

-- table.move loops in C (no instruction hook sees it), over up to 2^63 indices.
local table_move, string_pack = table.move, string.pack
local function capped_move(a1, f, e, t, a2)
  local first, last = math.tointeger(f), math.tointeger(e)
  if first and last and last >= first and last - first >= MAX_REP then
    error(("table.move: %d elements over the limit of %d"):format(last - first + 1, MAX_REP), 2)
  end
  return table_move(a1, f, e, t, a2)
end

-- string.pack builds its result in C: the sizes in its format ("c2000000000", "!8i16") bound
-- what it adds to the arguments' own bytes.
local function capped_pack(fmt, ...)
  local size = 0
  for n in tostring(fmt):gmatch("%d+") do size = size + (tonumber(n) or math.huge) end
  if size > MAX_REP then
    error(("string.pack: format sizes of %.0f bytes over the limit of %d"):format(size, MAX_REP), 2)
  end
  return string_pack(fmt, ...)
end

local function sandbox_env()
  local function copy(lib, skip)
    local t = {}
    for k, v in pairs(lib) do
      if not (skip and skip[k]) then t[k] = v end
    end
    return t
  end
  local str = copy(string, { dump = true })
  str.rep, str.gsub, str.pack = capped_rep, capped_gsub, capped_pack
  str.find, str.match, str.gmatch = pattern.find, pattern.match, pattern.gmatch
  local tab = copy(table)
  tab.concat, tab.move = capped_concat, capped_move
  return {
    assert = assert, error = error, ipairs = ipairs, pairs = pairs, next = next, select = select,
    tonumber = tonumber, tostring = tostring, type = type, rawequal = rawequal, rawlen = rawlen,
    rawget = rawget, _VERSION = _VERSION,
    math = copy(math, { random = true, randomseed = true }), string = str, table = tab,
    utf8 = copy(utf8),
  }
end

-- Runs fn(...) in a coroutine with an instruction budget and a memory cap, checked at every
-- instruction (a string doubled in a loop reaches gigabytes within a few dozen instructions,
-- so a sparser check would come too late); string methods on string values go through the
-- real string table, so its rep, gsub, pack and pattern functions are swapped for the capped
-- and counted ones meanwhile.
local function run_budgeted(what, fn, ...)
  local co = coroutine.create(fn)
  local left = M.budget
  local limit_kb = collectgarbage("count") + M.max_memory / 1024
  local failed
  debug.sethook(co, function()
    left = left - 1
    if failed then error(failed, 0) end
    if left < 0 then
      failed = what .. ": instruction budget exceeded"
      error(failed, 0)
    end
    if collectgarbage("count") > limit_kb then
      collectgarbage()
      if collectgarbage("count") > limit_kb then
        failed = ("%s: memory limit of %d bytes exceeded"):format(what, M.max_memory)
        error(failed, 0)
      end
    end
  end, "", 1)
  string.rep, string.gsub, string.pack = capped_rep, capped_gsub, capped_pack -- luacheck: ignore 122
  string.find, string.match, string.gmatch = pattern.find, pattern.match, pattern.gmatch -- luacheck: ignore 122
  local res = table.pack(coroutine.resume(co, ...))
  string.rep, string.gsub, string.pack = string_rep, string_gsub, string_pack -- luacheck: ignore 122
  string.find, string.match, string.gmatch = string_find, string_match, string_gmatch -- luacheck: ignore 122
  if coroutine.status(co) == "suspended" then
    coroutine.close(co)
    return false, what .. ": yielded (not allowed)"
  end
  if not res[1] then
    -- an error object that is not a string, a message without a position (error(x, 0)) or
    -- one placed in this file (a library call through a capped wrapper) still names the file
    local e = res[2]
    local msg = type(e) == "string" and e or ("error object of type " .. type(e))
    local at = msg:match("^([^\n]-):%d+: ")
    if msg:sub(1, #what) ~= what and (not at or at:find("clawlua/policy.lua", 1, true)) then
      msg = what .. ": " .. msg
    end
    return false, msg
  end
  return true, table.unpack(res, 2, res.n)
end

local function load_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, ("policy %s: %s"):format(path, err) end
  -- the size first where the file has one: read(n) allocates n bytes before it reads, a
  -- mebibyte for every load of a file of a few hundred bytes (the check after the read still
  -- holds for a file that grew, and for a pipe, which cannot seek)
  local want = M.max_source
  local size = f:seek("end")
  if size and f:seek("set") then want = math.min(size, want) end
  local src = f:read(want + 1)
  f:close()
  src = src or ""
  if #src > M.max_source then
    return nil, ("%s: policy file over %d bytes"):format(path, M.max_source)
  end
  if src:byte(1) == 27 then return nil, ("%s: binary chunks are not loaded"):format(path) end
  -- (inside pcall: a parser limit — nesting deeper than 200 levels, "C stack overflow" — is
  -- raised as a runtime error, which goes through the caller's message handler when there is
  -- one, and load returns whatever that handler made of it, a traceback or not even a string)
  local _, chunk, serr = pcall(load, src, "@" .. path, "t", sandbox_env())
  if not chunk then
    -- Lua names the file in its short form (a path over 59 bytes loses its head), and a parser
    -- limit with no position at all
    serr = tostring(serr)
    local line, msg = serr:match("^.-:(%d+): (.*)$")
    if line then return nil, ("%s:%s: %s"):format(path, line, msg) end
    return nil, ("%s: %s"):format(path, serr)
  end
  local ok, t = run_budgeted("policy " .. path, chunk)
  if not ok then return nil, t end
  local name = path:match("([^/]+)%.lua$") or path:match("[^/]+$")
  local dir = path:match("^(.*)/[^/]*$") or "."
  if type(t) ~= "table" then
    return nil, ("%s: the policy file must return a table, got %s"):format(path, type(t))
  end
  return run_validation(t, name, dir, path, src)
end

-- Policies loaded from files (SIGHUP reloads each), and what a reload tells (clawlua.sandbox).
local loaded = setmetatable({}, { __mode = "k" })
local reloaders = {}
local hup_handler

--- Loads a policy file (Lua source returning a table). Once one is loaded, SIGHUP reloads every
--- loaded policy (policy.reload).
---@param path string
---@return clawlua.policy|nil, string|nil
function M.load(path)
  if type(path) ~= "string" then error("bad argument #1 to 'load' (string expected)", 2) end
  local p, err = load_file(path)
  if not p then return nil, err end
  loaded[p] = true
  if not hup_handler and claw.on_signal then
    hup_handler = claw.on_signal("HUP", function()
      local all = {}
      for q in pairs(loaded) do all[#all + 1] = q end
      for _, q in ipairs(all) do M.reload(q) end
    end)
  end
  return p
end

--- Registers fn(p) -> {updated = {ids}, failed = {{id=, error=}}}, called after a policy is
--- reloaded to apply what changes live (clawlua.sandbox registers one).
function M.on_reload(fn)
  reloaders[#reloaders + 1] = fn
end

--- Re-reads the file a policy came from and validates it; on success the policy table takes
--- the new fields in place (new sandboxes get all of them) and every live sandbox created from
--- it gets what changes live (network, hooks, quota). A bad file changes nothing.
---@param p clawlua.policy
---@return {updated: string[], failed: table[]}|nil report, string|nil err, string|nil code
function M.reload(p)
  if not validated[p] then error("bad argument #1 to 'reload' (policy expected)", 2) end
  if not p.source then
    return nil, ("policy.reload: policy %s was not loaded from a file"):format(p.name), "EINVAL"
  end
  local new, err = load_file(p.source)
  if not new then
    claw.audit.emit("policy.reload_failed", { policy = p.name, source = p.source, error = err })
    return nil, "policy.reload: " .. err, "EINVAL"
  end
  validated[new] = nil
  for k in pairs(p) do p[k] = nil end
  for k, v in pairs(new) do p[k] = v end
  local report = { updated = {}, failed = {} }
  for _, fn in ipairs(reloaders) do
    local r = fn(p)
    for _, id in ipairs(r.updated) do report.updated[#report.updated + 1] = id end
    for _, f in ipairs(r.failed) do report.failed[#report.failed + 1] = f end
  end
  claw.audit.emit("policy.reload", { policy = p.name, source = p.source,
    updated = #report.updated, failed = #report.failed })
  return report
end

--- Re-validates a network table (for update_policy).
---@return table|nil network, string|nil err
function M.check_network(t, name)
  local ok, res = pcall(network, t, "network")
  if ok then return res end
  if getmetatable(res) == Invalid then return nil, format_error(res, name or "update_policy", nil) end
  error(res, 0)
end

--- Calls a policy hook under the instruction budget. An error or an exhausted budget denies.
---@return boolean allowed, string|nil reason
function M.call_hook(p, name, ...)
  local fn = p.hooks and p.hooks[name]
  if not fn then return true end
  local done, verdict, reason = run_budgeted(("policy %s: hook %s"):format(p.name, name), fn, ...)
  if not done then
    claw.audit.emit("policy.hook_error", { policy = p.name, hook = name, error = verdict })
    return false, verdict
  end
  if verdict == true then return true end
  return false, type(reason) == "string" and reason or ("denied by hook " .. name)
end

-- Policy strings are bytes (an env value need not be UTF-8); JSON text is not: a byte that
-- does not start a valid UTF-8 sequence shows as U+FFFD.
local function utf8_safe(s)
  if utf8.len(s) then return s end
  local out, i = {}, 1
  while i <= #s do
    local n, bad = utf8.len(s, i)
    if n then
      out[#out + 1] = s:sub(i)
      break
    end
    out[#out + 1] = s:sub(i, bad - 1) .. "\u{FFFD}"
    i = bad + 1
  end
  return table.concat(out)
end

-- In place (the tables describe() builds, with their json.array/object marks).
local function json_safe(t)
  local rekey = {}
  for k, x in pairs(t) do
    if type(x) == "string" then
      t[k] = utf8_safe(x)
    elseif type(x) == "table" then
      json_safe(x)
    end
    if type(k) == "string" and not utf8.len(k) then rekey[#rekey + 1] = k end
  end
  for _, k in ipairs(rekey) do
    t[utf8_safe(k)], t[k] = t[k], nil
  end
  return t
end

--- A JSON-safe view of a policy (hooks by name).
---@param p clawlua.policy
---@return table
function M.describe(p)
  local json = claw.json
  local function arr(t) return json.array(t) end
  local allow = {}
  for i, a in ipairs(p.network.allow) do allow[i] = { host = a.host, port = a.port, proto = a.proto } end
  local ro = {}
  for i, b in ipairs(p.files.readonly) do ro[i] = { src = b.src, dst = b.dst } end
  local hooks = {}
  for k in pairs(p.hooks) do hooks[#hooks + 1] = k end
  table.sort(hooks)
  local env = {}
  for k, v in pairs(p.env) do env[k] = v end
  local r = p.resources
  return json_safe {
    name = p.name, backend = p.backend, source = p.source,
    resources = { vcpus = r.vcpus, memory_mib = r.memory_mib, pids = r.pids, cpu = r.cpu,
      lifetime_s = r.lifetime_s, max_output = r.max_output },
    quota = { max_sandboxes = p.quota.max_sandboxes, max_execs = p.quota.max_execs,
      memory_mib = p.quota.memory_mib },
    network = { egress = p.network.egress, allow = arr(allow), resolvers = arr({ table.unpack(p.network.resolvers) }) },
    seccomp = p.seccomp, files = { readonly = arr(ro), workdir = p.files.workdir },
    env = json.object(env), hooks = arr(hooks),
  }
end

return M
