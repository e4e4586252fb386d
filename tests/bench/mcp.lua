-- MCP stdio servers side by side, measured in the same run with raw newline-delimited
-- JSON-RPC: `clawlua mcp --bench-echo` against the official TypeScript SDK server
-- (tests/bench/mcp_ts_server.mjs, McpServer with an echo tool) and the plain python3 floor
-- (tests/bench/mcp_py_server.py: no SDK, no validation). Each server's `echo` tool is called.
--   build/bin/clawlua tests/bench/mcp.lua [calls=3000] [starts=15]
-- Startup: spawn -> initialize response (median). Throughput: sequential tools/call, one in
-- flight, after a warm-up; per-call round trip p50/p99. Peak RSS: VmHWM of the server process
-- just before its stdin is closed. Exit: stdin closed -> process gone.
local claw = require "clawlua"

local json = claw.json

local CALLS = tonumber(arg and arg[1]) or 3000
local STARTS = tonumber(arg and arg[2]) or 15
local src = os.getenv("CLAWLUA_SRC") or "."
local bin = os.getenv("CLAWLUA_BIN") or "build/bin/clawlua"
local npm_dir = (bin:match("^(.*)/bin/[^/]*$") or "build") .. "/npm/mcp"

local function median(xs)
  local t = {}
  for i, x in ipairs(xs) do t[i] = x end
  table.sort(t)
  return t[(#t + 1) // 2]
end

local function pct(sorted, q) return sorted[math.max(1, math.ceil(#sorted * q))] end

local function vmhwm_kb(pid)
  local f = io.open("/proc/" .. pid .. "/status", "r")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmHWM:%s*(%d+)")) or 0
end

local INIT = json.encode { jsonrpc = "2.0", id = 0, method = "initialize",
  params = { protocolVersion = "2025-11-25", capabilities = json.object {},
             clientInfo = { name = "bench", version = "1" } } } .. "\n"
local INITIALIZED = '{"jsonrpc":"2.0","method":"notifications/initialized"}\n'

local Session = {}
Session.__index = Session

local function open(cmd)
  local t0 = claw.now()
  local spec = { stdin = "pipe", stdout = "pipe", stderr = "null" }
  for i, a in ipairs(cmd) do spec[i] = a end
  local p = assert(claw.proc.spawn(spec))
  p.stdout:set_timeout(60)
  local s = setmetatable({ p = p, t0 = t0 }, Session)
  assert(p.stdin:write(INIT))
  local line = assert(p.stdout:read_line(1 << 24))
  s.startup = claw.now() - t0
  local m = assert(json.decode(line))
  assert(m.result and m.result.protocolVersion, "initialize failed: " .. line)
  assert(p.stdin:write(INITIALIZED))
  return s
end

function Session:call(id, text)
  local p = self.p
  assert(p.stdin:write('{"jsonrpc":"2.0","id":' .. id ..
    ',"method":"tools/call","params":{"name":"echo","arguments":{"text":"' .. text .. '"}}}\n'))
  while true do
    local line = assert(p.stdout:read_line(1 << 24))
    local m = assert(json.decode(line))
    if m.id == id then
      assert(m.result and m.result.structuredContent.text == text, "echo failed: " .. line)
      return
    end
  end
end

function Session:close()
  local rss = vmhwm_kb(self.p:pid())
  local t = claw.now()
  self.p.stdin:close()
  local st = self.p:wait(10)
  local exit_s = claw.now() - t
  if not st then self.p:kill("KILL") self.p:wait(5) end
  self.p:close()
  return rss, exit_s
end

local function measure(name, cmd)
  local starts = {}
  for i = 1, STARTS do
    local s = open(cmd)
    starts[i] = s.startup
    s:close()
  end
  local s = open(cmd)
  for i = 1, 200 do s:call(i, "warm") end
  local rtts = {}
  local t0 = claw.now()
  for i = 1, CALLS do
    local c0 = claw.now()
    s:call(1000 + i, "hello")
    rtts[i] = claw.now() - c0
  end
  local total = claw.now() - t0
  local rss, exit_s = s:close()
  table.sort(rtts)
  return { name = name, startup_ms = median(starts) * 1000, calls_s = CALLS / total,
           p50_ms = pct(rtts, 0.5) * 1000, p99_ms = pct(rtts, 0.99) * 1000, rss_mib = rss / 1024,
           exit_ms = exit_s * 1000 }
end

claw.run(function()
  local rows = {}
  rows[#rows + 1] = measure("clawlua mcp", { bin, "mcp", "--bench-echo", "--log-level", "off" })
  local inst = claw.proc.run { "sh", src .. "/tests/integration/mcp/npm_install.sh", npm_dir, timeout = 600 }
  local ts
  if inst.code == 0 then
    ts = measure("TS SDK (node)", { "node", npm_dir .. "/mcp_ts_server.mjs" })
    rows[#rows + 1] = ts
  else
    print("TS SDK peer unavailable: " .. inst.stderr)
  end
  local py = measure("python3 floor", { "python3", src .. "/tests/bench/mcp_py_server.py" })
  rows[#rows + 1] = py

  print(("MCP stdio servers, %d sequential echo calls, %d starts (medians)"):format(CALLS, STARTS))
  print(("%-16s %11s %10s %9s %9s %10s %9s"):format("server", "startup ms", "calls/s", "p50 ms", "p99 ms",
    "peak RSS", "exit ms"))
  for _, r in ipairs(rows) do
    print(("%-16s %11.1f %10.0f %9.3f %9.3f %7.1f MiB %9.1f"):format(r.name, r.startup_ms, r.calls_s,
      r.p50_ms, r.p99_ms, r.rss_mib, r.exit_ms))
  end
  local c = rows[1]
  if ts then
    print(("vs TS SDK: startup 1/%.0f, calls/s x%.1f, peak RSS 1/%.1f (targets: 1/100, x10, 1/15)"):format(
      ts.startup_ms / c.startup_ms, c.calls_s / ts.calls_s, ts.rss_mib / c.rss_mib))
  end
  print(("vs python3 floor: startup 1/%.1f, calls/s x%.2f (target x2.5), peak RSS 1/%.1f"):format(
    py.startup_ms / c.startup_ms, c.calls_s / py.calls_s, py.rss_mib / c.rss_mib))
end)
