-- The OpenAI-compatible chat completions wire format (OpenAI, Ollama, vLLM, llama.cpp, ...):
-- neutral messages and tools to a request body, and responses (whole or streamed) back.
local json = require "clawlua.json"
local llm_util = require "clawlua.llm.message"

local M = {}

local STOP = { stop = "end", tool_calls = "tool_calls", function_call = "tool_calls", length = "max_tokens" }

local function text_of(blocks)
  local out = {}
  for _, b in ipairs(blocks) do
    if b.type == "text" then out[#out + 1] = b.text end
  end
  return table.concat(out)
end

local function encode_messages(req)
  local out = json.array {}
  if req.system then out[#out + 1] = { role = "system", content = req.system } end
  for _, m in ipairs(req.messages) do
    local blocks = llm_util.blocks(m)
    if m.role == "assistant" then
      local msg = { role = "assistant" }
      local text = text_of(blocks)
      msg.content = text ~= "" and text or json.null
      local calls = json.array {}
      for _, b in ipairs(blocks) do
        if b.type == "tool_call" then
          calls[#calls + 1] = { id = b.id, type = "function", ["function"] = {
            name = b.name, arguments = b.raw_arguments or json.encode(b.arguments or json.object {}) } }
        end
      end
      if #calls > 0 then msg.tool_calls = calls end
      out[#out + 1] = msg
    else
      local text = {}
      for _, b in ipairs(blocks) do
        if b.type == "tool_result" then
          out[#out + 1] = { role = "tool", tool_call_id = b.id, content = b.content or "" }
        elseif b.type == "text" then
          text[#text + 1] = b.text
        end
      end
      if #text > 0 then
        out[#out + 1] = { role = m.role == "tool" and "user" or m.role, content = table.concat(text) }
      end
    end
  end
  return out
end

--- The request: path, headers, body.
function M.encode(client, req, stream)
  local body = { model = client.model, messages = encode_messages(req) }
  if req.tools and #req.tools > 0 then
    local tools = json.array {}
    for _, t in ipairs(req.tools) do
      tools[#tools + 1] = { type = "function", ["function"] = {
        name = t.name, description = t.description or "",
        parameters = t.input_schema or t.inputSchema or { type = "object" } } }
    end
    body.tools = tools
  end
  if req.max_tokens then body.max_tokens = req.max_tokens end
  if req.temperature then body.temperature = req.temperature end
  if req.json then body.response_format = { type = "json_object" } end
  if stream then
    body.stream = true
    body.stream_options = { include_usage = true }
  end
  local headers = { ["Content-Type"] = "application/json" }
  local key = client.secret()
  if key and key ~= "" then headers["Authorization"] = "Bearer " .. key end
  return "/chat/completions", headers, assert(json.encode(body))
end

local function usage_of(u)
  u = type(u) == "table" and u or {}
  return { input_tokens = math.tointeger(u.prompt_tokens) or 0,
           output_tokens = math.tointeger(u.completion_tokens) or 0 }
end

--- A whole (non-streamed) response.
function M.decode(doc)
  if doc.error then return nil, "error: " .. llm_util.error_text(json.encode(doc)), false end
  local choice = type(doc.choices) == "table" and doc.choices[1]
  if type(choice) ~= "table" or type(choice.message) ~= "table" then
    return nil, "malformed response: no choices[1].message", false
  end
  local m = choice.message
  local content = json.array {}
  if type(m.content) == "string" and m.content ~= "" then
    content[#content + 1] = { type = "text", text = m.content }
  end
  if m.tool_calls ~= nil and type(m.tool_calls) ~= "table" then
    return nil, "malformed response: choices[1].message.tool_calls is not an array", false
  end
  for i, tc in ipairs(m.tool_calls or {}) do
    local fn = type(tc) == "table" and tc["function"]
    if type(fn) ~= "table" or type(fn.name) ~= "string" then
      return nil, ("malformed response: tool_calls[%d] has no function name"):format(i), false
    end
    local args = fn.arguments
    if type(args) == "table" then args = json.encode(args) end -- some servers send an object
    content[#content + 1] = llm_util.tool_call(tc.id or ("call_" .. i), fn.name, args)
  end
  local reason = choice.finish_reason
  local stop = STOP[reason] or (type(reason) == "string" and reason or "end")
  if stop == "end" and #llm_util.tool_calls { content = content } > 0 then stop = "tool_calls" end
  return { message = { role = "assistant", content = content }, stop_reason = stop,
           usage = usage_of(doc.usage), model = doc.model }
end

local Stream = {}
Stream.__index = Stream

--- State for a streamed response: :event(ev) per server-sent event, :finish() at the end.
function M.stream(on_delta)
  return setmetatable({ on_delta = on_delta, text = {}, calls = {}, events = 0,
                        usage = usage_of(nil) }, Stream)
end

function Stream:event(ev)
  self.events = self.events + 1
  local data = ev.data
  if data == "[DONE]" then
    self.done = true
    return true
  end
  local doc, err = json.decode(data)
  if type(doc) ~= "table" then
    return nil, "malformed stream event: " .. (err or "not a JSON object")
  end
  if doc.error then return nil, "stream error: " .. llm_util.error_text(data) end
  if doc.usage and doc.usage ~= json.null then self.usage = usage_of(doc.usage) end
  self.model = doc.model or self.model
  local choice = type(doc.choices) == "table" and doc.choices[1]
  if type(choice) ~= "table" then return true end
  local d = choice.delta
  if type(d) == "table" then
    if type(d.content) == "string" and d.content ~= "" then
      self.text[#self.text + 1] = d.content
      if self.on_delta then self.on_delta { type = "text", text = d.content } end
    end
    if type(d.tool_calls) == "table" then
      for _, tc in ipairs(d.tool_calls) do
        local idx = math.tointeger(tc.index) or #self.calls
        local slot = self.calls[idx + 1]
        if not slot then
          slot = { args = {} }
          self.calls[idx + 1] = slot
        end
        if tc.id then slot.id = tc.id end
        local fn = tc["function"]
        if type(fn) == "table" then
          if type(fn.name) == "string" then slot.name = (slot.name or "") .. fn.name end
          if type(fn.arguments) == "string" then slot.args[#slot.args + 1] = fn.arguments end
        end
        if self.on_delta then
          self.on_delta { type = "tool_call", index = idx, id = tc.id,
                          name = type(fn) == "table" and fn.name or nil,
                          arguments_delta = type(fn) == "table" and fn.arguments or nil }
        end
      end
    end
  end
  if choice.finish_reason and choice.finish_reason ~= json.null then
    self.finish_reason = choice.finish_reason
  end
  return true
end

function Stream:finish()
  if not self.done and not self.finish_reason then
    return nil, "stream ended before the answer was complete (no finish_reason, no [DONE])", false
  end
  local content = json.array {}
  local text = table.concat(self.text)
  if text ~= "" then content[#content + 1] = { type = "text", text = text } end
  for i = 1, #self.calls do
    local slot = self.calls[i]
    if not slot or not slot.name then
      return nil, ("malformed stream: tool call %d has no function name"):format(i - 1), false
    end
    content[#content + 1] = llm_util.tool_call(slot.id or ("call_" .. i), slot.name, table.concat(slot.args))
  end
  local stop = STOP[self.finish_reason] or self.finish_reason or "end"
  if stop == "end" and #self.calls > 0 then stop = "tool_calls" end
  return { message = { role = "assistant", content = content }, stop_reason = stop,
           usage = self.usage, model = self.model }
end

return M
