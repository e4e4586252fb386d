-- JSON-RPC 2.0 over newline-delimited streams (the MCP stdio transport).
--
-- One frame per line. `rpc.classify(line)` turns a line into a request, a notification, a
-- response, or the error reply the spec requires for it; `rpc.conn` reads frames from one
-- stream and writes replies to another through a single writer task, so concurrent handlers
-- never interleave their bytes and a slow reader cannot make the server queue without bound.
local claw = require "clawlua"

local json = claw.json

local M = {}

M.PARSE_ERROR = -32700
M.INVALID_REQUEST = -32600
M.METHOD_NOT_FOUND = -32601
M.INVALID_PARAMS = -32602
M.INTERNAL_ERROR = -32603

M.DEFAULT_MAX_MESSAGE = 16 << 20
M.DEFAULT_MAX_QUEUE = 256

--- A key for an id that keeps its JSON type (1, 1.0 and "1" are three ids).
---@param id string|number
---@return string
function M.id_key(id)
  if type(id) == "string" then return "s:" .. id end
  if math.type(id) == "integer" then return "i:" .. id end
  return ("f:%.17g"):format(id)
end

local function valid_id(id)
  local t = type(id)
  if t == "string" then return true end
  -- A float id is echoed as a float; NaN/inf cannot come out of the JSON decoder.
  return t == "number"
end

---@class clawlua.mcp.frame
---@field kind "request"|"notification"|"response"|"error"
---@field id string|number|nil
---@field method string|nil
---@field params table|nil
---@field msg table|nil       the decoded object
---@field error table|nil     for kind "error": {code=, message=} to send with `id`

local function reject(code, message, id)
  return { kind = "error", id = id, error = { code = code, message = message } }
end

--- Classifies one line (without its newline).
---@param line string
---@return clawlua.mcp.frame
function M.classify(line, max)
  local msg, err = json.decode(line, max and { max_size = max } or nil)
  if msg == nil then return reject(M.PARSE_ERROR, "parse error: " .. tostring(err)) end
  if type(msg) ~= "table" then
    return reject(M.INVALID_REQUEST, "invalid request: a message is a JSON object")
  end
  if json.is_array(msg) then
    -- JSON-RPC batches were removed from MCP in 2025-06-18; one error for the whole array.
    return reject(M.INVALID_REQUEST, "invalid request: batches are not supported (MCP 2025-06-18 and later)")
  end
  local id, has_id = msg.id, msg.id ~= nil
  local echo = has_id and valid_id(id) and id or nil
  if msg.jsonrpc ~= "2.0" then
    return reject(M.INVALID_REQUEST, "invalid request: field 'jsonrpc' must be \"2.0\"", echo)
  end
  if has_id and not valid_id(id) then
    if id == json.null then
      return reject(M.INVALID_REQUEST, "invalid request: field 'id' must not be null")
    end
    return reject(M.INVALID_REQUEST, "invalid request: field 'id' must be a string or a number")
  end
  if msg.method == nil then
    if has_id and (msg.result ~= nil or msg.error ~= nil) then
      return { kind = "response", id = id, msg = msg }
    end
    return reject(M.INVALID_REQUEST, "invalid request: field 'method' is missing", echo)
  end
  if type(msg.method) ~= "string" then
    return reject(M.INVALID_REQUEST, "invalid request: field 'method' must be a string", echo)
  end
  local params = msg.params
  if params ~= nil and (type(params) ~= "table" or json.is_array(params)) then
    if type(params) == "table" then
      return reject(M.INVALID_PARAMS, "invalid params: field 'params' must be an object", echo)
    end
    return reject(M.INVALID_REQUEST, "invalid request: field 'params' must be an object", echo)
  end
  return { kind = has_id and "request" or "notification", id = id, method = msg.method,
           params = params or {}, msg = msg }
end

--- The encoded line of a response.
function M.result_line(id, result)
  return json.encode { jsonrpc = "2.0", id = id, result = result }
end

function M.error_line(id, code, message, data)
  local e = { code = code, message = message, data = data }
  return json.encode { jsonrpc = "2.0", id = id == nil and json.null or id, error = e }
end

---@class clawlua.mcp.conn
---@field input table   stream
---@field output table  stream
local Conn = {}
Conn.__index = Conn

