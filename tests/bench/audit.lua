-- Audit throughput, each figure against a peer measured in the same run:
--   ring appends from C (cl_audit_emit) and from Lua (audit.emit);
--   the JSONL sink (hash chain + one write(2) per record; and with batch = true, one write(2)
--   per 64 KiB) against raw write(2) of the same bytes, per fsync policy, with per-record
--   latency (the time the loop is held);
--   queries over 10,000 events (ring and file) against plain Lua scans.
--   build/bin/clawlua tests/bench/audit.lua [scale=1] [dir=/tmp]
local claw = require "clawlua"
local audit = claw.audit
local bench = require "clawlua.audit_bench" -- benchmark hooks, not part of the public module
local cjson = require "cjson"

local scale = tonumber(arg and arg[1]) or 1
local base = arg and arg[2] or "/tmp"
local dir = assert(io.popen("mktemp -d " .. base .. "/clawlua-bench.XXXXXX")):read("l")

local function best(n, fn)
  local b = math.huge
  for _ = 1, n do
    collectgarbage("collect")
    local t0 = claw.now()
    fn()
    local dt = claw.now() - t0
    if dt < b then b = dt end
  end
  return b
end

local function fmt_rate(x)
  if x >= 1e6 then return ("%.2f M/s"):format(x / 1e6) end
  if x >= 1e4 then return ("%.0f k/s"):format(x / 1e3) end
  return ("%.0f /s"):format(x)
end

