-- fuzz: seeds=mcp_schema dict=mcp_schema
-- fuzz_lua_mcp_schema: the JSON Schema validator (lua/clawlua/mcp/schema.lua) on a fuzzed
-- schema and a fuzzed instance: the input is `<schema JSON>\n<instance JSON>` (without the
-- newline, the schema validates itself). validate() must give a verdict — true, or false and
-- a list of "$<path>: <problem>" strings — or nil and "schema: <reason>" for a schema it cannot
-- use, never raise, and the same answer twice. Time and recursion are bounded by the
-- validator itself (libFuzzer's -timeout catches a hang).
local claw = ...
local schema = require "clawlua.mcp.schema"
local json = claw.json
-- A pattern's step budget a fiftieth of the default: a catastrophic pattern meets the same end
-- (schema_spec tests the default's), in well under libFuzzer's -timeout even with the line hook
-- and the sanitizers slowing every step (a million steps, six matches per input, took > 100 s).
schema.MAX_REGEX_STEPS = 20000

local function verdict(v, instance, ref)
  local ok, a, b = pcall(v.validate, v, instance, ref)
  if not ok then error("validate raised: " .. tostring(a), 0) end
  if a == true then
    assert(b == nil, "true with errors")
  elseif a == false then
    assert(type(b) == "table" and #b > 0, "false without errors")
    for _, e in ipairs(b) do
      -- "$<path>: <problem>"; a key in the path may hold ": " itself (it is JSON-quoted)
      assert(type(e) == "string" and e:match("^%$.-: ."), "error without a path: " .. tostring(e))
    end
  else
    assert(a == nil and type(b) == "string" and b:match("^schema: "),
      "neither a verdict nor nil + 'schema: ...': " .. tostring(a) .. ", " .. tostring(b))
  end
  return a, b
end

local function same(a1, b1, a2, b2)
  if a1 ~= a2 then return false end
  if type(b1) ~= "table" then return b1 == b2 end
  if #b1 ~= #b2 then return false end
  for i = 1, #b1 do if b1[i] ~= b2[i] then return false end end
  return true
end

return function(data)
  local nl = data:find("\n", 1, true)
  local stext, itext = data, data
  if nl then stext, itext = data:sub(1, nl - 1), data:sub(nl + 1) end
  local s = json.decode(stext)
  if type(s) ~= "table" and type(s) ~= "boolean" then return end
  local instance = json.decode(itext)
  if instance == nil then instance = json.null end
  local v = schema.new(s)
  local a1, b1 = verdict(v, instance)
  local a2, b2 = verdict(v, instance) -- the caches ($ref, regex) must not change the answer
  assert(same(a1, b1, a2, b2), "a second validation gives another answer")
  local a3, b3 = verdict(schema.new(s), instance, "#")
  assert(same(a1, b1, a3, b3), "ref '#' gives another answer than the root")
end
