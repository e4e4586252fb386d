-- JSON throughput on a few MB of realistic MCP-like messages: clawlua.json against Debian's
-- lua-cjson (the speed anchor) and lua-dkjson, measured in the same run.
--   build/bin/clawlua tests/bench/json.lua [megabytes=4]
local claw = require "clawlua"
local json = claw.json
local cjson = require "cjson"
local dkjson = require "dkjson"

local target_mb = tonumber(arg and arg[1]) or 4

-- Messages shaped like MCP traffic: tools/list results, tools/call requests and results.
local function tool(i)
  return {
    name = "tool_" .. i,
    description = "Runs a command inside the sandbox and returns its output. Variant " .. i,
    inputSchema = {
      type = "object",
      properties = {
        argv = { type = "array", items = { type = "string" } },
        timeout = { type = "number", minimum = 0, maximum = 3600 },
        env = { type = "object", additionalProperties = { type = "string" } },
      },
      required = { "argv" },
    },
    annotations = { readOnlyHint = false, openWorldHint = true },
  }
end

local function messages()
  local msgs, size = {}, 0
  local i = 0
  while size < target_mb * 1024 * 1024 do
    i = i + 1
    local m
    if i % 3 == 0 then
      local tools = {}
      for k = 1, 20 do tools[k] = tool(k) end
      m = { jsonrpc = "2.0", id = i, result = { tools = tools, nextCursor = "c" .. i } }
    elseif i % 3 == 1 then
      m = { jsonrpc = "2.0", id = i, method = "tools/call",
            params = { name = "exec", arguments = { argv = { "sh", "-c", "ls -la /tmp | head -n " .. i },
                                                    timeout = 12.5 } } }
    else
      m = { jsonrpc = "2.0", id = i, result = { content = { { type = "text",
            text = string.rep("line of output \u{2713} " .. i .. "\n", 40) } }, isError = false } }
    end
    local s = cjson.encode(m)
    msgs[#msgs + 1] = s
    size = size + #s
  end
  return msgs, size
end

local msgs, bytes = messages()
local values = {}
for k, s in ipairs(msgs) do values[k] = cjson.decode(s) end

local function bench(fn, input)
  -- best of 5 runs, each over every message
  local best = math.huge
  for _ = 1, 5 do
    collectgarbage("collect")
    local t0 = os.clock()
    for k = 1, #input do fn(input[k]) end
    local dt = os.clock() - t0
    if dt < best then best = dt end
  end
  return bytes / best / 1e6 -- MB/s
end

local dk_decode = function(s) return dkjson.decode(s) end
local dk_encode = function(v) return dkjson.encode(v) end

local results = {
  { "decode", "clawlua.json", bench(json.decode, msgs) },
  { "decode", "lua-cjson", bench(cjson.decode, msgs) },
  { "decode", "lua-dkjson", bench(dk_decode, msgs) },
  { "encode", "clawlua.json", bench(json.encode, values) },
  { "encode", "lua-cjson", bench(cjson.encode, values) },
  { "encode", "lua-dkjson", bench(dk_encode, values) },
}

print(("json: %d messages, %.2f MB of MCP-like JSON, best of 5 (CPU time)"):format(#msgs, bytes / 1e6))
local anchor = {}
for _, r in ipairs(results) do
  if r[2] == "lua-cjson" then anchor[r[1]] = r[3] end
end
for _, r in ipairs(results) do
  print(("  %-6s %-13s %8.1f MB/s   %.2fx lua-cjson"):format(r[1], r[2], r[3], r[3] / anchor[r[1]]))
end
