-- The MCP server: reads frames, answers each request in a task of its own (so a 30 s exec does
-- not hold up `tools/list` or `ping`) unless it never waits (ping, tools/list, a tool the tool
-- set marks inline: answered by the reading task, with no task to create), cancels a
-- request's task on `notifications/cancelled`, reports progress when the request carries a
-- progressToken, and closes its tool set (every sandbox it created) when the input ends or the
-- process is told to stop.
local claw = require "clawlua"
local rpc = require "clawlua.mcp.rpc"
local protocol = require "clawlua.mcp.protocol"

local json = claw.json

local M = {}

--- Seconds the requests in flight get to finish once the input has ended. Short: a client that
--- vanished (killed: its end of both pipes closed) looks the same, and the server must be gone
--- within 2 s with its sandboxes destroyed (mcp_vanish_spec: 1.0 made that 1.1-1.2 s on a quiet
--- machine, destroying a jail sandbox included; 0.5 leaves more room under load).
M.DRAIN_GRACE = 0.5
--- Requests handled at once; past this the server stops reading until one finishes, so a
--- client that pipelines without bound cannot make it hold unbounded work.
M.MAX_INFLIGHT = 64
--- Seconds a request of ours to the client (sampling, elicitation) may take.
M.CLIENT_REQUEST_TIMEOUT = 300

local Server = {}
Server.__index = Server

local function invalid_params(message)
  return nil, { code = rpc.INVALID_PARAMS, message = "invalid params: " .. message }
end

local function invalid_request(message)
  return nil, { code = rpc.INVALID_REQUEST, message = "invalid request: " .. message }
end

---@class clawlua.mcp.server_opts
---@field input table        stream to read frames from
---@field output table       stream to write frames to
---@field tools table        a tool set (clawlua.mcp.tools)
---@field log_level string|nil  stderr threshold (default "info"); "off" silences stderr
---@field log fun(line: string)|nil  where stderr lines go (default io.stderr)
---@field max_message integer|nil
---@field max_inflight integer|nil requests handled at once (default 64)
---@field name string|nil
---@field instructions string|nil

--- A server over two streams. `server:serve()` runs it until the input ends.
---@param opts clawlua.mcp.server_opts
function M.new(opts)
  assert(type(opts) == "table", "server.new{input=, output=, tools=} expected")
  if type(opts.tools) ~= "table" then error("bad field 'tools' (tool set expected)", 2) end
  local level = opts.log_level or "info"
  if level ~= "off" and not protocol.LEVEL_RANK[level] then
    error(("bad field 'log_level' (one of %s or off expected)"):format(table.concat(protocol.LEVELS, ", ")), 2)
  end
  local self = setmetatable({
    conn = rpc.conn { input = opts.input, output = opts.output, max_message = opts.max_message },
    tools = opts.tools,
    info = { name = opts.name or "clawlua", version = claw.version, title = "clawlua sandboxes" },
    instructions = opts.instructions or
      "Run untrusted code in isolated sandboxes: sandbox_create, then sandbox_exec / " ..
      "sandbox_write_file / sandbox_read_file, and sandbox_destroy when done. " ..
      "The operator's policy decides what each sandbox may reach.",
    stderr_rank = level == "off" and math.huge or protocol.LEVEL_RANK[level],
    write_log = opts.log or function(line) io.stderr:write(line, "\n") end,
    inflight = {}, -- id key -> {task=, id=}
    ninflight = 0,
    max_inflight = opts.max_inflight or M.MAX_INFLIGHT,
    slot_free = claw.event(),
    outgoing = {},      -- id -> waiter, for our requests to the client
    out_seq = 0,
    version = nil,      -- negotiated session revision (after initialize)
    client = nil,       -- clientInfo of the session
    session_level = nil, -- logging/setLevel
  }, Server)
  local ts = self.tools
  self.caps = protocol.capabilities { prompts = ts.prompts ~= nil, subscribe = ts.subscribe ~= nil,
                                      completions = ts.complete ~= nil }
  return self
end

--- Sends a request to the client and waits for its answer (sampling, elicitation).
---@return table|nil result, table|nil error {code=, message=}
function Server:client_request(method, params, timeout)
  self.out_seq = self.out_seq + 1
  local id = "clawlua-" .. self.out_seq
  local waiter = { ev = claw.event() }
  self.outgoing[id] = waiter
  self.conn:send { jsonrpc = "2.0", id = id, method = method, params = params }
  local ok, err = pcall(waiter.ev.wait, waiter.ev, timeout or M.CLIENT_REQUEST_TIMEOUT)
  self.outgoing[id] = nil
  if not ok then error(err, 0) end -- cancelled: let it through
  local m = waiter.msg
  if not m then return nil, { code = rpc.INTERNAL_ERROR, message = "the client did not answer " .. method } end
  if m.error ~= nil then
    return nil, type(m.error) == "table" and m.error or { code = rpc.INTERNAL_ERROR, message = tostring(m.error) }
  end
  return m.result
