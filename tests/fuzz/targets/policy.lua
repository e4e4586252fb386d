-- fuzz: seeds=policy dict=policy
-- fuzz_lua_policy: the policy loader (lua/clawlua/policy.lua) on arbitrary Lua source text, run
-- under its instruction budget and memory cap. policy.load must return a validated policy
-- (describe() JSON-encodable) or nil and a message naming the file, never raise; the string
-- library must be the real one again afterwards; hooks it accepted run under the budget and
-- return a verdict.
local claw = ...
local policy = require "clawlua.policy"
local json = claw.json

local path = os.tmpname()
os.remove(path)
path = path .. ".lua"
local real_rep, real_gsub, real_pack = string.rep, string.gsub, string.pack

return function(data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  local ok, p, err = pcall(policy.load, path)
  os.remove(path)
  assert(string.rep == real_rep and string.gsub == real_gsub and string.pack == real_pack,
    "the string library was left swapped")
  if not ok then error("policy.load raised: " .. tostring(p), 0) end
  if p == nil then
    assert(type(err) == "string" and err:find(path, 1, true), "an error without the file: " .. tostring(err))
    return
  end
  assert(policy.is_policy(p), "load returned an unvalidated table")
  local d = policy.describe(p)
  assert(json.encode(d), "describe() is not JSON")
  for name in pairs(p.hooks) do
    local hok, allowed, reason = pcall(policy.call_hook, p, name, "sandbox_exec",
      { argv = { "ls" } }, "fuzz")
    if not hok then error("hook " .. name .. " raised through call_hook: " .. tostring(allowed), 0) end
    assert(type(allowed) == "boolean" and (allowed or type(reason) == "string"), "hook verdict malformed")
  end
end
