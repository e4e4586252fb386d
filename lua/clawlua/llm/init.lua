-- clawlua.llm: one client for chat models behind two wire formats (OpenAI-compatible chat
-- completions, the Anthropic Messages API), with one neutral message and tool format between
-- them, so that a workflow does not care which provider it talks to.
--
-- Neutral message: {role = "system"|"user"|"assistant"|"tool", content = string | {block...}}
-- with blocks {type="text", text=}, {type="tool_call", id=, name=, arguments=<table>} (and,
-- when the model sent arguments that are not a JSON object, arguments=nil, raw_arguments=,
-- arguments_error=), {type="tool_result", id=, content=<string>, is_error=bool}.
-- Tool definition: {name=, description=, input_schema=<JSON Schema>} (inputSchema is accepted,
-- so an MCP tool list can be passed as it is).
local claw = require "clawlua"
local json = require "clawlua.json"
local sse = require "clawlua.llm.sse"
local message = require "clawlua.llm.message"

local M = {}

M.PROVIDERS = { openai = "clawlua.llm.openai", anthropic = "clawlua.llm.anthropic" }
local DEFAULT_URL = { openai = "https://api.openai.com/v1", anthropic = "https://api.anthropic.com/v1" }
local KEY_ENV = { openai = "OPENAI_API_KEY", anthropic = "ANTHROPIC_API_KEY" }

-- A non-streamed answer or an error body read while streaming is kept up to this many bytes.
local MAX_RAW = 1 << 20

---@class clawlua.llm.usage
---@field input_tokens integer
---@field output_tokens integer

---@class clawlua.llm.result
---@field message table neutral assistant message
---@field stop_reason string "end" | "tool_calls" | "max_tokens" | the provider's own reason
---@field usage clawlua.llm.usage

---@class clawlua.llm.client
---@field provider string
---@field model string
---@field base_url string
local Client = {}
Client.__index = Client

local function field_error(name, want, v, level)
  error(("bad field '%s' (%s expected, got %s)"):format(name, want, type(v)), level or 3)
end

local function opt(t, name, want, default)
  local v = t[name]
  if v == nil then return default end
  if type(v) ~= want then field_error(name, want, v, 4) end
  return v
end

-- The message helpers, also part of this module's API (llm.text(msg), llm.tool_calls(msg)...).
for k, f in pairs(message) do M[k] = f end

--- Creates a client.
---@class clawlua.llm.options
---@field provider string "openai" | "anthropic"
---@field model string
---@field base_url string|nil
---@field api_key string|nil defaults to $OPENAI_API_KEY / $ANTHROPIC_API_KEY
---@field timeout number|nil total seconds per request (600)
---@field connect_timeout number|nil (30)
---@field max_retries integer|nil (4)
---@field retry_base number|nil first backoff in seconds (0.5)
---@field max_retry_wait number|nil longest wait between attempts (60)
---@field headers table|nil extra request headers

---@param opts clawlua.llm.options
---@return clawlua.llm.client
function M.new(opts)
  if type(opts) ~= "table" then error("llm.new{provider=, model=, ...} expected", 2) end
  local provider = opts.provider
  if type(provider) ~= "string" then field_error("provider", "string", provider) end
  if not M.PROVIDERS[provider] then
    error(("bad field 'provider' (\"openai\" or \"anthropic\" expected, got %q)"):format(provider), 2)
  end
  if type(opts.model) ~= "string" then field_error("model", "string", opts.model) end
  local key = opts.api_key
  if key ~= nil and type(key) ~= "string" then field_error("api_key", "string", key) end
  if key == nil then key = os.getenv(KEY_ENV[provider]) end
  local self = setmetatable({
    provider = provider,
    model = opts.model,
    base_url = (opt(opts, "base_url", "string", DEFAULT_URL[provider]):gsub("/+$", "")),
    timeout = opt(opts, "timeout", "number", 600),
    connect_timeout = opt(opts, "connect_timeout", "number", 30),
    max_retries = opt(opts, "max_retries", "number", 4),
    retry_base = opt(opts, "retry_base", "number", 0.5),
    max_retry_wait = opt(opts, "max_retry_wait", "number", 60),
    extra_headers = opt(opts, "headers", "table", {}),
    wire = require(M.PROVIDERS[provider]),
    requests = 0,
    usage = { input_tokens = 0, output_tokens = 0 },
  }, Client)
  -- The key lives in a closure, not in a field: printing or encoding the client cannot show it.
  self.secret = function() return key end
  return self
end

function Client:__tostring()
  return ("llm.client(%s, %s, %s)"):format(self.provider, self.model, self.base_url)
end

--- Removes the key from a text (error messages may quote requests or headers).
function Client:redact(s)
  local key = self.secret()
  if type(s) ~= "string" or not key or #key < 4 then return s end
  local out = s:gsub(key:gsub("%p", "%%%0"), "[redacted]")
  return out
end

local function header(headers, name)
  if not headers then return nil end
  return headers[name] or headers[name:lower()]
end

local RETRY_STATUS = { [408] = true, [409] = true, [429] = true, [500] = true, [502] = true,
                       [503] = true, [504] = true, [529] = true }

--- Seconds to wait before attempt n+1 (n from 1): Retry-After when the server sent one (delta
--- seconds or an HTTP date), else exponential backoff with full jitter in its upper half.
function Client:backoff(n, headers)
  local ra = header(headers, "retry-after")
  if ra then
    local secs = tonumber(ra)
    if not secs then
      local ms = header(headers, "retry-after-ms")
      secs = ms and tonumber(ms) and tonumber(ms) / 1000
    end
    if secs and secs >= 0 then return math.min(secs, self.max_retry_wait) end
  end
  local base = math.min(self.retry_base * 2 ^ (n - 1), self.max_retry_wait)
  return base / 2 + math.random() * base / 2
