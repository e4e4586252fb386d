-- The Anthropic Messages API wire format: neutral messages and tools to a request body
-- (tool_use / tool_result blocks), and responses (whole or streamed events) back.
local json = require "clawlua.json"
local llm_util = require "clawlua.llm.message"

local M = {}

M.VERSION = "2023-06-01"
local DEFAULT_MAX_TOKENS = 4096
local STOP = { end_turn = "end", stop_sequence = "end", tool_use = "tool_calls", max_tokens = "max_tokens" }
local JSON_INSTRUCTION = "Answer with one JSON object and nothing else."

local function encode_blocks(m)
  local out = json.array {}
  for _, b in ipairs(llm_util.blocks(m)) do
    if b.type == "text" then
      if b.text ~= "" then out[#out + 1] = { type = "text", text = b.text } end
    elseif b.type == "tool_call" then
      out[#out + 1] = { type = "tool_use", id = b.id, name = b.name, input = b.arguments or json.object {} }
    elseif b.type == "tool_result" then
      out[#out + 1] = { type = "tool_result", tool_use_id = b.id, content = b.content or "",
                        is_error = b.is_error and true or nil }
    end
  end
  return out
end

--- The request: path, headers, body.
function M.encode(client, req, stream)
  local system = { req.system }
  local messages = json.array {}
  for _, m in ipairs(req.messages) do
    if m.role == "system" then
      system[#system + 1] = llm_util.text(m)
    else
      local role = m.role == "assistant" and "assistant" or "user"
      local blocks = encode_blocks(m)
      local last = messages[#messages]
      if last and last.role == role then -- the API wants turns to alternate: merge
        for _, b in ipairs(blocks) do last.content[#last.content + 1] = b end
      elseif #blocks > 0 then
        messages[#messages + 1] = { role = role, content = blocks }
      end
    end
  end
  if req.json then system[#system + 1] = JSON_INSTRUCTION end
  local body = { model = client.model, messages = messages, max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS }
  if #system > 0 then body.system = table.concat(system, "\n\n") end
  if req.temperature then body.temperature = req.temperature end
  if req.tools and #req.tools > 0 then
    local tools = json.array {}
    for _, t in ipairs(req.tools) do
      tools[#tools + 1] = { name = t.name, description = t.description or "",
                            input_schema = t.input_schema or t.inputSchema or { type = "object" } }
    end
    body.tools = tools
  end
  if stream then body.stream = true end
  local headers = { ["Content-Type"] = "application/json", ["anthropic-version"] = M.VERSION }
  local key = client.secret()
  if key and key ~= "" then headers["x-api-key"] = key end
  return "/messages", headers, assert(json.encode(body))
end

local function usage_of(u)
  u = type(u) == "table" and u or {}
  return { input_tokens = math.tointeger(u.input_tokens) or 0, output_tokens = math.tointeger(u.output_tokens) or 0 }
end

local function stop_of(reason, content)
  local stop = STOP[reason] or (type(reason) == "string" and reason or "end")
  if stop == "end" and #llm_util.tool_calls { content = content } > 0 then stop = "tool_calls" end
  return stop
end

--- A whole (non-streamed) response.
function M.decode(doc)
  if doc.type == "error" or doc.error then
    return nil, "error: " .. llm_util.error_text(json.encode(doc)), false
  end
  if type(doc.content) ~= "table" then return nil, "malformed response: no content array", false end
  local content = json.array {}
  for i, b in ipairs(doc.content) do
    if type(b) ~= "table" then return nil, ("malformed response: content[%d] is not an object"):format(i), false end
    if b.type == "text" then
      content[#content + 1] = { type = "text", text = tostring(b.text or "") }
    elseif b.type == "tool_use" then
      if type(b.name) ~= "string" or type(b.id) ~= "string" then
        return nil, ("malformed response: content[%d] tool_use without id or name"):format(i), false
      end
      if type(b.input) == "table" and not json.is_array(b.input) then
        content[#content + 1] = { type = "tool_call", id = b.id, name = b.name, arguments = b.input }
      else
        content[#content + 1] = { type = "tool_call", id = b.id, name = b.name,
                                  raw_arguments = json.encode(b.input), arguments_error = "input is not a JSON object" }
      end
    end -- thinking and other block kinds carry nothing the loop acts on
  end
  return { message = { role = "assistant", content = content }, stop_reason = stop_of(doc.stop_reason, content),
           usage = usage_of(doc.usage), model = doc.model }
end

local Stream = {}
Stream.__index = Stream

--- State for a streamed response: :event(ev) per server-sent event, :finish() at the end.
function M.stream(on_delta)
  return setmetatable({ on_delta = on_delta, blocks = {}, events = 0, ignored = 0,
                        usage = usage_of(nil) }, Stream)
end

function Stream:event(ev)
  self.events = self.events + 1
  local doc, err = json.decode(ev.data)
  if type(doc) ~= "table" then
    return nil, ("malformed stream event '%s': %s"):format(ev.event, err or "not a JSON object")
  end
  local t = doc.type or ev.event
  if t == "content_block_delta" then -- most events: first
    local idx = math.tointeger(doc.index)
    local slot = idx and self.blocks[idx + 1]
    local d = doc.delta
    if not slot or type(d) ~= "table" then
      return nil, "malformed stream event: content_block_delta for a block that was not started"
    end
    if d.type == "text_delta" and type(d.text) == "string" then
      slot.parts[#slot.parts + 1] = d.text
      if self.on_delta then self.on_delta { type = "text", text = d.text } end
    elseif d.type == "input_json_delta" and type(d.partial_json) == "string" then
      slot.parts[#slot.parts + 1] = d.partial_json
      if self.on_delta then self.on_delta { type = "tool_call", index = idx, arguments_delta = d.partial_json } end
    end -- thinking_delta, signature_delta: not part of the answer
  elseif t == "message_start" then
    local m = type(doc.message) == "table" and doc.message or {}
    self.usage = usage_of(m.usage)
    self.model = m.model
  elseif t == "content_block_start" then
    local idx = math.tointeger(doc.index)
    local cb = doc.content_block
    if not idx or type(cb) ~= "table" then return nil, "malformed stream event: content_block_start" end
    local slot = { type = cb.type, id = cb.id, name = cb.name, parts = {} }
    if cb.type == "text" and type(cb.text) == "string" and cb.text ~= "" then slot.parts[1] = cb.text end
    if cb.type == "tool_use" and type(cb.input) == "table" and next(cb.input) then
      slot.parts[1] = json.encode(cb.input)
    end
    self.blocks[idx + 1] = slot
    if cb.type == "tool_use" and self.on_delta then
      self.on_delta { type = "tool_call", index = idx, id = cb.id, name = cb.name }
    end
  elseif t == "content_block_stop" then
    local idx = math.tointeger(doc.index)
    if idx and self.blocks[idx + 1] then self.blocks[idx + 1].stopped = true end
  elseif t == "message_delta" then
    if type(doc.delta) == "table" and type(doc.delta.stop_reason) == "string" then
      self.stop_reason = doc.delta.stop_reason
    end
    if type(doc.usage) == "table" then
      local u = doc.usage
      if math.tointeger(u.output_tokens) then self.usage.output_tokens = math.tointeger(u.output_tokens) end
      if math.tointeger(u.input_tokens) then self.usage.input_tokens = math.tointeger(u.input_tokens) end
    end
  elseif t == "message_stop" then
    self.stopped = true
  elseif t == "error" then
    return nil, "stream error: " .. llm_util.error_text(ev.data)
  elseif t ~= "ping" then
    -- The API may add event types; they are skipped (and counted), as its versioning asks.
    self.ignored = self.ignored + 1
  end
  return true
end

function Stream:finish()
  if not self.stopped then
    return nil, "stream ended before the answer was complete (no message_stop)", false
  end
  local content = json.array {}
  for i = 1, #self.blocks do
    local b = self.blocks[i]
    if b and b.type == "text" then
      content[#content + 1] = { type = "text", text = table.concat(b.parts) }
    elseif b and b.type == "tool_use" then
      content[#content + 1] = llm_util.tool_call(b.id, b.name, table.concat(b.parts))
    end
  end
  return { message = { role = "assistant", content = content }, stop_reason = stop_of(self.stop_reason, content),
           usage = self.usage, model = self.model, ignored_events = self.ignored }
end

return M