local rows = {}
local function row(group, what, value, note) rows[#rows + 1] = { group, what, value, note or "" } end

-- Events shaped like what the primitives emit.
local details = {
  { syscall = "ptrace", nr = 101, arch = "x86_64", action = "kill_process", comm = "python3",
    exe = "/usr/bin/python3.11", sig = 31, code = "0x80000000", source = "kernel" },
  { proto = "tcp", src = "10.200.0.2", sport = 40312, dst = "10.200.0.1", dport = 443, dir = "out",
    rule = "default-deny" },
  { argv = { "python3", "-c", "print(1+1)" }, cwd = "/work", timeout = 10 },
}
local kinds = { "seccomp.kill", "fw.drop", "vm.exec" }

-- 1. Ring appends ----------------------------------------------------------------------------
audit.configure { capacity = 10000, event_cap = 4096 }
local N = math.floor(300000 * scale)
local c_time = best(3, function() bench.emit(N, "seccomp.kill", details[1]) end)
local lua_time = best(3, function()
  local emit, d = audit.emit, details[1]
  for _ = 1, N do emit("seccomp.kill", d) end
end)
-- The goal of issue 10 is stated for a 5-field event.
local five = { syscall = "ptrace", nr = 101, arch = "x86_64", action = "kill_process", comm = "python3" }
local lua_five = best(3, function()
  local emit = audit.emit
  for _ = 1, N do emit("seccomp.kill", five) end
end)
local attributed = { sandbox = "vm-7", pid = 4242 }
for k, v in pairs(details[1]) do attributed[k] = v end
local lua_attr = best(3, function()
  local emit = audit.emit
  for _ = 1, N do emit("seccomp.kill", attributed) end
end)
row("ring append", "from C (cl_audit_emit)", fmt_rate(N / c_time), "peer")
row("ring append", "from Lua (audit.emit)", fmt_rate(N / lua_time), ("%.2fx of C"):format(c_time / lua_time))
row("ring append", "from Lua, 5 fields", fmt_rate(N / lua_five), ("%.2fx of C (9 fields)"):format(c_time / lua_five))
row("ring append", "from Lua, sandbox+pid lifted", fmt_rate(N / lua_attr), ("%.2fx of C"):format(c_time / lua_attr))

-- 2. JSONL sink vs raw write(2) --------------------------------------------------------------
-- Fill the ring with a realistic mix; the sink then writes those records (the part of an emit
-- that is the sink's: chain hash, framing, one write(2)).
for i = 1, 10000 do
  local k = i % 3 + 1
  local d = {}
  for kk, v in pairs(details[k]) do d[kk] = v end
  d.sandbox, d.pid = "vm-" .. (i % 16), 1000 + i % 500
  audit.emit(kinds[k], d)
end
local M = math.floor(100000 * scale)
local ROUNDS = 5
-- The raw peer writes the bytes a sink wrote: make them once.
local src = dir .. "/src.jsonl"
do
  local s = assert(audit.sink { path = src, max_bytes = 0, fsync = "never" })
  bench.sink(s, M)
  s:close()
end
-- The machine is shared: runs alternate between peer and sink, and the best of each counts.
local function fastest(a, b) if not a or b.seconds < a.seconds then return b end return a end
for _, policy in ipairs { "never", "interval", "always" } do
  local raw, t, st, drain
  for _ = 1, ROUNDS do
    local rawpath = dir .. "/raw.jsonl"
    raw = fastest(raw, bench.write(src, rawpath, M + 1))
    os.remove(rawpath)
    local path = dir .. "/sink-" .. policy .. ".jsonl"
    local s = assert(audit.sink { path = path, max_bytes = 0, fsync = policy, fsync_interval = 1 })
    local r = bench.sink(s, M)
    local t0 = claw.now()
    assert(s:sync(60))
    local d = claw.now() - t0
    if not t or r.seconds < t.seconds then t, st, drain = r, s:stats(), d end
    s:close()
    os.remove(path)
  end
  row("jsonl sink " .. policy, "raw write(2), same bytes", ("%.0f MB/s  %s"):format(raw.bytes / raw.seconds / 1e6,
    fmt_rate(M / raw.seconds)), ("p50 %.1f p99 %.1f max %.0f us"):format(raw.p50_us, raw.p99_us, raw.max_us))
  row("jsonl sink " .. policy, "sink (hash+frame+write)", ("%.0f MB/s  %s"):format(t.bytes / t.seconds / 1e6,
    fmt_rate(M / t.seconds)), ("%.2fx of raw; p50 %.1f p99 %.1f max %.0f us"):format(raw.seconds / t.seconds,
    t.p50_us, t.p99_us, t.max_us))
  if policy == "never" then
    -- batch = true: the same records, one write(2) per 64 KiB batch (chained record by record).
    local b
    for _ = 1, ROUNDS do
      local path = dir .. "/sink-batch.jsonl"
      local s = assert(audit.sink { path = path, max_bytes = 0, fsync = policy, batch = true })
      b = fastest(b, bench.sink(s, M))
      s:close()
      os.remove(path)
    end
    row("jsonl sink " .. policy, "sink, batch = true", ("%.0f MB/s  %s"):format(b.bytes / b.seconds / 1e6,
      fmt_rate(M / b.seconds)), ("%.2fx of raw; p50 %.1f p99 %.1f max %.0f us"):format(raw.seconds / b.seconds,
      b.p50_us, b.p99_us, b.max_us))
  end
  if policy ~= "never" then
    row("jsonl sink " .. policy, "fsync worker", ("%d fdatasync"):format(st.fsyncs),
      ("mean %.2f ms, max %.2f ms; all durable %.1f ms after the last write"):format(
        st.mean_sync_seconds * 1e3, st.max_sync_seconds * 1e3, drain * 1e3))
  end
end
os.remove(src)
-- What making every record durable costs when the loop itself waits for it.
local SYNC_N = math.floor(2000 * scale)
do
  local path = dir .. "/src.jsonl"
  local s = assert(audit.sink { path = path, max_bytes = 0, fsync = "never" })
  bench.sink(s, SYNC_N)
  s:close()
  local naive = bench.write(path, dir .. "/naive.jsonl", SYNC_N, true)
  row("jsonl sink always", "peer: write+fdatasync on the loop", fmt_rate(SYNC_N / naive.seconds),
    ("p50 %.0f p99 %.0f max %.0f us held per record"):format(naive.p50_us, naive.p99_us, naive.max_us))
  os.remove(path)
  os.remove(dir .. "/naive.jsonl")
end
-- End to end: emit with a sink attached against emit alone.
do
  local E = math.floor(200000 * scale)
  local alone = best(3, function()
    local emit, d = audit.emit, details[1]
    for _ = 1, E do emit("seccomp.kill", d) end
  end)
  local path = dir .. "/e2e.jsonl"
  local s = assert(audit.sink { path = path, max_bytes = 0, fsync = "interval" })
  local with = best(3, function()
    local emit, d = audit.emit, details[1]
    for _ = 1, E do emit("seccomp.kill", d) end
  end)
  s:close()
  os.remove(path)
  row("emit end to end", "audit.emit, ring only", fmt_rate(E / alone), "peer")
  row("emit end to end", "audit.emit + JSONL sink", fmt_rate(E / with), ("%.2fx of ring only"):format(alone / with))
end

-- 3. Queries over 10,000 events ---------------------------------------------------------------
audit.configure { capacity = 10000 }
for i = 1, 10000 do
  local k = i % 3 + 1
  local d = {}
  for kk, v in pairs(details[k]) do d[kk] = v end
  d.sandbox, d.pid = "vm-" .. (i % 16), 1000 + i % 500
  audit.emit(kinds[k], d)
end
local filter = { kind = "seccomp", sandbox = "vm-3" }
local plain = audit.events {} -- the peer: the same events as Lua tables, scanned in Lua
local Q = 20
local ring_q = best(Q, function() audit.events(filter) end) -- decodes the matches
local sink_out
local lua_q = best(Q, function()
  local out = {}
  for _, ev in ipairs(plain) do
    local k = ev.kind
    if (k == "seccomp" or k:sub(1, 8) == "seccomp.") and ev.sandbox == "vm-3" then out[#out + 1] = ev end
  end
  sink_out = out
end)
local nmatch = #audit.events(filter)
row("query 10k ring", "Lua scan of a table of events", ("%.2f ms"):format(lua_q * 1e3), "peer (no decoding)")
row("query 10k ring", "audit.events{kind=,sandbox=}", ("%.2f ms"):format(ring_q * 1e3),
  ("%d matches decoded; %.2fx of peer"):format(nmatch, lua_q / ring_q))
local ring_l = best(Q, function() audit.events { kind = "fw", limit = 10 } end)
row("query 10k ring", "audit.events{kind=, limit=10}", ("%.3f ms"):format(ring_l * 1e3), "newest 10")

local qpath = dir .. "/query.jsonl"
do
  local s = assert(audit.sink { path = qpath, max_bytes = 0 })
  bench.sink(s, 10000)
  s:close()
end
local file_q = best(5, function()
  local n = 0
  for _ in audit.read_file(qpath, filter) do n = n + 1 end
end)
local cj_q = best(5, function()
  local out = {}
  for line in io.lines(qpath) do
    local ev = cjson.decode(line)
    local k = ev.kind
    if (k == "seccomp" or k:sub(1, 8) == "seccomp.") and ev.sandbox == "vm-3" then out[#out + 1] = ev end
  end
  sink_out = out
end)
assert(#sink_out > 0)
row("query 10k file", "io.lines + lua-cjson + Lua filter", ("%.2f ms"):format(cj_q * 1e3), "peer")
row("query 10k file", "audit.read_file(path, filter)", ("%.2f ms"):format(file_q * 1e3),
  ("%.2fx of peer"):format(cj_q / file_q))
local v_q = best(3, function() assert(audit.verify(qpath).ok) end)
row("query 10k file", "audit.verify (chain check)", ("%.2f ms"):format(v_q * 1e3),
  ("%.0f k records/s"):format(10001 / v_q / 1e3))
os.remove(qpath)
os.execute("rmdir " .. dir)

print(("audit benchmarks (scale %s, files in %s)"):format(scale, base))
local w = { 0, 0, 0 }
for _, r in ipairs(rows) do
  for i = 1, 3 do w[i] = math.max(w[i], #r[i]) end
end
local last
for _, r in ipairs(rows) do
  if r[1] ~= last then print() last = r[1] end
  print(("%-" .. w[1] .. "s  %-" .. w[2] .. "s  %" .. w[3] .. "s  %s"):format(r[1], r[2], r[3], r[4]))
end