--- A connection over two streams.
---@param opts {input: table, output: table, max_message: integer|nil, max_queue: integer|nil}
---@return clawlua.mcp.conn
function M.conn(opts)
  assert(type(opts) == "table", "rpc.conn{input=, output=} expected")
  assert(opts.input and opts.output, "bad field 'input'/'output' (streams expected)")
  local max = opts.max_message or M.DEFAULT_MAX_MESSAGE
  if math.type(max) ~= "integer" or max < 64 or max > (1 << 31) then
    error("bad field 'max_message' (integer in [64, 2^31] expected)", 2)
  end
  local self = setmetatable({
    input = opts.input,
    output = opts.output,
    max_message = max,
    encode_opts = { max_size = max },
    queue = claw.channel(opts.max_queue or M.DEFAULT_MAX_QUEUE),
    queued = 0,          -- lines in the queue or in the writer's hands, not yet written
    writing = false,     -- a write is under way (it may be waiting for the pipe)
    write_free = claw.event(),
    sent = 0,
  }, Conn)
  self.writer = claw.spawn(function() self:write_loop() end)
  return self
end

-- One write at a time: a write that waits for a full pipe must not let another line in
-- between its bytes.
local function begin_write(self)
  while self.writing do
    self.write_free:clear()
    self.write_free:wait()
  end
  self.writing = true
end

local function end_write(self, ok, err)
  self.writing = false
  self.write_free:set()
  if not ok and not self.write_error then
    self.write_error = err
    self.queue:close()
  end
  return ok
end

function Conn:write_loop()
  local q, out = self.queue, self.output
  while true do
    local line = q:recv()
    if line == nil then break end
    -- Coalesce what is already queued into one write: fewer syscalls under load.
    local parts, n = { line, "\n" }, 2
    while n < 128 do
      local more = q:try_recv()
      if more == nil then break end
      parts[n + 1], parts[n + 2] = more, "\n"
      n = n + 2
    end
    begin_write(self)
    local ok, err = out:write(table.concat(parts))
    self.queued = self.queued - n // 2
    if not end_write(self, ok, err) then break end
    self.sent = self.sent + n // 2
  end
end

--- Sends one encoded message. From `conn.direct_task` (the server's reading task, which
--- answers the requests that never wait) the line is written at once when nothing is queued
--- or being written: no switch to the writer task, no second loop turn. Otherwise it is queued
--- in order for the writer task, waiting while the queue is full (back-pressure). Returns
--- false once the output failed or the connection is closed.
---@param line string
---@return boolean
function Conn:send_line(line)
  if #line > self.max_message then
    error(("rpc: outgoing message of %d bytes exceeds the %d byte cap"):format(#line, self.max_message))
  end
  if self.write_error or self.closed then return false end
  if self.queued == 0 and not self.writing and self.direct_task and claw.current() == self.direct_task then
    self.writing = true
    local done, ok, err = pcall(self.output.write, self.output, line .. "\n")
    if not done then
      -- Stopped in the middle of the line (the task was cancelled while the pipe was full):
      -- nothing may follow its torn bytes.
      end_write(self, false, "write interrupted: " .. tostring(ok))
      error(ok, 0)
    end
    if not end_write(self, ok, err) then return false end
    self.sent = self.sent + 1
    return true
  end
  self.queued = self.queued + 1
  local done, sent = pcall(self.queue.send, self.queue, line)
  if done and sent then return true end
  self.queued = self.queued - 1
  if not done then error(sent, 0) end -- cancelled while the queue was full
  return false
end

--- Sends a value as one message; a value too big for the cap becomes an error reply.
function Conn:send(obj)
  local line, err = json.encode(obj, self.encode_opts)
  if not line then
    if obj.id ~= nil and obj.result ~= nil then
      return self:send_line(M.error_line(obj.id, M.INTERNAL_ERROR, "cannot send the result: " .. err))
    end
    return false
  end
  return self:send_line(line)
end

function Conn:reply(id, result)
  return self:send { jsonrpc = "2.0", id = id, result = result }
end

function Conn:reply_error(id, code, message, data)
  return self:send { jsonrpc = "2.0", id = id == nil and json.null or id,
                     error = { code = code, message = message, data = data } }
end

function Conn:notify(method, params)
  return self:send { jsonrpc = "2.0", method = method, params = params }
end

--- Reads the next frame. Lines over the cap are skipped by the stream (never held whole) and
--- come back as an error frame. Returns nil at end of input.
---@return clawlua.mcp.frame|nil
function Conn:read()
  while true do
    local line, err = self.input:read_line(self.max_message)
    if line == nil then
      if err == nil then return nil end
      if tostring(err):find("longer than", 1, true) then
        return reject(M.INVALID_REQUEST,
          ("invalid request: message longer than %d bytes (skipped)"):format(self.max_message))
      end
      self.read_error = err
      return nil
    end
    if line:find("%S") then return M.classify(line) end
  end
end

--- Stops the writer after what is queued has been written (or `timeout` seconds passed).
function Conn:close(timeout)
  self.closed = true
  self.queue:close()
  if self.writer and not self.writer:done() then
    local ok = self.writer:join(timeout or 1)
    if not ok and not self.writer:done() then self.writer:cancel() end
  end
end

return M
