-- clawlua.mcp.client: an MCP client over stdio. Spawns the server through clawlua.proc, speaks
-- the 2025-06-18 and 2025-11-25 revisions (initialize, then requests) and the stateless
-- 2026-07-28 revision (server/discover, the protocol version and client identity in every
-- request's _meta), lists and calls tools, routes progress, answers the server's own requests
-- it does not support with method-not-found, and fails every pending request when the server
-- dies. It is also a tool set for the agent loop (list(), call(name, args, ctx), close()).
local claw = require "clawlua"
local json = require "clawlua.json"

local M = {}

M.VERSIONS = { "2026-07-28", "2025-11-25", "2025-06-18" }
local STATELESS = "2026-07-28"
local KNOWN = { ["2026-07-28"] = true, ["2025-11-25"] = true, ["2025-06-18"] = true }
local CLIENT_INFO = { name = "clawlua", version = claw.version or "dev" }
local META = "io.modelcontextprotocol/"

local MAX_FRAME = 16 << 20
local WRITE_QUEUE = 256
local STDERR_KEEP = 4096

---@class clawlua.mcp.client
---@field name string
---@field protocol string the revision agreed with the server
---@field server_info table|nil
---@field capabilities table|nil the server's
---@field instructions string|nil
local Client = {}
Client.__index = Client

local function field_error(name, want, v)
  error(("bad field '%s' (%s expected, got %s)"):format(name, want, type(v)), 3)
end

local function argv_of(command)
  if type(command) == "table" then
    local argv = {}
    for i, a in ipairs(command) do argv[i] = tostring(a) end
    if #argv == 0 then error("bad field 'command' (non-empty array expected)", 3) end
    return argv
  end
  if type(command) ~= "string" then field_error("command", "array or string", command) end
  local argv = {} -- a command line: words split on blanks, single or double quotes group
  local i, n = 1, #command
  while i <= n do
    local c = command:sub(i, i)
    if c:match("%s") then
      i = i + 1
    else
      local word = {}
      while i <= n and not command:sub(i, i):match("%s") do
        local q = command:sub(i, i)
        if q == "'" or q == '"' then
          local j = command:find(q, i + 1, true)
          if not j then error("bad field 'command' (unterminated quote)", 3) end
          word[#word + 1] = command:sub(i + 1, j - 1)
          i = j + 1
        else
          word[#word + 1] = q
          i = i + 1
        end
      end
      argv[#argv + 1] = table.concat(word)
    end
  end
  if #argv == 0 then error("bad field 'command' (empty command line)", 3) end
  return argv
end

M.split_command = function(s) return argv_of(s) end

--- Spawns an MCP server and performs the handshake.
---@class clawlua.mcp.connect_options
---@field command string|string[] argv, or a command line (words, with quotes)
---@field name string|nil used in messages (default: the program's name)
---@field env table|nil merged into the environment
---@field cwd string|nil
---@field protocol string|nil a revision; nil: 2026-07-28 when the server has it, else 2025-11-25
---@field timeout number|nil seconds per request (60)
---@field on_notification fun(method: string, params: table)|nil

---@param opts clawlua.mcp.connect_options
---@return clawlua.mcp.client|nil, string|nil
function M.connect(opts)
  if type(opts) ~= "table" then error("mcp.client.connect{command=, ...} expected", 2) end
  local argv = argv_of(opts.command)
  if opts.protocol ~= nil and not KNOWN[opts.protocol] then
    error(("bad field 'protocol' (one of 2026-07-28, 2025-11-25, 2025-06-18 expected, got %s)")
      :format(tostring(opts.protocol)), 2)
  end
  if opts.timeout ~= nil and type(opts.timeout) ~= "number" then field_error("timeout", "number", opts.timeout) end
  local spawn = { stdin = "pipe", stdout = "pipe", stderr = "pipe", env = opts.env, cwd = opts.cwd }
  for i, a in ipairs(argv) do spawn[i] = a end
  local p, err = claw.proc.spawn(spawn)
  if not p then return nil, ("mcp: cannot start %s: %s"):format(argv[1], err) end
  local self = setmetatable({
    name = opts.name or argv[1]:match("[^/]+$"),
    proc = p,
    timeout = opts.timeout or 60,
    on_notification = opts.on_notification,
    next_id = 0,
    pending = {},
    progress = {},
    tools_cache = nil,
    dead = nil,
    stderr_tail = "",
    notifications = 0,
    unsupported = 0,
    writes = claw.channel(WRITE_QUEUE),
  }, Client)
  self.tasks = {
    claw.spawn(function() self:read_loop() end),
    claw.spawn(function() self:write_loop() end),
    claw.spawn(function() self:stderr_loop() end),
  }
  local ok, herr = self:handshake(opts.protocol)
  if not ok then
    self:close()
    return nil, herr
  end
  return self
end

function Client:__tostring()
  return ("mcp.client(%s, %s)"):format(self.name, self.protocol or "?")
end

function Client:stderr_loop()
  local s = self.proc.stderr
  while true do
    local chunk = s:read(4096)
    if not chunk or chunk == "" then return end
    self.stderr_tail = (self.stderr_tail .. chunk):sub(-STDERR_KEEP)
  end
end

function Client:write_loop()
  while true do
    local line = self.writes:recv()
    if not line then return end
    local pok, ok, err = pcall(self.proc.stdin.write, self.proc.stdin, line)
    if not pok or not ok then
      err = pok and err or ok
      -- A server that is gone is reported by the reader, with its exit status and last words.
      self.tasks[1]:join(3)
      self:fail(("mcp %s: cannot write to the server: %s"):format(self.name, tostring(err)))
      return
    end
  end
end

-- Every waiting request fails with why the server is gone; later requests fail at once.
function Client:fail(why)
  if self.dead then return end
  self.dead = why
  for id, ch in pairs(self.pending) do
    self.pending[id] = nil
    ch:try_send { dead = why }
  end
  self.writes:close()
end

function Client:send(msg)
  if self.dead then return nil, self.dead end
  local line, err = json.encode(msg)
  if not line then error("mcp client: " .. err, 3) end
  return self.writes:send(line .. "\n")
end

function Client:handle_request(msg)
  if msg.method == "ping" then
    return self:send { jsonrpc = "2.0", id = msg.id, result = json.object {} }
  end
  -- sampling, elicitation, roots: this client offers none of them
  self.unsupported = self.unsupported + 1
  return self:send { jsonrpc = "2.0", id = msg.id,
                     error = { code = -32601, message = "Method not found: " .. tostring(msg.method) } }
end

function Client:handle_notification(msg)
  self.notifications = self.notifications + 1
  local params = type(msg.params) == "table" and msg.params or {}
  if msg.method == "notifications/progress" then
    local fn = params.progressToken ~= nil and self.progress[params.progressToken]
    if fn then fn(params.progress, params.total, params.message) end
  elseif msg.method == "notifications/tools/list_changed" then
    self.tools_cache = nil
  end
  if self.on_notification then self.on_notification(msg.method, params) end
end

function Client:read_loop()
  local out = self.proc.stdout
  while true do
    local line, err = out:read_line(MAX_FRAME)
    if not line then
      if not (err and tostring(err):match("skipped")) then break end
      line = "" -- an oversized frame is skipped; reading goes on
    end
    if line ~= "" then
      local msg = json.decode(line)
      if type(msg) == "table" then
        if msg.method ~= nil and msg.id ~= nil then
          self:handle_request(msg)
        elseif msg.method ~= nil then
          self:handle_notification(msg)
        elseif msg.id ~= nil then
          local ch = self.pending[msg.id]
          if ch then
            self.pending[msg.id] = nil
            ch:try_send(msg)
          end
        end
      end -- a line that is not JSON is noise from the server: skipped
    end
  end
  local st = self.proc:wait(2)
  self.tasks[3]:join(1) -- what the server said on stderr as it went
  local how = st and (st.code and ("exit code " .. st.code) or ("signal " .. tostring(st.signal_name or st.signal)))
              or "closed its output"
  local tail = self.stderr_tail:gsub("%s+$", ""):match("[^\n]*$")
  self:fail(("mcp %s: server exited (%s)%s"):format(self.name, how, tail ~= "" and (": " .. tail) or ""))
end

local function meta_for(self, params)
  if self.protocol ~= STATELESS then return params end
  params = params or {}
  local meta = params._meta or {}
  meta[META .. "protocolVersion"] = STATELESS
  meta[META .. "clientInfo"] = CLIENT_INFO
  meta[META .. "clientCapabilities"] = json.object {}
  params._meta = meta
  return params
end

--- Sends a request and waits for its answer.
---@param method string
---@param params table|nil
---@param opts {timeout: number|nil, progress: fun(done: number, total: number|nil, message: string|nil)|nil}|nil
---@return table|nil, string|nil, integer|nil
function Client:request(method, params, opts)
  opts = opts or {}
  if self.dead then return nil, self.dead, -32000 end
  self.next_id = self.next_id + 1
  local id = self.next_id
  params = meta_for(self, params or json.object {})
  local token
  if opts.progress then
    token = ("p%d"):format(id)
    params._meta = params._meta or {}
    params._meta.progressToken = token
    self.progress[token] = opts.progress
  end
  local ch = claw.channel(1)
  self.pending[id] = ch
  self:send { jsonrpc = "2.0", id = id, method = method, params = params }
  local timeout = opts.timeout or self.timeout
  local ok, msg, werr = pcall(ch.recv, ch, timeout)
  self.pending[id] = nil
  if token then self.progress[token] = nil end
  if not ok then -- the calling task was cancelled: tell the server, then go on unwinding
    if not self.dead then
      self:send { jsonrpc = "2.0", method = "notifications/cancelled",
                  params = meta_for(self, { requestId = id, reason = "cancelled by the client" }) }
    end
    error(msg, 0)
  end
  if not msg then
    if werr == "timeout" then
      self:send { jsonrpc = "2.0", method = "notifications/cancelled",
                  params = meta_for(self, { requestId = id, reason = "timeout" }) }
      return nil, ("mcp %s: %s timed out after %gs"):format(self.name, method, timeout), -32001
    end
    return nil, self.dead or ("mcp %s: %s: %s"):format(self.name, method, tostring(werr)), -32000
  end
  if msg.dead then return nil, msg.dead, -32000 end
  if msg.error then
    local e = type(msg.error) == "table" and msg.error or { message = tostring(msg.error) }
    return nil, ("mcp %s: %s: %s"):format(self.name, method, tostring(e.message)), math.tointeger(e.code)
  end
  if type(msg.result) ~= "table" then
    return nil, ("mcp %s: %s: malformed result"):format(self.name, method), -32603
  end
  local rt = msg.result.resultType
  if rt ~= nil and rt ~= "complete" then
    return nil, ("mcp %s: %s: result type '%s' is not supported"):format(self.name, method, tostring(rt)), -32603
  end
  return msg.result
end

--- Sends a notification.
function Client:notify(method, params)
  return self:send { jsonrpc = "2.0", method = method, params = meta_for(self, params) }
end

function Client:handshake(want)
  if want == nil or want == STATELESS then
    local r, err = self:request("server/discover", {
      _meta = { [META .. "protocolVersion"] = STATELESS, [META .. "clientInfo"] = CLIENT_INFO,
                [META .. "clientCapabilities"] = json.object {} } }, { timeout = self.timeout })
    if r then
      for _, v in ipairs(r.supportedVersions or {}) do
        if v == STATELESS then
          self.protocol = STATELESS
          self.capabilities = r.capabilities
          self.server_info = r.serverInfo
          self.instructions = r.instructions
          return true
        end
      end
      if want then return nil, ("mcp %s: server does not support %s"):format(self.name, STATELESS) end
    elseif want or self.dead then
      return nil, err
    end
  end
  local version = want or "2025-11-25"
  local r, err = self:request("initialize", { protocolVersion = version, capabilities = json.object {},
                                              clientInfo = CLIENT_INFO })
  if not r then return nil, err end
  if not KNOWN[r.protocolVersion] then
    return nil, ("mcp %s: server speaks protocol %s, which this client does not"):format(self.name,
      tostring(r.protocolVersion))
  end
  self.protocol = r.protocolVersion
  self.capabilities = r.capabilities
  self.server_info = r.serverInfo
  self.instructions = r.instructions
  self:notify("notifications/initialized")
  return true
end

--- All the server's tools (every page), cached until the server says its list changed.
---@return table[]|nil, string|nil
function Client:list_tools()
  if self.tools_cache then return self.tools_cache end
  local tools, cursor = {}, nil
  repeat
    local r, err = self:request("tools/list", cursor and { cursor = cursor } or nil)
    if not r then return nil, err end
    for _, t in ipairs(r.tools or {}) do tools[#tools + 1] = t end
    cursor = r.nextCursor
  until cursor == nil or cursor == json.null or #tools > 10000
  self.tools_cache = tools
  return tools
end

--- Calls a tool. Returns the MCP result ({content, structuredContent, isError}).
---@return table|nil, string|nil, integer|nil
function Client:call_tool(name, args, opts)
  return self:request("tools/call", { name = name, arguments = args or json.object {} }, opts)
end

-- Tool set face (the agent loop's duck type).
function Client:list()
  local tools, err = self:list_tools()
  if not tools then error(err, 2) end
  return tools
end

function Client:call(name, args, ctx)
  local r, err, code = self:call_tool(name, args, { progress = ctx and ctx.progress, timeout = ctx and ctx.timeout })
  if not r then return nil, { code = code or -32000, message = err } end
  return r
end

--- Stops the server (closing its stdin first, so it may exit on its own) and its tasks.
function Client:close()
  if self.closed then return true end
  self.closed = true
  self:fail(("mcp %s: client closed"):format(self.name))
  pcall(self.proc.stdin.close, self.proc.stdin)
  if not self.proc:wait(1) then
    self.proc:kill("TERM", "group")
    if not self.proc:wait(2) then
      self.proc:kill("KILL", "group")
      self.proc:wait()
    end
  end
  for _, t in ipairs(self.tasks) do
    if not t:done() then t:cancel() end
  end
  self.proc:close()
  return true
end

Client.__close = Client.close
-- Collected without close: closing the process handle kills the server's group (no waiting).
Client.__gc = function(self) if not self.closed then pcall(self.proc.close, self.proc) end end

return M