end

--- Logs to stderr (at the server's threshold) and, as `notifications/message`, to the client
--- when it asked for that level (the session's `logging/setLevel`, or the request's `_meta`).
---@param level string
---@param data any
---@param req table|nil the request this is about
function Server:log(level, data, req)
  local rank = protocol.LEVEL_RANK[level]
  if rank >= self.stderr_rank then
    self.write_log(("clawlua mcp: %s: %s"):format(level,
      type(data) == "string" and data or (json.encode(data) or tostring(data))))
  end
  local want
  if req and req.version == protocol.STATELESS then
    want = req.log_level
  else
    want = self.session_level
  end
  if want and rank >= protocol.LEVEL_RANK[want] then
    local params = { level = level, logger = "clawlua", data = data }
    self.conn:notify("notifications/message", params)
  end
end

local handlers = {}

function handlers.initialize(self, p)
  if self.version then return invalid_request("the session is already initialized") end
  if type(p.protocolVersion) ~= "string" then
    return invalid_params("field 'protocolVersion' must be a string")
  end
  if type(p.clientInfo) ~= "table" or type(p.clientInfo.name) ~= "string" then
    return invalid_params("field 'clientInfo.name' must be a string")
  end
  if p.capabilities ~= nil and type(p.capabilities) ~= "table" then
    return invalid_params("field 'capabilities' must be an object")
  end
  self.version = protocol.negotiate(p.protocolVersion)
  self.client = { name = p.clientInfo.name, version = p.clientInfo.version }
  self.client_caps = p.capabilities or {}
  self:log("info", ("session with %s %s, protocol %s (asked %s)"):format(self.client.name,
    tostring(self.client.version), self.version, p.protocolVersion))
  return {
    protocolVersion = self.version,
    capabilities = self.caps,
    serverInfo = self.info,
    instructions = self.instructions,
  }
end

function handlers.ping() return json.object {} end

handlers["server/discover"] = function(self)
  return {
    supportedVersions = protocol.supported(),
    capabilities = self.caps,
    instructions = self.instructions,
  }, { ttl_ms = protocol.DISCOVER_TTL_MS, scope = "public" }
end

handlers["logging/setLevel"] = function(self, p)
  if not protocol.LEVEL_RANK[p.level] then
    return invalid_params(("field 'level' must be one of %s"):format(table.concat(protocol.LEVELS, ", ")))
  end
  self.session_level = p.level
  return json.object {}
end

local function check_cursor(p)
  if p.cursor ~= nil then return invalid_params("unknown cursor (the lists have one page)") end
  return true
end

handlers["tools/list"] = function(self, p)
  local ok, err = check_cursor(p)
  if not ok then return nil, err end
  return { tools = json.array(self.tools:list()) },
    { ttl_ms = protocol.TOOLS_TTL_MS, scope = "public" }
end

handlers["tools/call"] = function(self, p, req)
  if type(p.name) ~= "string" then return invalid_params("field 'name' must be a string") end
  local args = p.arguments
  if args == nil then args = json.object {} end
  if type(args) ~= "table" or json.is_array(args) then
    return invalid_params("field 'arguments' must be an object")
  end
  local ctx = { client = req.client_name, progress = req.progress, client_capabilities = req.client_caps,
                log = function(level, data) self:log(level, data, req) end,
                request = function(method, params, timeout) return self:client_request(method, params, timeout) end }
  return self.tools:call(p.name, args, ctx)
end

handlers["resources/list"] = function(self, p)
  local ok, err = check_cursor(p)
  if not ok then return nil, err end
  return { resources = json.array(self.tools:resources()) }, { ttl_ms = 0, scope = "private" }
end

handlers["resources/read"] = function(self, p)
  if type(p.uri) ~= "string" then return invalid_params("field 'uri' must be a string") end
  local contents, err = self.tools:read_resource(p.uri)
  if not contents then
    return nil, { code = protocol.RESOURCE_NOT_FOUND, message = err, data = { uri = p.uri } }
  end
  return { contents = json.array(contents) }, { ttl_ms = 0, scope = "private" }
end

local function not_offered(method)
  return nil, { code = rpc.METHOD_NOT_FOUND,
                message = "method not found: " .. method .. " (not offered by this server)" }
end

handlers["resources/templates/list"] = function(self, p)
  local ok, err = check_cursor(p)
  if not ok then return nil, err end
  local t = self.tools.templates and self.tools:templates() or {}
  return { resourceTemplates = json.array(t) }, { ttl_ms = 0, scope = "private" }
end

local function subscription(method, fn)
  handlers[method] = function(self, p)
    if not self.tools[fn] then return not_offered(method) end
    if type(p.uri) ~= "string" then return invalid_params("field 'uri' must be a string") end
    self.tools[fn](self.tools, p.uri)
    return json.object {}
  end
end
subscription("resources/subscribe", "subscribe")
subscription("resources/unsubscribe", "unsubscribe")

handlers["prompts/list"] = function(self, p)
  if not self.tools.prompts then return not_offered("prompts/list") end
  local ok, err = check_cursor(p)
  if not ok then return nil, err end
  return { prompts = json.array(self.tools:prompts()) }, { ttl_ms = 0, scope = "public" }
end

handlers["prompts/get"] = function(self, p)
  if not self.tools.get_prompt then return not_offered("prompts/get") end
  if type(p.name) ~= "string" then return invalid_params("field 'name' must be a string") end
  local args = p.arguments
  if args ~= nil and (type(args) ~= "table" or json.is_array(args)) then
    return invalid_params("field 'arguments' must be an object")
  end
  return self.tools:get_prompt(p.name, args or {})
end

handlers["completion/complete"] = function(self, p)
  if not self.tools.complete then return not_offered("completion/complete") end
  if type(p.ref) ~= "table" or type(p.argument) ~= "table" then
    return invalid_params("fields 'ref' and 'argument' must be objects")
  end
  return self.tools:complete(p.ref, p.argument)
end

--- Methods that need no session (2025 revisions allow ping before initialize).
local SESSIONLESS = { initialize = true, ping = true, ["server/discover"] = true }
--- Methods of the session revisions only.
local SESSION_ONLY = { initialize = true, ["logging/setLevel"] = true }

--- Works out the revision and the context of a request, or the error to answer it with.
function Server:prepare(frame)
  local p = frame.params
  local version, meta = protocol.request_version(p)
  local req = { id = frame.id, method = frame.method }
  if version ~= nil then
    if version ~= protocol.STATELESS and not protocol.SESSION_VERSIONS[version] then
      return nil, protocol.unsupported_error(version)
    end
  elseif frame.method == "server/discover" then
    version = protocol.STATELESS
  end
  if version == protocol.STATELESS then
    if SESSION_ONLY[frame.method] then
      return nil, { code = rpc.METHOD_NOT_FOUND,
                    message = ("method not found: %s is not part of %s"):format(frame.method, version) }
    end
    local caps = meta and meta[protocol.META_CAPS]
    if frame.method ~= "server/discover" and type(caps) ~= "table" then
      local _, e = invalid_params(("field '_meta.%s' is required in %s"):format(protocol.META_CAPS, version))
      return nil, e
    end
    local ci = meta and meta[protocol.META_CLIENT]
    req.client_name = type(ci) == "table" and type(ci.name) == "string" and ci.name or "unknown"
    req.client_caps = caps
    local lvl = meta and meta[protocol.META_LOG_LEVEL]
    req.log_level = protocol.LEVEL_RANK[lvl] and lvl or nil
  else
    if not self.version and not SESSIONLESS[frame.method] then
      return nil, { code = rpc.INVALID_REQUEST,
                    message = "invalid request: not initialized (send initialize first, or name a " ..
                      "protocol version in _meta)" }
    end
    version = self.version or protocol.LATEST_SESSION
    req.client_name = self.client and self.client.name or "unknown"
    req.client_caps = self.client_caps
  end
  req.version = version
  local token = meta and meta.progressToken
  if token ~= nil and (type(token) == "string" or type(token) == "number") then
    local last = -math.huge
    req.progress = function(done, total, message)
      if type(done) ~= "number" or done <= last then return end -- progress only increases
      last = done
      self.conn:notify("notifications/progress",
        { progressToken = token, progress = done, total = total, message = message })
    end
  end
  return req
end

--- Methods answered by the reading task itself: they never wait, so a task of their own would
--- only add its cost (a coroutine, a closure, two more loop turns) to every call.
local INLINE = { ping = true, initialize = true, ["tools/list"] = true, ["server/discover"] = true,
                 ["logging/setLevel"] = true }

--- Whether a request is answered inline: the methods above, and the tools/call of a tool its
--- tool set declares never waits (`tools:inline(name)`).
function Server:is_inline(frame)
  local m = frame.method
  if INLINE[m] then return true end
  if m ~= "tools/call" then return false end
  local ts, name = self.tools, frame.params.name
  return ts.inline ~= nil and type(name) == "string" and ts:inline(name) == true
end

--- Runs a request to its answer; `key` is its in-flight key (nil for one answered inline).
function Server:run_request(frame, key)
  local req, err = self:prepare(frame)
  local result, cache
  if req then
    local e = key and self.inflight[key]
    if e then e.req = req end
    local h = handlers[frame.method]
    if not h then
      err = { code = rpc.METHOD_NOT_FOUND, message = "method not found: " .. frame.method }
    else
      result, cache = h(self, frame.params, req)
      if result == nil then err = cache end
    end
  end
  if key then
    local entry = self.inflight[key]
    self:finished(key)
    if entry and entry.cancelled then return end
  end
  if result ~= nil then
    protocol.shape_result(req.version, result, type(cache) == "table" and cache.ttl_ms and cache or nil,
      req.version == protocol.STATELESS and self.info or nil)
    self.conn:reply(frame.id, result)
  else
    self.conn:reply_error(frame.id, err.code, err.message, err.data)
  end
end

function Server:finished(key)
  self.inflight[key] = nil
  self.ninflight = self.ninflight - 1
  self.slot_free:set()
end

local function failed(self, frame, e)
  self:log("error", ("%s failed: %s"):format(frame.method, tostring(e)))
  self.conn:reply_error(frame.id, rpc.INTERNAL_ERROR, "internal error in " .. frame.method)
end

function Server:start_request(frame)
  local key = rpc.id_key(frame.id)
  if self.inflight[key] then
    self.conn:reply_error(frame.id, rpc.INVALID_REQUEST,
      "invalid request: a request with this id is still in progress")
    return
  end
  if self:is_inline(frame) then
    local ok, e = xpcall(self.run_request, debug.traceback, self, frame, nil)
    if not ok then
      if claw.is_cancelled(e) then error(e, 0) end -- the server itself is being stopped
      failed(self, frame, e)
    end
    return
  end
  local entry = { id = frame.id }
  self.inflight[key] = entry
  self.ninflight = self.ninflight + 1
  entry.task = claw.spawn(function()
    local ok, e = xpcall(self.run_request, debug.traceback, self, frame, key)
    if not ok then
      if self.inflight[key] == entry then self:finished(key) end
      if claw.is_cancelled(e) or entry.cancelled then return end
      failed(self, frame, e)
    end
  end)
end

function Server:notification(frame)
  local m, p = frame.method, frame.params
  if m == "notifications/cancelled" then
    local id = p.requestId
    if type(id) ~= "string" and type(id) ~= "number" then return end
    local entry = self.inflight[rpc.id_key(id)]
    if entry and not entry.cancelled then
      entry.cancelled = true
      self:log("info", ("request %s cancelled by the client%s"):format(json.encode(id),
        type(p.reason) == "string" and (": " .. p.reason) or ""), entry.req)
      entry.task:cancel()
    end
  elseif m == "notifications/initialized" then
    self.ready = true
  end
  -- Every other notification (roots/list_changed, progress, unknown ones) is ignored, as
  -- JSON-RPC requires: a notification never gets a reply.
end

--- Serves until the input ends (or the task is cancelled: SIGTERM), then cancels what is in
--- flight, flushes the output and closes the tool set (destroying its sandboxes).
function Server:serve()
  local conn = self.conn
  conn.direct_task = claw.current() -- the answers of inline requests skip the writer task
  local _closer <close> = setmetatable({}, { __close = function() self:shutdown() end })
  while true do
    local frame = conn:read()
    if frame == nil then break end
    local kind = frame.kind
    if kind == "request" then
      while self.ninflight >= self.max_inflight do
        self.slot_free:clear()
        self.slot_free:wait()
      end
      self:start_request(frame)
    elseif kind == "notification" then
      self:notification(frame)
    elseif kind == "error" then
      self:log("warning", frame.error.message)
      conn:reply_error(frame.id, frame.error.code, frame.error.message)
    elseif kind == "response" then
      -- The answer to one of our requests; any other response answers nothing and is dropped.
      local w = type(frame.id) == "string" and self.outgoing[frame.id]
      if w then
        w.msg = frame.msg
        w.ev:set()
      end
    end
  end
  self:shutdown(M.DRAIN_GRACE)
  return true
end

local function join_all(tasks, seconds)
  local deadline = claw.now() + seconds
  for _, t in ipairs(tasks) do
    if not t:done() then pcall(t.join, t, math.max(0, deadline - claw.now())) end
  end
end

--- Lets the requests in flight finish for `drain` seconds (at the end of the input; 0 when
--- the server is being stopped), cancels the rest, flushes what is queued, and closes the tool
--- set. Idempotent.
function Server:shutdown(drain)
  if self.closed then return end
  self.closed = true
  local tasks = {}
  for _, e in pairs(self.inflight) do tasks[#tasks + 1] = e.task end
  if drain and drain > 0 then join_all(tasks, drain) end
  for _, e in pairs(self.inflight) do
    e.cancelled = true
    e.task:cancel()
  end
  join_all(tasks, 0.5)
  pcall(self.tools.close, self.tools)
  self.conn:close(0.5)
end

return M
