-- Seccomp profiles from JSON: OCI/Docker profiles (moby's default.json format) and Firecracker's
-- seccompiler JSON. Both become clawlua.seccomp filters; every structural error names its JSON
-- path ($.syscalls[3].args[0].op), and syscall names unknown on the target architectures are
-- reported in filter:info().unknown instead of being dropped silently.
local claw = require "clawlua"
local json = claw.json
local seccomp = claw.seccomp

local M = {}

-- Docker's default capability set: what a container has unless told otherwise.
M.docker_default_caps = {
  "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
  "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
  "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}

local OCI_ACTIONS = {
  SCMP_ACT_ALLOW = "allow", SCMP_ACT_KILL = "kill_thread", SCMP_ACT_KILL_THREAD = "kill_thread",
  SCMP_ACT_KILL_PROCESS = "kill_process", SCMP_ACT_TRAP = "trap", SCMP_ACT_LOG = "log",
  SCMP_ACT_NOTIFY = "notify", SCMP_ACT_ERRNO = "errno", SCMP_ACT_TRACE = "trace",
}
local OCI_OPS = {
  SCMP_CMP_EQ = "==", SCMP_CMP_NE = "!=", SCMP_CMP_LT = "<", SCMP_CMP_LE = "<=",
  SCMP_CMP_GT = ">", SCMP_CMP_GE = ">=", SCMP_CMP_MASKED_EQ = "&==",
}
-- Go architecture names (what moby compares includes/excludes "arches" with) per libseccomp one.
local GO_ARCH = { x86_64 = "amd64", x86 = "386", x32 = "x32", aarch64 = "arm64", arm = "arm" }

local function fail(path, msg) error(("%s: %s"):format(path, msg), 0) end

local function expect(v, kind, path)
  local t = type(v)
  if kind == "array" then
    if t ~= "table" then fail(path, "array expected, got " .. t) end
  elseif kind == "integer" then
    if math.type(v) ~= "integer" then fail(path, "integer expected, got " .. (math.type(v) or t)) end
  elseif t ~= kind then
    fail(path, kind .. " expected, got " .. (v == json.null and "null" or t))
  end
  return v
end

local function read_source(src)
  if type(src) ~= "string" then error("bad argument #1 (path or JSON text expected)", 3) end
  if src:match("^%s*{") then return src, "profile" end
  local f, err = io.open(src, "rb")
  if not f then return nil, src, err end
  local data = f:read("a")
  f:close()
  return data, src
end

local function decode(src)
  local data, name, err = read_source(src)
  if not data then return nil, "seccomp profile: " .. err end
  local doc, derr = json.decode(data)
  if doc == nil then return nil, ("seccomp profile %s: %s"):format(name, derr) end
  if type(doc) ~= "table" then return nil, ("seccomp profile %s: $: object expected"):format(name) end
  return doc, name
end

-- "6.18.44-fc" -> {6, 18}
local function kernel_version(s)
  local a, b = tostring(s):match("^(%d+)%.(%d+)")
  if not a then return nil end
  return { tonumber(a), tonumber(b) }
end

local function kernel_at_least(have, want)
  if have[1] ~= want[1] then return have[1] > want[1] end
  return have[2] >= want[2]
end

local function running_kernel()
  local f = io.open("/proc/sys/kernel/osrelease", "r")
  local s = f and f:read("l") or "0.0"
  if f then f:close() end
  return s
end

local function set_of(list)
  local s = {}
  for _, v in ipairs(list or {}) do s[v] = true end
  return s
end

--- Loads an OCI/Docker seccomp profile.
---@param src string a file path or the JSON text itself
---@param opts table|nil {caps = {...} (default Docker's default set), arch = "x86_64",
---  kernel = "6.1" (default: the running kernel), optimize=, log=, handler=, notify_timeout=}
---@return userdata|nil filter, string|nil err
function M.oci(src, opts)
  opts = opts or {}
  local doc, name = decode(src)
  if not doc then return nil, name end
  local ok, res = pcall(M.oci_table, doc, opts)
  if not ok then return nil, ("seccomp profile %s: %s"):format(name, tostring(res)) end
  return res
end

function M.oci_table(doc, opts)
  local native = opts.arch or seccomp.native_arch
  local goarch = GO_ARCH[native] or native
  local caps = set_of(opts.caps or M.docker_default_caps)
  local kver = kernel_version(opts.kernel or running_kernel()) or { 0, 0 }

  local def = OCI_ACTIONS[expect(doc.defaultAction, "string", "$.defaultAction")]
  if not def then fail("$.defaultAction", "unknown action '" .. doc.defaultAction .. "'") end
  local function errno_of(v, path)
    v = expect(v, "integer", path)
    if v < 0 or v > 4095 then fail(path, "errno 0..4095 expected, got " .. v) end
    return v
  end
  local function action_of(act, errno_ret, path)
    if act == "errno" then
      if errno_ret ~= nil then return { errno = errno_of(errno_ret, path) } end
      return { errno = 1 } -- EPERM, as runc does without errnoRet
    elseif act == "trace" then
      return { trace = errno_ret ~= nil and expect(errno_ret, "integer", path) or 0 }
    end
    return act
  end
  local default = action_of(def, doc.defaultErrnoRet, "$.defaultErrnoRet")

  -- Architectures: the native one and its sub-architectures from archMap (or "architectures").
  local arches = { native }
  local arch_paths = { "arch" } -- where each entry of arches came from, for errors
  local scmp_native = "SCMP_ARCH_" .. native:upper()
  if doc.archMap ~= nil and doc.archMap ~= json.null then
    expect(doc.archMap, "array", "$.archMap")
    for i, m in ipairs(doc.archMap) do
      local p = ("$.archMap[%d]"):format(i - 1)
      expect(m, "table", p)
      if expect(m.architecture, "string", p .. ".architecture") == scmp_native then
        if m.subArchitectures ~= nil and m.subArchitectures ~= json.null then
          for k, sub in ipairs(expect(m.subArchitectures, "array", p .. ".subArchitectures")) do
            local sp = ("%s.subArchitectures[%d]"):format(p, k - 1)
            arches[#arches + 1] = expect(sub, "string", sp)
            arch_paths[#arches] = sp
          end
        end
      end
    end
  elseif doc.architectures ~= nil and doc.architectures ~= json.null then
    for k, a in ipairs(expect(doc.architectures, "array", "$.architectures")) do
      local ap = ("$.architectures[%d]"):format(k - 1)
      a = expect(a, "string", ap)
      if a ~= scmp_native then
        arches[#arches + 1] = a
        arch_paths[#arches] = ap
      end
    end
  end

  local rules, skipped = {}, {}
  local syscalls = doc.syscalls
  if syscalls == nil or syscalls == json.null then syscalls = {} end
  expect(syscalls, "array", "$.syscalls")
  for i, call in ipairs(syscalls) do
    local p = ("$.syscalls[%d]"):format(i - 1)
    expect(call, "table", p)
    local names = {}
    if call.names ~= nil and call.names ~= json.null then
      for k, n in ipairs(expect(call.names, "array", p .. ".names")) do
        names[#names + 1] = expect(n, "string", ("%s.names[%d]"):format(p, k - 1))
      end
    end
    if call.name ~= nil then names[#names + 1] = expect(call.name, "string", p .. ".name") end
    if #names == 0 then fail(p, "no syscall names") end
    local act = OCI_ACTIONS[expect(call.action, "string", p .. ".action")]
    if not act then fail(p .. ".action", "unknown action '" .. call.action .. "'") end
    local include = true
    local inc, exc = call.includes, call.excludes
    if inc ~= nil and inc ~= json.null then
      expect(inc, "table", p .. ".includes")
      if inc.arches and inc.arches ~= json.null and #expect(inc.arches, "array", p .. ".includes.arches") > 0
          and not set_of(inc.arches)[goarch] then
        include = false
      end
      if inc.caps and inc.caps ~= json.null then
        for k, c in ipairs(expect(inc.caps, "array", p .. ".includes.caps")) do
          if not caps[expect(c, "string", ("%s.includes.caps[%d]"):format(p, k - 1))] then include = false end
        end
      end
      if inc.minKernel and inc.minKernel ~= json.null then
        local want = kernel_version(expect(inc.minKernel, "string", p .. ".includes.minKernel"))
        if not want then fail(p .. ".includes.minKernel", "version like \"4.8\" expected") end
        if not kernel_at_least(kver, want) then include = false end
      end
    end
    if exc ~= nil and exc ~= json.null then
      expect(exc, "table", p .. ".excludes")
      if exc.arches and exc.arches ~= json.null
          and set_of(expect(exc.arches, "array", p .. ".excludes.arches"))[goarch] then
        include = false
      end
      if exc.caps and exc.caps ~= json.null then
        for k, c in ipairs(expect(exc.caps, "array", p .. ".excludes.caps")) do
          if caps[expect(c, "string", ("%s.excludes.caps[%d]"):format(p, k - 1))] then include = false end
        end
      end
    end
    if include then
      local action = action_of(act, call.errnoRet, p .. ".errnoRet")
      local conds, counts = {}, {}
      if call.args ~= nil and call.args ~= json.null then
        for k, a in ipairs(expect(call.args, "array", p .. ".args")) do
          local ap = ("%s.args[%d]"):format(p, k - 1)
          expect(a, "table", ap)
          local idx = expect(a.index, "integer", ap .. ".index")
          if idx < 0 or idx > 5 then fail(ap .. ".index", "0..5 expected, got " .. idx) end
          local op = OCI_OPS[expect(a.op, "string", ap .. ".op")]
          if not op then fail(ap .. ".op", "unknown operator '" .. a.op .. "'") end
          local v = expect(a.value, "integer", ap .. ".value")
          local v2 = a.valueTwo
          if v2 == nil or v2 == json.null then v2 = 0 else expect(v2, "integer", ap .. ".valueTwo") end
          if op == "&==" then
            conds[#conds + 1] = { index = idx, op = op, mask = v, value = v2 }
          else
            conds[#conds + 1] = { index = idx, op = op, value = v }
          end
          counts[idx] = (counts[idx] or 0) + 1
        end
      end
      -- Like runc: conditions on distinct arguments are ANDed in one rule; several conditions on
      -- the same argument become one rule each (libseccomp cannot AND them).
      local repeated = false
      for _, c in pairs(counts) do if c > 1 then repeated = true end end
      local groups = repeated and {} or { conds }
      if repeated then for _, c in ipairs(conds) do groups[#groups + 1] = { c } end end
      for _, g in ipairs(groups) do
        rules[#rules + 1] = { syscalls = names, action = action, args = #g > 0 and g or nil, where = p }
      end
    else
      skipped[#skipped + 1] = p
    end
  end
  if opts.handler == nil then
    -- SCMP_ACT_NOTIFY hands each call to the handler option, a Lua function: none, no filter
    local at = default == "notify" and "$.defaultAction" or nil
    for _, r in ipairs(rules) do
      if at then break end
      if r.action == "notify" then at = r.where .. ".action" end
    end
    if at then fail(at, "SCMP_ACT_NOTIFY needs a handler (the handler option: a function that decides each call)") end
  end
  local ok, f = pcall(seccomp.filter, {
    default = default, arches = arches, rules = rules, strict = false,
    optimize = opts.optimize, log = opts.log, handler = opts.handler,
    notify_timeout = opts.notify_timeout,
  })
  if not ok then
    -- The filter names the architecture by its index in arches: give the profile's JSON path.
    local i, why = tostring(f):match("bad field 'arches%[(%d+)%]' %((.*)%)$")
    if i and arch_paths[tonumber(i)] then fail(arch_paths[tonumber(i)], why) end
    why = tostring(f):match("bad field 'arches' %((.*)%)$") -- e.g. too many of them
    if why then fail(doc.archMap ~= nil and doc.archMap ~= json.null and "$.archMap" or "$.architectures", why) end
    -- a rule libseccomp refused (two actions for the same test, say): the syscalls[] entry it
    -- came from
    local n, rest = tostring(f):match("rules%[(%d+)%] (.*)$")
    if n and rules[tonumber(n)] then
      -- another rule the message names (one libseccomp cannot merge with it): its path too
      rest = rest:gsub("rules%[(%d+)%]", function(k)
        local r = rules[tonumber(k)]
        return r and r.where or nil
      end)
      fail(rules[tonumber(n)].where, rest)
    end
    error(f, 0)
  end
  return f, skipped
end

local FC_ACTIONS = { allow = true, trap = true, kill_process = true, kill_thread = true, log = true }
local FC_OPS = { eq = "==", ne = "!=", lt = "<", le = "<=", gt = ">", ge = ">=" }

local function fc_action(v, path)
  if type(v) == "string" then
    if v == "kill" then return "kill_process" end
    if not FC_ACTIONS[v] then fail(path, "unknown action '" .. v .. "'") end
    return v
  end
  if type(v) == "table" then
    if v.errno ~= nil then return { errno = expect(v.errno, "integer", path .. ".errno") } end
    if v.trace ~= nil then return { trace = expect(v.trace, "integer", path .. ".trace") } end
  end
  fail(path, "action expected (\"allow\", \"trap\", \"kill_process\", {\"errno\": N}, ...)")
end

--- Loads Firecracker's seccompiler JSON: one filter per thread category.
---@param src string a file path or the JSON text itself
---@param opts table|nil {optimize=, log=, threads = {"vmm", ...} (default: all)}
---@return table|nil filters {vmm = filter, api = filter, vcpu = filter}, string|nil err
function M.firecracker(src, opts)
  opts = opts or {}
  local doc, name = decode(src)
  if not doc then return nil, name end
  local ok, res = pcall(function()
    local out = {}
    local threads = {}
    for k in pairs(doc) do threads[#threads + 1] = k end
    table.sort(threads)
    for _, thread in ipairs(threads) do
      local t = doc[thread]
      local p = "$." .. thread
      expect(t, "table", p)
      local def = fc_action(t.default_action, p .. ".default_action")
      local act = fc_action(t.filter_action, p .. ".filter_action")
      local rules = {}
      for i, r in ipairs(expect(t.filter, "array", p .. ".filter")) do
        local rp = ("%s.filter[%d]"):format(p, i - 1)
        expect(r, "table", rp)
        local conds = {}
        if r.args ~= nil and r.args ~= json.null then
          for k, a in ipairs(expect(r.args, "array", rp .. ".args")) do
            local ap = ("%s.args[%d]"):format(rp, k - 1)
            expect(a, "table", ap)
            local idx = expect(a.index, "integer", ap .. ".index")
            if idx < 0 or idx > 5 then fail(ap .. ".index", "0..5 expected, got " .. idx) end
            local typ = expect(a.type, "string", ap .. ".type")
            if typ ~= "dword" and typ ~= "qword" then fail(ap .. ".type", "\"dword\" or \"qword\" expected") end
            local val = expect(a.val, "integer", ap .. ".val")
            if type(a.op) == "table" and a.op.masked_eq ~= nil then
              local m = expect(a.op.masked_eq, "integer", ap .. ".op.masked_eq")
              if typ == "dword" then m = m & 0xffffffff end
              conds[#conds + 1] = { index = idx, op = "&==", mask = m, value = val }
            else
              local op = FC_OPS[expect(a.op, "string", ap .. ".op")]
              if not op then fail(ap .. ".op", "unknown operator '" .. tostring(a.op) .. "'") end
              if typ == "dword" and op == "==" then
                -- seccompiler compares the low 32 bits of a dword only.
                conds[#conds + 1] = { index = idx, op = "&==", mask = 0xffffffff, value = val }
              elseif typ == "dword" then
                fail(ap .. ".op", "32-bit '" .. a.op .. "' cannot be expressed with libseccomp "
                  .. "(64-bit comparisons only); use type \"qword\"")
              else
                conds[#conds + 1] = { index = idx, op = op, value = val }
              end
            end
          end
        end
        local a = act
        if r.action ~= nil then a = fc_action(r.action, rp .. ".action") end
        rules[#rules + 1] = { syscall = expect(r.syscall, "string", rp .. ".syscall"), action = a,
                              args = #conds > 0 and conds or nil, where = rp }
      end
      local f = seccomp.filter { default = def, rules = rules, strict = false,
                                 optimize = opts.optimize, log = opts.log }
      out[thread] = f
    end
    return out
  end)
  if not ok then return nil, ("seccomp profile %s: %s"):format(name, tostring(res)) end
  return res
end

return M
