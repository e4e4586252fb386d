-- The sandbox tools: one tool set shared by the MCP server and the agent loop.
--
--   local ts = tools.new { policy = p, max_sandboxes = 8 }
--   ts:list()                       -- {name, title, description, inputSchema, outputSchema}...
--   ts:call(name, args, ctx)        -- {content, structuredContent, isError} | nil, {code, message}
--   ts:close()                      -- destroys every sandbox the set created
--
-- A tool's failure (a missing sandbox, a refused policy, a sandbox that cannot start) is a
-- result with isError = true, so the model sees it; a command's non-zero exit is not a failure.
-- An unknown tool, or arguments that fail the tool's inputSchema, are JSON-RPC invalid params.
-- The policy's hooks.on_tool_call(name, args, client) is asked before every call, and every
-- call is audited (`mcp.tool_call`, with the client's name).
local claw = require "clawlua"

local json = claw.json
local audit = claw.audit

local M = {}

M.INVALID_PARAMS = -32602
M.DEFAULT_MAX_SANDBOXES = 8
M.MAX_AUDIT_EVENTS = 1000
M.PROGRESS_INTERVAL = 1.0
--- The largest file sandbox_read_file returns: base64 of it (4/3) still fits the default
--- 16 MiB message cap.
M.MAX_READ = 8 << 20

---------------------------------------------------------------------------------------------
-- helpers
---------------------------------------------------------------------------------------------

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_INDEX = {}
for i = 1, 64 do B64_INDEX[B64:byte(i)] = i - 1 end

--- Base64 (RFC 4648, with padding).
function M.base64_encode(s)
  local out, n = {}, 0
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local v = (a << 16) | ((b or 0) << 8) | (c or 0)
    n = n + 1
    out[n] = string.char(B64:byte((v >> 18) + 1), B64:byte(((v >> 12) & 63) + 1),
      b and B64:byte(((v >> 6) & 63) + 1) or 61, c and B64:byte((v & 63) + 1) or 61)
  end
  return table.concat(out)
end

--- Decodes base64 (whitespace ignored); nil, reason for anything else.
function M.base64_decode(s)
  s = s:gsub("%s", "")
  if #s % 4 ~= 0 then return nil, "length is not a multiple of 4" end
  local out, n = {}, 0
  for i = 1, #s, 4 do
    local c1, c2, c3, c4 = s:byte(i, i + 3)
    local a, b = B64_INDEX[c1], B64_INDEX[c2]
    local c = c3 == 61 and 0 or B64_INDEX[c3]
    local d = c4 == 61 and 0 or B64_INDEX[c4]
    if not (a and b and c and d) or (c3 == 61 and c4 ~= 61) or ((c3 == 61 or c4 == 61) and i + 3 < #s) then
      return nil, ("invalid character near offset %d"):format(i - 1)
    end
    local v = (a << 18) | (b << 12) | (c << 6) | d
    n = n + 1
    if c3 == 61 then
      out[n] = string.char(v >> 16)
    elseif c4 == 61 then
      out[n] = string.char(v >> 16, (v >> 8) & 255)
    else
      out[n] = string.char(v >> 16, (v >> 8) & 255, v & 255)
    end
  end
  return table.concat(out)
end

--- A copy of v that JSON can hold: functions, userdata and threads are dropped, cycles cut.
local function json_safe(v, seen)
  local t = type(v)
  if t == "function" or t == "thread" then return nil end
  if t == "userdata" then return v == json.null and v or nil end
  if t ~= "table" then return v end
  seen = seen or {}
  if seen[v] then return nil end
  seen[v] = true
  local out = {}
  for k, x in pairs(v) do
    if type(k) == "string" or math.type(k) == "integer" then out[k] = json_safe(x, seen) end
  end
  seen[v] = nil
  if json.is_array(v) then return json.array(out) end
  return out
end
M.json_safe = json_safe

--- s with every byte that is not part of valid UTF-8 replaced by U+FFFD (JSON carries text
--- only: a command's binary output must not make its result unsendable).
function M.utf8_text(s)
  if utf8.len(s) then return s end
  local out, n, i, len = {}, 0, 1, #s
  while i <= len do
    local bad = select(2, utf8.len(s, i))
    local stop = bad and bad - 1 or len
    if stop >= i then
      n = n + 1
      out[n] = s:sub(i, stop)
    end
    if not bad then break end
    n = n + 1
    out[n] = "\u{FFFD}"
    i = bad + 1
  end
  return table.concat(out)
end

local function obj(props, required, extra)
  local s = { type = "object", properties = props, additionalProperties = false }
  if required then s.required = json.array(required) end
  for k, v in pairs(extra or {}) do s[k] = v end
  return s
end

local ID = { type = "string", minLength = 1, maxLength = 128, description = "sandbox id (from sandbox_create)" }
local NETWORK = {
  type = "object",
  description = "egress: 'deny' or 'allow'; allow: host names or CIDRs the sandbox may reach",
  properties = {
    egress = { type = "string", enum = json.array { "deny", "allow" } },
    allow = { type = "array", items = { type = "string", minLength = 1 }, maxItems = 256 },
    resolvers = { type = "array", items = { type = "string", minLength = 1 }, maxItems = 16 },
  },
  additionalProperties = false,
}
local INFO = { type = "object", required = json.array { "id", "backend" },
  properties = { id = { type = "string" }, backend = { type = "string" }, state = { type = "string" } } }

---------------------------------------------------------------------------------------------
-- the tools (fixed order)
---------------------------------------------------------------------------------------------

local DEFS = {
  {
    name = "sandbox_create", title = "Create a sandbox",
    description = "Create an isolated sandbox under the operator's policy and return its id. " ..
      "backend: 'vm' (a microVM) or 'jail' (namespaces and seccomp), when the policy allows the choice.",
    input = obj({ policy = { type = "string",
                             description = "name of the policy to use (the server's policy by default)" },
                  backend = { type = "string", enum = json.array { "vm", "jail" } } }),
    output = INFO,
  },
  {
    name = "sandbox_exec", title = "Run a command in a sandbox",
    description = "Run a command (argv, no shell unless you call one) in a sandbox and return its " ..
      "exit code and output. A non-zero exit code is a result, not an error. timeout_s kills the " ..
      "command (the result says timed_out).",
    input = obj({
      id = ID,
      command = { type = "array", items = { type = "string" }, minItems = 1, maxItems = 4096 },
      stdin = { type = "string" },
      env = { type = "object", additionalProperties = { type = "string" } },
      cwd = { type = "string", minLength = 1 },
      timeout_s = { type = "number", exclusiveMinimum = 0, maximum = 86400 },
    }, { "id", "command" }),
    output = obj({ exit_code = { type = { "integer", "null" } }, signal = { type = "string" },
                   stdout = { type = "string" }, stderr = { type = "string" },
                   timed_out = { type = "boolean" }, truncated = { type = "boolean" },
                   duration_ms = { type = "number" } },
                 { "exit_code", "stdout", "stderr", "timed_out", "duration_ms" }),
  },
  {
    name = "sandbox_write_file", title = "Write a file into a sandbox",
    description = "Write content to a file in a sandbox (encoding 'utf8', the default, or 'base64' for binary data).",
    input = obj({ id = ID, path = { type = "string", minLength = 1 }, content = { type = "string" },
                  encoding = { type = "string", enum = json.array { "utf8", "base64" } },
                  mode = { type = "integer", minimum = 0, maximum = 4095 } },
                { "id", "path", "content" }),
    output = obj({ id = { type = "string" }, path = { type = "string" }, bytes = { type = "integer" } },
                 { "id", "path", "bytes" }),
  },
  {
    name = "sandbox_read_file", title = "Read a file from a sandbox",
    description = "Read a file from a sandbox. encoding 'utf8' (default) fails on binary data; use 'base64' for it.",
    input = obj({ id = ID, path = { type = "string", minLength = 1 },
                  encoding = { type = "string", enum = json.array { "utf8", "base64" } },
                  max_bytes = { type = "integer", minimum = 1, maximum = M.MAX_READ } },
                { "id", "path" }),
    output = obj({ content = { type = "string" }, encoding = { type = "string" }, bytes = { type = "integer" } },
                 { "content", "encoding", "bytes" }),
  },
  {
    name = "sandbox_list", title = "List sandboxes",
    description = "List the sandboxes this server created that still exist.",
    input = obj({}),
    output = obj({ sandboxes = { type = "array", items = INFO } }, { "sandboxes" }),
  },
  {
    name = "sandbox_destroy", title = "Destroy a sandbox",
    description = "Destroy a sandbox and everything it owns (processes, network, files).",
    input = obj({ id = ID }, { "id" }),
    output = obj({ id = { type = "string" }, destroyed = { type = "boolean" } }, { "id", "destroyed" }),
  },
  {
    name = "sandbox_update_policy", title = "Change a sandbox's network policy",
    description = "Replace a sandbox's network policy (atomically), within what the operator's policy allows.",
    input = obj({ id = ID, network = NETWORK }, { "id", "network" }),
    output = obj({ id = { type = "string" }, network = { type = "object" } }, { "id", "network" }),
  },
  {
    name = "audit_query", title = "Query the audit log",
    description = "Recent audit events, newest last: kind is a prefix ('sandbox' matches sandbox.*), " ..
      "since a Unix time, limit at most 1000 (default 100).",
    input = obj({ kind = { type = "string" }, sandbox = { type = "string" },
                  since = { type = "number" }, limit = { type = "integer", minimum = 1, maximum = 1000 } }),
    output = obj({ events = { type = "array", items = { type = "object" } } }, { "events" }),
  },
  {
    name = "policy_show", title = "Show the policy", inline = true,
    description = "The operator's policy this server applies (backend, resources, network, files).",
    input = obj({}),
    output = { type = "object" },
  },
}

-- Benchmark-only (`clawlua mcp --bench-echo`): the cheapest possible tool, for comparing the
-- protocol path with other servers' echo tools. Not part of the product's tool set.
local ECHO = {
  name = "echo", title = "Echo", description = "Echo the given text back (benchmark only)", inline = true,
  input = obj({ text = { type = "string" } }, { "text" }),
  output = obj({ text = { type = "string" } }, { "text" }),
}

---------------------------------------------------------------------------------------------
-- the tool set
---------------------------------------------------------------------------------------------

local Set = {}
Set.__index = Set

---@class clawlua.mcp.toolset_opts
---@field policy table|nil        a policy (clawlua.policy); default policy.default(), loaded when needed
---@field max_sandboxes integer|nil live sandboxes this set may hold (default 8)
---@field sandbox table|nil       the sandbox module (default require "clawlua.sandbox", loaded when needed)
---@field bench_echo boolean|nil  add the benchmark-only `echo` tool

--- A tool set.
---@param opts clawlua.mcp.toolset_opts|nil
function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("bad argument #1 to 'tools.new' (table expected)", 2) end
  local maxs = opts.max_sandboxes or M.DEFAULT_MAX_SANDBOXES
  if math.type(maxs) ~= "integer" or maxs < 0 then
    error("bad field 'max_sandboxes' (non-negative integer expected)", 2)
  end
  if opts.policy ~= nil and type(opts.policy) ~= "table" then error("bad field 'policy' (table expected)", 2) end
  if opts.sandbox ~= nil and type(opts.sandbox) ~= "table" then
    error("bad field 'sandbox' (module table expected)", 2)
  end
  local self = setmetatable({
    policy = opts.policy, -- the policy applied (the agent loop reads it: no second hook call)
    sandbox_mod = opts.sandbox,
    max_sandboxes = maxs,
    boxes = {},   -- id -> sb (the sandboxes this set created)
    order = {},   -- ids in creation order
    pending = 0,  -- creations under way
    defs = {}, by_name = {}, listing = {},
  }, Set)
  local defs = {}
  for _, d in ipairs(DEFS) do defs[#defs + 1] = d end
  if opts.bench_echo then defs[#defs + 1] = ECHO end
  for i, d in ipairs(defs) do
    self.defs[i] = d
    self.by_name[d.name] = { def = d } -- its validator: made by the first call (see Set:call)
    self.listing[i] = { name = d.name, title = d.title, description = d.description,
                        inputSchema = d.input, outputSchema = d.output }
  end
  return self
end

--- Whether the tool never waits (no sandbox, no process, no I/O): the server then answers its
--- calls in its reading task instead of a task of their own. Tools with `inline = true`.
---@param name string
---@return boolean
function Set:inline(name)
  local t = self.by_name[name]
  return t ~= nil and t.def.inline == true
end

--- The tools, in their fixed order.
function Set:list()
  local t = {}
  for i, l in ipairs(self.listing) do t[i] = l end
  return t
end

function Set:sandbox_module()
  if not self.sandbox_mod then self.sandbox_mod = require "clawlua.sandbox" end
  return self.sandbox_mod
end

--- The policy (the default one is loaded on first use, once). nil, reason when there is none.
function Set:current_policy()
  if self.policy then return self.policy end
  if self.policy_error then return nil, self.policy_error end
  local ok, pol = pcall(require, "clawlua.policy")
  local p, err
  if ok then
    p, err = pol.default()
  else
    err = "no policy module: " .. tostring(pol)
  end
  if not p then
    self.policy_error = err
    return nil, err
  end
  self.policy = p
  return p
end

local function text_result(structured, text, is_error)
  return { content = json.array { { type = "text", text = text } },
           structuredContent = structured, isError = is_error or false }
end

local function tool_error(message)
  return text_result(nil, message, true)
end

local function render(v)
  return json.encode(v, { pretty = true, sort_keys = true }) or tostring(v)
end

function Set:box(id)
  local sb = self.boxes[id]
  if not sb then return nil, ("no sandbox '%s' (sandbox_list shows the live ones)"):format(id) end
  return sb
end

local function forget(self, id)
  self.boxes[id] = nil
  for i, v in ipairs(self.order) do
    if v == id then
      table.remove(self.order, i)
      break
    end
  end
end

local function info_of(sb)
  local ok, info = pcall(sb.info, sb)
  if not ok or type(info) ~= "table" then
    return { id = sb.id, backend = sb.backend, state = "unknown" }
  end
  info = json_safe(info)
  info.id = info.id or sb.id
  info.backend = info.backend or sb.backend
  if type(info.policy) == "table" then info.policy = info.policy.name end
  return info
end

--- Calls fn(...) protected, reporting progress every PROGRESS_INTERVAL seconds meanwhile when
--- the caller asked for progress (a sandbox's boot, a long command). Returns pcall's results.
local function with_progress(ctx, what, total, fn, ...)
  if not ctx.progress then return pcall(fn, ...) end
  local t0 = claw.now()
  ctx.progress(0, total, "started " .. what)
  local ticker = claw.spawn(function()
    while true do
      claw.sleep(M.PROGRESS_INTERVAL)
      local el = claw.now() - t0
      ctx.progress(el, total, ("%s: running for %.0f s"):format(what, el))
    end
  end)
  local res = table.pack(pcall(fn, ...))
  ticker:cancel()
  return table.unpack(res, 1, res.n)
end

-- Sandboxes that ended without this set (their policy's lifetime ran out) are dropped: they
-- no longer count towards max_sandboxes nor show in sandbox_list.
local function prune(self)
  for i = #self.order, 1, -1 do
    local id = self.order[i]
    local sb = self.boxes[id]
    if not sb or sb:info().state == "destroyed" then forget(self, id) end
  end
end

local impl = {}

function impl.sandbox_create(self, args, ctx)
  local p, perr = self:current_policy()
  if not p then return tool_error("cannot create a sandbox: " .. perr) end
  if args.policy ~= nil and args.policy ~= p.name then
    return tool_error(("unknown policy '%s': this server applies policy '%s'"):format(args.policy, tostring(p.name)))
  end
  prune(self)
  local live = #self.order + self.pending
  if live >= self.max_sandboxes then
    return tool_error(("sandbox limit reached (%d live, at most %d): destroy one first"):format(live,
      self.max_sandboxes))
  end
  local mod = self:sandbox_module()
  self.pending = self.pending + 1
  local ok, sb, err = with_progress(ctx, "sandbox boot", nil, mod.create, p,
    args.backend and { backend = args.backend } or nil)
  self.pending = self.pending - 1
  if not ok then error(sb, 0) end
  if not sb then return tool_error("cannot create a sandbox: " .. tostring(err)) end
  if self.closed then
    sb:destroy()
    return tool_error("the tool set is closed")
  end
  self.boxes[sb.id] = sb
  self.order[#self.order + 1] = sb.id
  local info = info_of(sb)
  return text_result(info, ("created sandbox %s (backend %s)"):format(sb.id, tostring(sb.backend)))
end

function impl.sandbox_exec(self, args, ctx)
  local sb, err = self:box(args.id)
  if not sb then return tool_error(err) end
  local spec = {}
  for i, a in ipairs(args.command) do spec[i] = a end
  spec.stdin, spec.env, spec.cwd, spec.timeout = args.stdin, args.env, args.cwd, args.timeout_s
  local ok, r, xerr = with_progress(ctx, args.command[1], args.timeout_s, sb.exec, sb, spec)
  if not ok then error(r, 0) end
  if not r then return tool_error(("exec in %s failed: %s"):format(args.id, tostring(xerr))) end
  local out = {
    exit_code = r.code == nil and json.null or r.code,
    signal = r.signal ~= nil and tostring(r.signal) or nil,
    stdout = M.utf8_text(r.stdout or ""), stderr = M.utf8_text(r.stderr or ""),
    timed_out = r.timed_out == true, truncated = r.truncated == true,
    duration_ms = (r.duration or 0) * 1000,
  }
  local head = r.timed_out and "timed out" or
    (r.code ~= nil and ("exit " .. r.code) or ("killed by " .. tostring(r.signal)))
  local text = head .. "\n--- stdout\n" .. out.stdout .. "\n--- stderr\n" .. out.stderr
  return text_result(out, text)
end

function impl.sandbox_write_file(self, args)
  local sb, err = self:box(args.id)
  if not sb then return tool_error(err) end
  local data = args.content
  if args.encoding == "base64" then
    local d, derr = M.base64_decode(data)
    if not d then return tool_error("content is not valid base64: " .. derr) end
    data = d
  end
  local ok, werr = sb:write_file(args.path, data, args.mode and { mode = args.mode } or nil)
  if not ok then return tool_error(("write %s in %s failed: %s"):format(args.path, args.id, tostring(werr))) end
  return text_result({ id = args.id, path = args.path, bytes = #data },
    ("wrote %d bytes to %s in %s"):format(#data, args.path, args.id))
end

function impl.sandbox_read_file(self, args)
  local sb, err = self:box(args.id)
  if not sb then return tool_error(err) end
  local data, rerr = sb:read_file(args.path, { max = args.max_bytes or M.MAX_READ })
  if not data then return tool_error(("read %s in %s failed: %s"):format(args.path, args.id, tostring(rerr))) end
  local enc = args.encoding or "utf8"
  local content = data
  if enc == "utf8" then
    if not utf8.len(data) then
      return tool_error(("%s is not valid UTF-8 text: read it with encoding 'base64'"):format(args.path))
    end
  else
    content = M.base64_encode(data)
  end
  return text_result({ content = content, encoding = enc, bytes = #data }, content)
end

function impl.sandbox_list(self)
  local list = {}
  for _, id in ipairs { table.unpack(self.order) } do -- (a copy: forget edits the order)
    local i = info_of(self.boxes[id])
    if i.state == "destroyed" then forget(self, id) else list[#list + 1] = i end -- see prune
  end
  local lines = {}
  for _, i in ipairs(list) do lines[#lines + 1] = ("%s  %s  %s"):format(i.id, i.backend, tostring(i.state)) end
  return text_result({ sandboxes = json.array(list) },
    #lines > 0 and table.concat(lines, "\n") or "no sandboxes")
end

function impl.sandbox_destroy(self, args)
  local sb, err = self:box(args.id)
  if not sb then return tool_error(err) end
  forget(self, args.id)
  local ok, derr = sb:destroy()
  if ok == nil and derr then return tool_error(("destroy %s: %s"):format(args.id, tostring(derr))) end
  return text_result({ id = args.id, destroyed = true }, "destroyed sandbox " .. args.id)
end

function impl.sandbox_update_policy(self, args)
  local sb, err = self:box(args.id)
  if not sb then return tool_error(err) end
  local ok, uerr = sb:update_policy { network = args.network }
  if not ok then return tool_error(("update_policy %s: %s"):format(args.id, tostring(uerr))) end
  return text_result({ id = args.id, network = args.network },
    ("network policy of %s is now %s"):format(args.id, render(args.network)))
end

function impl.audit_query(_, args)
  local events = audit.events { kind = args.kind, sandbox = args.sandbox, since = args.since,
                                limit = args.limit or 100 }
  local lines = {}
  for i, ev in ipairs(events) do lines[i] = audit.format(ev) end
  return text_result({ events = json.array(json_safe(events)) },
    #lines > 0 and table.concat(lines, "\n") or "no matching events")
end

function impl.policy_show(self)
  local p, perr = self:current_policy()
  if not p then return tool_error(perr) end
  local ok, pol = pcall(require, "clawlua.policy")
  local d = ok and pol.is_policy(p) and pol.describe(p) or json_safe(p)
  return text_result(d, render(d))
end

function impl.echo(_, args)
  return text_result({ text = args.text }, args.text)
end

--- Asks the policy's hook; returns true, or false and the reason.
function Set:allowed(name, args, client)
  local p = name ~= "echo" and self:current_policy() or nil
  local hook = p and type(p.hooks) == "table" and p.hooks.on_tool_call
  if type(hook) ~= "function" then return true end
  -- clawlua.policy runs hooks under its instruction budget; a hook that fails or runs out denies
  local ok, pol = pcall(require, "clawlua.policy")
  if ok and pol.is_policy and pol.is_policy(p) then return pol.call_hook(p, "on_tool_call", name, args, client) end
  local done, verdict, reason = pcall(hook, name, args, client)
  if not done then return false, "the policy's on_tool_call hook failed: " .. tostring(verdict) end
  if verdict == true then return true end
  return false, reason and tostring(reason) or "refused by the policy"
end

--- Calls a tool.
---@param name string
---@param args table|nil the decoded arguments
---@param ctx {client: string|nil, progress: fun(done: number, total: number|nil, message: string|nil)|nil}|nil
---@return table|nil result, table|nil error {code=-32602, message=}
function Set:call(name, args, ctx)
  ctx = ctx or {}
  args = args or json.object {}
  local t = self.by_name[name]
  if not t then
    return nil, { code = M.INVALID_PARAMS, message = ("unknown tool '%s'"):format(tostring(name)) }
  end
  local v = t.validator
  if not v then
    -- The schema module and each validator are loaded on first use: a server answers
    -- initialize and tools/list without them.
    v = require("clawlua.mcp.schema").new(t.def.input)
    t.validator = v
  end
  local ok, errs = v:validate(args)
  if ok == nil then errs = { errs } end
  if not ok then
    return nil, { code = M.INVALID_PARAMS,
                  message = ("invalid arguments for tool '%s': %s"):format(name, table.concat(errs, "; ")),
                  data = { errors = json.array(errs) } }
  end
  local client = ctx.client or "unknown"
  local t0 = claw.now()
  local allowed, reason = self:allowed(name, args, client)
  local result
  if not allowed then
    audit.emit("policy.deny", { tool = name, client = client, sandbox = args.id, reason = reason })
    result = tool_error(("%s denied: %s"):format(name, reason))
  elseif self.closed then
    result = tool_error("the tool set is closed")
  else
    result = impl[name](self, args, ctx)
  end
  if name ~= "echo" then
    audit.emit("mcp.tool_call", { tool = name, client = client, sandbox = args.id or
      (result.structuredContent and result.structuredContent.id), is_error = result.isError,
      allowed = allowed, duration_ms = (claw.now() - t0) * 1000 })
  end
  return result
end

--- The resources: the audit log and the sandbox list.
function Set.resources(_)
  return {
    { uri = "clawlua://audit", name = "audit", title = "Audit log",
      description = "The latest audit events (up to 100) as JSON", mimeType = "application/json" },
    { uri = "clawlua://sandboxes", name = "sandboxes", title = "Sandboxes",
      description = "The sandboxes this server created, as JSON", mimeType = "application/json" },
  }
end

--- Reads a resource: an array of contents, or nil, reason.
function Set:read_resource(uri)
  local value
  if uri == "clawlua://audit" then
    value = { events = json.array(json_safe(audit.events { limit = 100 })) }
  elseif uri == "clawlua://sandboxes" then
    value = impl.sandbox_list(self).structuredContent
  else
    return nil, ("resource not found: %s"):format(uri)
  end
  return { { uri = uri, mimeType = "application/json", text = json.encode(value) } }
end

--- Destroys every sandbox the set created (newest first). Idempotent.
function Set:close()
  if self.closed then return end
  self.closed = true
  for i = #self.order, 1, -1 do
    local id = self.order[i]
    local sb = self.boxes[id]
    self.boxes[id], self.order[i] = nil, nil
    local ok, err = pcall(sb.destroy, sb)
    if not ok then audit.emit("mcp.error", { sandbox = id, error = "destroy: " .. tostring(err) }) end
  end
end

return M
