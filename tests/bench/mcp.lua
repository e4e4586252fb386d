-- MCP stdio servers side by side, all measured by one client, the team's bench_stdio.py
-- (tests/bench/bench_stdio.py: python3 stdlib, raw newline-delimited JSON-RPC), in the same
-- run: `clawlua mcp --bench-echo`, the official TypeScript SDK reference server
-- (tests/bench/mcp_ts_server.mjs, McpServer with an echo tool) and the plain python3 floor
-- (tests/bench/mcp_py_server.py: no SDK, no validation). Each server's `echo` tool is called.
-- A fourth row, the ceiling (tests/bench/mcp_ceiling.c: canned answers, no parsing), shows what
-- the client itself allows: no server answers this client faster.
--   build/bin/clawlua tests/bench/mcp.lua [runs=3] [starts=25] [sessions=3] [calls=2000]
-- A run measures the three servers one after the other (startup: spawn -> initialize answered,
-- median of `starts`; sequential tools/call, median of `sessions`; peak RSS: VmHWM); the
-- ratios are taken within a run, and their spread over the runs is printed last.
-- CLAWLUA_BENCH_CPU=N runs client and server on CPU N (taskset): one core, no cross-core wake-up.
-- On an idle virtual machine a sequential round trip across two cores waits for the sleeping
-- vCPU to wake (here ~0.1 ms, more than any server's work), so unpinned calls/s measure the
-- hypervisor; pinned, they measure the CPU each side spends. The ceiling's time per call is the
-- client's own; what a server adds beyond it is printed as "server us/call".
local claw = require "clawlua"

local json = claw.json

local RUNS = tonumber(arg and arg[1]) or 3
local STARTS = tonumber(arg and arg[2]) or 25
local SESSIONS = tonumber(arg and arg[3]) or 3
local CALLS = tonumber(arg and arg[4]) or 2000
local src = os.getenv("CLAWLUA_SRC") or "."
local bin = os.getenv("CLAWLUA_BIN") or "build/bin/clawlua"
local npm_dir = (bin:match("^(.*)/bin/[^/]*$") or "build") .. "/npm/mcp"

local function median(xs)
  local t = {}
  for i, x in ipairs(xs) do t[i] = x end
  table.sort(t)
  local n = #t
  if n % 2 == 1 then return t[(n + 1) // 2] end
  return (t[n // 2] + t[n // 2 + 1]) / 2
end

local function field(rows, k)
  local t = {}
  for i, r in ipairs(rows) do t[i] = r[k] end
  return t
end

--- One bench_stdio.py run against `cmd`; returns the medians, or nil and the reason.
local function measure(name, cmd)
  local out = os.tmpname()
  local argv = { "python3", src .. "/tests/bench/bench_stdio.py", "--starts", tostring(STARTS),
                 "--sessions", tostring(SESSIONS), "--calls", tostring(CALLS), "--json", out, "--" }
  local cpu = os.getenv("CLAWLUA_BENCH_CPU")
  if cpu and cpu ~= "" then
    for i, a in ipairs { "taskset", "-c", cpu } do table.insert(argv, i, a) end
  end
  for _, a in ipairs(cmd) do argv[#argv + 1] = a end
  argv.timeout = 900
  local r = claw.proc.run(argv)
  local f = io.open(out, "r")
  local raw = f and f:read("a")
  if f then f:close() end
  os.remove(out)
  if r.code ~= 0 or not raw then
    return nil, ("%s: bench_stdio.py exited %s: %s"):format(name, tostring(r.code), r.stderr)
  end
  local d = assert(json.decode(raw))
  local s = d.sessions
  local exits = true
  for _, x in ipairs(s) do exits = exits and x.exit.exited end
  return { name = name, startup_ms = median(field(d.startup, "ms")),
           calls_s = median(field(s, "calls_per_s")), p50_ms = median(field(s, "lat_p50_ms")),
           p99_ms = median(field(s, "lat_p99_ms")), rss_mib = median(field(s, "main_vmhwm_kb")) / 1024,
           exits = exits }
end

local function spread(xs)
  local lo, hi = math.huge, -math.huge
  for _, x in ipairs(xs) do lo, hi = math.min(lo, x), math.max(hi, x) end
  return ("%.2f (%.2f .. %.2f)"):format(median(xs), lo, hi)
end

claw.run(function()
  local inst = claw.proc.run { "sh", src .. "/tests/integration/mcp/npm_install.sh", npm_dir, timeout = 600 }
  if inst.code ~= 0 then print("TS SDK peer unavailable: " .. inst.stderr) end
  local servers = { { "clawlua mcp", { bin, "mcp", "--bench-echo", "--log-level", "off" } } }
  if inst.code == 0 then
    servers[#servers + 1] = { "TS SDK (node)", { "node", npm_dir .. "/mcp_ts_server.mjs" } }
  end
  servers[#servers + 1] = { "python3 floor", { "python3", src .. "/tests/bench/mcp_py_server.py" } }
  servers[#servers + 1] = { "C ceiling", { (bin:gsub("clawlua$", "clawlua-mcp-ceiling")) } }
  local ratios = { ts_start = {}, ts_calls = {}, ts_rss = {}, py_start = {}, py_calls = {}, py_p50 = {},
                   top_calls = {}, top_p50 = {}, py_server = {}, ts_server = {} }
  print(("MCP stdio servers, client tests/bench/bench_stdio.py: %d runs; each run %d starts and "
    .. "%d sessions of %d sequential echo calls per server (medians)"):format(RUNS, STARTS, SESSIONS, CALLS))
  for run = 1, RUNS do
    local rows = {}
    for i, s in ipairs(servers) do
      rows[i] = assert(measure(s[1], s[2]))
    end
    print(("\nrun %d\n%-16s %11s %10s %9s %9s %10s %5s"):format(run, "server", "startup ms", "calls/s",
      "p50 ms", "p99 ms", "peak RSS", "exit"))
    local by = {}
    for _, r in ipairs(rows) do
      by[r.name] = r
      print(("%-16s %11.1f %10.0f %9.3f %9.3f %6.1f MiB %5s"):format(r.name, r.startup_ms, r.calls_s,
        r.p50_ms, r.p99_ms, r.rss_mib, r.exits and "ok" or "HUNG"))
    end
    local c, ts, py = by["clawlua mcp"], by["TS SDK (node)"], by["python3 floor"]
    if ts then
      local q = { ts.startup_ms / c.startup_ms, c.calls_s / ts.calls_s, ts.rss_mib / c.rss_mib }
      ratios.ts_start[run], ratios.ts_calls[run], ratios.ts_rss[run] = q[1], q[2], q[3]
      print(("vs TS SDK: startup 1/%.0f, calls/s x%.1f, peak RSS 1/%.1f (targets: 1/100, x10, 1/15)")
        :format(q[1], q[2], q[3]))
    end
    ratios.py_start[run], ratios.py_calls[run] = py.startup_ms / c.startup_ms, c.calls_s / py.calls_s
    print(("vs python3 floor: startup 1/%.1f, calls/s x%.2f (target x2.5), peak RSS 1/%.1f"):format(
      ratios.py_start[run], ratios.py_calls[run], py.rss_mib / c.rss_mib))
    local top = by["C ceiling"]
    ratios.top_calls[run] = top.calls_s / py.calls_s
    ratios.py_p50[run], ratios.top_p50[run] = py.p50_ms / c.p50_ms, py.p50_ms / top.p50_ms
    print(("the client's ceiling: calls/s x%.2f the python3 floor's, clawlua at %.0f%% of it"):format(
      ratios.top_calls[run], 100 * c.calls_s / top.calls_s))
    -- what each server adds to the client's own time per call (the ceiling's)
    local function server_us(r) return 1e6 / r.calls_s - 1e6 / top.calls_s end
    local cu, pu = server_us(c), server_us(py)
    ratios.py_server[run] = pu / cu
    local line = ("server us/call beyond the client's %.1f: clawlua %.1f, python3 %.1f (x%.2f)")
      :format(1e6 / top.calls_s, cu, pu, pu / cu)
    if ts then
      ratios.ts_server[run] = server_us(ts) / cu
      line = line .. (", TS SDK %.1f (x%.1f)"):format(server_us(ts), server_us(ts) / cu)
    end
    print(line)
  end
  print(("\nratios over %d runs, median (min .. max):"):format(RUNS))
  if #ratios.ts_start > 0 then
    print("  TS SDK startup / clawlua startup   " .. spread(ratios.ts_start) .. "   target >= 100")
    print("  clawlua calls/s / TS SDK calls/s   " .. spread(ratios.ts_calls) .. "   target >= 10")
    print("  TS SDK RSS / clawlua RSS           " .. spread(ratios.ts_rss) .. "   target >= 15")
  end
  print("  python3 startup / clawlua startup  " .. spread(ratios.py_start))
  print("  clawlua calls/s / python3 calls/s  " .. spread(ratios.py_calls) .. "   target >= 2.5")
  print("  C ceiling calls/s / python3 calls/s " .. spread(ratios.top_calls) .. "   (what this client allows)")
  print("  python3 / clawlua server us/call    " .. spread(ratios.py_server))
  if #ratios.ts_server > 0 then print("  TS SDK / clawlua server us/call     " .. spread(ratios.ts_server)) end
  -- calls/s is a mean: a few calls held up by other work on a busy machine weigh on it; the
  -- median round trip does not.
  print("  python3 p50 / clawlua p50           " .. spread(ratios.py_p50))
  print("  python3 p50 / C ceiling p50         " .. spread(ratios.top_p50))
end)