end

local function is_overloaded(body)
  return body and (body:find('"overloaded_error"', 1, true) or body:find('"rate_limit_error"', 1, true))
end

--- One HTTP exchange, streamed or not. Returns the result, or nil, msg, retryable, headers.
function Client:exchange(req, stream)
  local path, headers, body = self.wire.encode(self, req, stream)
  for k, v in pairs(self.extra_headers) do headers[k] = v end
  local st, raw, rawn, perr
  if stream then
    st = self.wire.stream(req.on_delta)
    raw, rawn = {}, 0
    local parser = sse.new {
      max_line = req.max_event or (16 << 20),
      max_event = req.max_event or (16 << 20),
      on_event = function(ev)
        local ok, e = st:event(ev)
        if not ok then perr = e return false end
        return true
      end,
    }
    st.parser = parser
    local on_chunk = function(chunk)
      if st.events == 0 and rawn < MAX_RAW then -- keep the start, for an error body
        raw[#raw + 1] = chunk
        rawn = rawn + #chunk
      end
      local ok, e = parser:feed(chunk)
      if not ok then
        perr = perr or e
        return false
      end
      return true
    end
    local r, err, code = claw.http.request {
      url = self.base_url .. path, method = "POST", headers = headers, body = body,
      timeout = self.timeout, connect_timeout = self.connect_timeout, on_chunk = on_chunk,
    }
    if not r then
      if perr then return nil, perr, false end
      -- A transfer that failed before the model said anything can be tried again (not a timeout).
      if code == "ETIMEDOUT" then return nil, ("no complete answer within %g s"):format(self.timeout), false end
      return nil, err, st.events == 0
    end
    if r.status ~= 200 then
      local text = table.concat(raw)
      local retry = RETRY_STATUS[r.status] or is_overloaded(text)
      return nil, ("HTTP %d: %s"):format(r.status, M.error_text(text)), retry, r.headers
    end
    local ok, e = parser:finish()
    if not ok then return nil, e .. " (the answer was cut off)", false end
    return st:finish()
  end
  local r, err, code = claw.http.request {
    url = self.base_url .. path, method = "POST", headers = headers, body = body,
    timeout = self.timeout, connect_timeout = self.connect_timeout, max_body = MAX_RAW * 16,
  }
  if not r then
    if code == "ETIMEDOUT" then return nil, ("no answer within %g s"):format(self.timeout), false end
    return nil, err, true
  end
  if r.status ~= 200 then
    local retry = RETRY_STATUS[r.status] or is_overloaded(r.body)
    return nil, ("HTTP %d: %s"):format(r.status, M.error_text(r.body)), retry, r.headers
  end
  local doc, jerr = json.decode(r.body)
  if doc == nil then return nil, "malformed response: " .. jerr, false end
  if type(doc) ~= "table" then return nil, "malformed response: not a JSON object", false end
  return self.wire.decode(doc)
end

--- Sends a conversation and returns the model's answer.
---@class clawlua.llm.request
---@field messages table[] neutral messages
---@field tools table[]|nil {name, description, input_schema}
---@field system string|nil
---@field stream boolean|nil
---@field on_delta fun(d: table)|nil {type="text", text=} | {type="tool_call", index=, id=, name=, arguments_delta=}
---@field on_retry fun(attempt: integer, wait: number, err: string)|nil
---@field max_tokens integer|nil
---@field json boolean|nil
---@field temperature number|nil

---@param req clawlua.llm.request
---@return clawlua.llm.result|nil, string|nil
function Client:chat(req)
  if type(req) ~= "table" then error("client:chat{messages=, ...} expected", 2) end
  if type(req.messages) ~= "table" then field_error("messages", "table", req.messages) end
  for i, m in ipairs(req.messages) do
    if type(m) ~= "table" or type(m.role) ~= "string" then
      error(("bad field 'messages[%d]' (message with a role expected)"):format(i), 2)
    end
  end
  if req.tools ~= nil and type(req.tools) ~= "table" then field_error("tools", "table", req.tools) end
  for i, t in ipairs(req.tools or {}) do
    if type(t) ~= "table" or type(t.name) ~= "string" then
      error(("bad field 'tools[%d].name' (string expected, got %s)"):format(i, type(t) == "table"
        and type(t.name) or type(t)), 2)
    end
  end
  if req.on_delta ~= nil and type(req.on_delta) ~= "function" then
    field_error("on_delta", "function", req.on_delta)
  end
  local attempt = 0
  while true do
    attempt = attempt + 1
    self.requests = self.requests + 1
    local res, err, retry, headers = self:exchange(req, req.stream and true or false)
    if res then
      self.usage.input_tokens = self.usage.input_tokens + (res.usage.input_tokens or 0)
      self.usage.output_tokens = self.usage.output_tokens + (res.usage.output_tokens or 0)
      res.attempts = attempt
      return res
    end
    err = ("llm %s: %s"):format(self.provider, self:redact(err))
    if not retry or attempt > self.max_retries then
      if retry then err = err .. (" (after %d attempts)"):format(attempt) end
      return nil, err
    end
    local wait = self:backoff(attempt, headers)
    if req.on_retry then req.on_retry(attempt, wait, err) end
    claw.sleep(wait)
  end
end

return M
