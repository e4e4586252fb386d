-- The neutral message format's helpers, shared by clawlua.llm and the two wire formats (which
-- clawlua.llm loads: they take these from here, not from it, so the folder has no circle).
local json = require "clawlua.json"

local M = {}

-- What an error body from the server may contribute to a message (they can be large pages).
local MAX_ERROR_TEXT = 300

--- Parses a tool call's arguments (a JSON text) into a table. An empty text is {}.
---@param raw string|nil
---@return table|nil, string|nil
function M.parse_arguments(raw)
  if raw == nil or raw == "" or raw:match("^%s*$") then return json.object {} end
  local v, err = json.decode(raw)
  if v == nil then return nil, "arguments are not valid JSON (" .. err .. ")" end
  if type(v) ~= "table" or json.is_array(v) then
    return nil, "arguments are not a JSON object"
  end
  return v
end

--- A tool_call block from what a provider sent; bad arguments are kept, with the reason.
function M.tool_call(id, name, raw)
  local args, err = M.parse_arguments(raw)
  if args then return { type = "tool_call", id = id, name = name, arguments = args } end
  return { type = "tool_call", id = id, name = name, raw_arguments = raw, arguments_error = err }
end

--- The blocks of a neutral message (a string content is one text block).
function M.blocks(msg)
  local c = msg.content
  if type(c) == "string" then return { { type = "text", text = c } } end
  if type(c) ~= "table" then return {} end
  return c
end

--- The text of a message's text blocks, joined.
function M.text(msg)
  local out = {}
  for _, b in ipairs(M.blocks(msg)) do
    if b.type == "text" then out[#out + 1] = b.text end
  end
  return table.concat(out)
end

--- The tool_call blocks of a message.
function M.tool_calls(msg)
  local out = {}
  for _, b in ipairs(M.blocks(msg)) do
    if b.type == "tool_call" then out[#out + 1] = b end
  end
  return out
end

--- A short description of an error body (the server's own message when it has one).
function M.error_text(body)
  if not body or body == "" then return "empty body" end
  local doc = json.decode(body)
  if type(doc) == "table" then
    local e = doc.error
    if type(e) == "table" and type(e.message) == "string" then
      return (e.type and (e.type .. ": ") or "") .. e.message:sub(1, MAX_ERROR_TEXT)
    elseif type(e) == "string" then
      return e:sub(1, MAX_ERROR_TEXT)
    end
  end
  return (body:sub(1, MAX_ERROR_TEXT):gsub("%s+", " "))
end

return M
