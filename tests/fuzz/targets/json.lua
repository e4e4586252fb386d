-- fuzz: seeds=json dict=json
-- fuzz_lua_json: clawlua.json through Lua, the way Lua callers use it: decode must return a
-- value or nil + "json: ..."; a decoded value re-encodes (unsorted, the default) to text that
-- decodes to an equal value, and compact and pretty encodings decode to equal values.
local claw = ...
local json = claw.json

local function equal(a, b, depth)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" or depth > 200 then
    -- NaN never decodes; floats and integers compare by value, which is enough here
    return false
  end
  if math.type(a) ~= math.type(b) then return false end
  for k, v in pairs(a) do
    if not equal(v, b[k], depth + 1) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

local function same_kind(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) == "number" then return math.type(a) == math.type(b) end
  return true
end

return function(data)
  local v, err = json.decode(data)
  if v == nil then
    assert(type(err) == "string" and err:match("^json: .* at byte %d+$"), err)
    return
  end
  local text, eerr = json.encode(v)
  if text == nil then error("a decoded value does not encode: " .. eerr) end
  local v2, derr = json.decode(text)
  assert(v2 ~= nil, derr)
  assert(same_kind(v, v2), "the type changed in a round trip")
  assert(equal(v, v2, 0), "decode(encode(v)) differs from v: " .. text)
  local pretty = assert(json.encode(v, { pretty = true }))
  local v3, perr = json.decode(pretty)
  assert(v3 ~= nil, perr)
  assert(equal(v, v3, 0), "the pretty round trip differs: " .. pretty)
end
