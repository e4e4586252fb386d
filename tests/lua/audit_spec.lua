-- clawlua.audit core: the bounded ring, emission from Lua and C, queries, subscribers.
local claw = require "clawlua"
local audit = claw.audit

describe("audit ring", function()
  before_each(function() audit.configure { capacity = 10000, event_cap = 4096 } end)

  it("lifts attribution out of the detail, whatever the table's shape", function()
    local seq = audit.emit("vm.list", { 1, 2, pid = 3, vm = "vm-c" })
    local e = audit.events { after_seq = seq - 1 }[1]
    assert.are.same({ 1, 2 }, e.detail)
    assert.are.equal(3, e.pid)
    assert.are.equal("vm-c", e.sandbox)
    seq = audit.emit("vm.list", { sandbox = "vm-d", b = "x", a = { z = 1, y = 2 } })
    local line = audit.format(audit.events { after_seq = seq - 1 }[1])
    assert.truthy(line:find("vm-d", 1, true))
    e = audit.events { after_seq = seq - 1 }[1]
    assert.are.same({ b = "x", a = { z = 1, y = 2 } }, e.detail)
  end)

  it("records structured events with attribution and filters them", function()
    local first = audit.stats().last_seq
    audit.emit("vm.start", { sandbox = "vm-a", image = "debian" })
    audit.emit("vm.stop", { vm = "vm-b" })
    audit.emit("fw.drop", { sandbox = "vm-a", pid = 77, dst = "10.0.0.9" })
    audit.emit("vmx.other", {})
    local evs = audit.events { after_seq = first }
    assert.are.equal(4, #evs)
    local e = evs[1]
    assert.are.equal("vm.start", e.kind)
    assert.are.equal("vm-a", e.sandbox)
    assert.are.same({ image = "debian" }, e.detail)
    assert.are.equal(first + 1, e.seq)
    assert.is_true(e.time > 1.7e9 and e.mono > 0)
    assert.are.equal(2, #audit.events { after_seq = first, kind = "vm" }) -- not vmx.other
    assert.are.equal(2, #audit.events { after_seq = first, sandbox = "vm-a" })
    assert.are.equal(77, audit.events { after_seq = first, pid = 77 }[1].pid)
    local n = 0
    for ev in audit.query { after_seq = first, kind = "fw.drop" } do
      n = n + 1
      assert.are.equal("10.0.0.9", ev.detail.dst)
    end
    assert.are.equal(1, n)
    assert.are.equal("vmx.other", audit.events { after_seq = first, limit = 1 }[1].kind)
  end)

  it("never holds more than capacity events, counting what it evicts", function()
    audit.configure { capacity = 100 }
    local before = audit.stats()
    for i = 1, 1000 do audit.emit("test.fill", { i = i }) end
    local st = audit.stats()
    assert.are.equal(100, st.count)
    assert.are.equal(before.dropped + before.count + 1000 - 100, st.dropped)
    local evs = audit.events { kind = "test.fill" }
    assert.are.equal(100, #evs)
    assert.are.equal(901, evs[1].detail.i)
  end)

  it("keeps memory under capacity x event_cap whatever the fields", function()
    audit.configure { capacity = 1000, event_cap = 1024 }
    local huge = string.rep("x", 1 << 20)
    for i = 1, 20000 do
      audit.emit("test.big", { s = huge, list = { huge, huge }, i = i, f = print, bad = "\xff\xfe" })
    end
    local st = audit.stats()
    assert.is_true(st.bytes <= st.max_bytes, ("%d > %d"):format(st.bytes, st.max_bytes))
    local ev = audit.events { limit = 1 }[1]
    assert.is_true(ev.truncated)
    assert.are.equal("<function>", ev.detail.f)
    assert.are.equal("\u{fffd}\u{fffd}", ev.detail.bad)
    assert.matches("%.%.%.%[truncated %d+ bytes%]$", ev.detail.s)
  end)

  it("records cycles and odd keys instead of failing", function()
    local t = { name = "loop" }
    t.self = t
    local seq = audit.emit("test.cycle", { t = t, [true] = 1 })
    local ev = audit.events { after_seq = seq - 1 }[1]
    assert.are.equal("test.cycle", ev.kind)
    assert.is_true(ev.truncated)
  end)

  it("rejects malformed kinds and options", function()
    assert.has_error(function() audit.emit("Bad Kind") end)
    assert.has_error(function() audit.emit("a..b") end)
    assert.has_error(function() audit.events { bogus = 1 } end, "bad field 'bogus' (unknown field)")
    assert.has_error(function() audit.configure { capacity = 0 } end, "bad field 'capacity' (must be 1..16777216)")
    assert.has_error(function() audit.configure { event_cap = 10 } end)
  end)

  it("attributes events to sandboxes through tracked pids", function()
    audit.track_pid(4242, "jail-7")
    local seq = audit.emit("seccomp.deny", { pid = 4242, syscall = "ptrace" })
    assert.are.equal("jail-7", audit.events { after_seq = seq - 1 }[1].sandbox)
    assert.are.equal("jail-7", audit.sandbox_of(4242))
    audit.forget_pid(4242)
    assert.is_nil(audit.sandbox_of(4242))
  end)
end)

describe("audit subscribers", function()
  it("see later matching events on the loop, and stop when closed", function()
    local seen = {}
    local sub = audit.subscribe(function(ev) seen[#seen + 1] = ev.detail.n end, { kind = "test.sub" })
    audit.emit("test.sub", { n = 1 })
    audit.emit("test.other", { n = 2 })
    audit.emit("test.sub", { n = 3 })
    claw.sleep(0.01)
    assert.are.same({ 1, 3 }, seen)
    sub:close()
    audit.emit("test.sub", { n = 4 })
    claw.sleep(0.01)
    assert.are.same({ 1, 3 }, seen)
  end)

  it("count what they missed when they fall behind the ring", function()
    audit.configure { capacity = 10 }
    local sub = audit.subscribe(function() end)
    for i = 1, 50 do audit.emit("test.flood", { i = i }) end -- no loop turn in between
    claw.sleep(0.01)
    assert.are.equal(40, sub.missed)
    sub:close()
    audit.configure { capacity = 10000 }
  end)

  it("do not keep the host alive", function()
    local r = assert(claw.proc.run { os.getenv("CLAWLUA_BIN") or "build/bin/clawlua", "-e",
      "local a = require('clawlua').audit; a.subscribe(function() end); print('bye')", timeout = 10 })
    assert.are.equal("bye\n", r.stdout)
    assert.are.equal(0, r.code)
  end)
end)

describe("the event schema", function()
  before_each(function() audit.configure { capacity = 10000, event_cap = 4096 } end)

  it("gives every event seq, time, mono, kind and detail; sandbox and pid when known", function()
    local t0, m0 = claw.loop.time(), claw.now()
    local a = audit.emit("fw.drop", { vm = "vm-3", proto = "tcp", src = "10.0.0.2", sport = 5555,
                                      dst = "10.0.0.9", dport = 22, dir = "out" })
    local b = audit.emit("policy.deny", {})
    assert.are.equal(a + 1, b)
    local evs = audit.events { after_seq = a - 1 }
    local e = evs[1]
    assert.are.same({ "detail", "kind", "mono", "sandbox", "seq", "time" }, (function()
      local k = {}
      for name in pairs(e) do k[#k + 1] = name end
      table.sort(k)
      return k
    end)())
    assert.are.equal("integer", math.type(e.seq))
    assert.is_true(e.time >= t0 - 1 and e.time <= claw.loop.time() + 1)
    assert.is_true(e.mono >= m0 - 0.001 and e.mono <= claw.now() + 0.001)
    assert.are.same({ proto = "tcp", src = "10.0.0.2", sport = 5555, dst = "10.0.0.9", dport = 22,
                      dir = "out" }, e.detail)
    assert.is_nil(evs[2].sandbox)
    assert.is_nil(evs[2].pid)
    assert.are.same({}, evs[2].detail)
  end)

  -- The encoder caches the JSON of detail keys by the address of the Lua string; a key whose
  -- string was collected must never be written with the bytes of another.
  it("writes every detail key as given, through cache evictions and collections", function()
    for round = 1, 2 do
      local first = audit.stats().last_seq
      for i = 1, 300 do -- more keys than the cache holds (256), made fresh (new strings) each round
        local k = ("k%d_%d_%s"):format(round, i, ("x"):rep(i % 30))
        -- with a key to escape and one too long for the cache
        audit.emit("test.keys", { [k] = i, ["q\"" .. i] = i, [("long"):rep(12) .. i] = i })
        if i % 61 == 0 then collectgarbage() end
      end
      collectgarbage()
      collectgarbage()
      -- Strings of the same length at (perhaps) the same addresses, with other bytes.
      local again = {}
      for i = 1, 300 do
        local k = ("K%d_%d_%s"):format(round, i, ("y"):rep(i % 30))
        again[i] = { [k] = -i }
        audit.emit("test.keys", again[i])
      end
      local evs = audit.events { kind = "test.keys", after_seq = first }
      assert.are.equal(600, #evs)
      for i = 1, 300 do
        local k = ("k%d_%d_%s"):format(round, i, ("x"):rep(i % 30))
        assert.are.same({ [k] = i, ["q\"" .. i] = i, [("long"):rep(12) .. i] = i }, evs[i].detail)
        assert.are.same(again[i], evs[300 + i].detail)
      end
    end
  end)

  -- The wall clock is kept as an offset from the monotonic one and read again every 1 ms.
  it("stamps events with the wall clock to the millisecond", function()
    for _ = 1, 5 do
      local before = claw.loop.time()
      local seq = audit.emit("test.clock", {})
      local after = claw.loop.time()
      local e = audit.events { after_seq = seq - 1 }[1]
      assert.is_true(e.time >= before - 0.002 and e.time <= after + 0.002,
        ("%.6f not in [%.6f, %.6f]"):format(e.time, before, after))
      claw.sleep(0.003)
    end
  end)

  it("formats records for people", function()
    local seq = audit.emit("seccomp.kill", { sandbox = "jail-1", pid = 7, syscall = "ptrace",
                                             argv = { "a", "b" }, note = "two words" })
    local ev = audit.events { after_seq = seq - 1 }[1]
    local line = audit.format(ev)
    assert.matches('^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ #' .. seq
      .. ' seccomp%.kill %[jail%-1%] pid=7 argv=%["a","b"%] note="two words" syscall=ptrace$', line)
    assert.matches("\27%[1;31mseccomp%.kill\27%[0m", audit.format(ev, { color = true }))
    local long = audit.format(ev, { max = 40 })
    assert.is_true(#long <= 44)
    assert.matches("…$", long)
    assert.is_nil(audit.format("not json"))
  end)
end)

describe("file queries", function()
  local H = require "helper"
  local dir
  setup(function() dir = H.tmpdir() end)
  teardown(function() H.rm_rf(dir) end)

  it("apply the same filters as the ring", function()
    audit.configure { capacity = 10000 }
    local path = dir .. "/q.jsonl"
    local s = assert(audit.sink { path = path })
    local first = audit.stats().last_seq
    local mid_time
    for i = 1, 300 do
      audit.emit(({ "vm.start", "vm.stop", "fw.drop", "seccomp.kill", "vmx.other" })[i % 5 + 1],
        { sandbox = "sb-" .. (i % 4), pid = 100 + (i % 7), i = i })
      if i == 150 then mid_time = claw.loop.time() claw.sleep(0.01) end
    end
    s:close()
    local filters = {
      { kind = "vm" }, { kind = "vm.stop" }, { kind = "seccomp", sandbox = "sb-1" }, { vm = "sb-2" },
      { pid = 103 }, { since = mid_time }, { ["until"] = mid_time }, { kind = "fw", limit = 5 },
      { after_seq = first + 250 }, { limit = 1 }, { kind = "nothing" },
    }
    for _, f in ipairs(filters) do
      local rf = { after_seq = first }
      for k, v in pairs(f) do rf[k] = v end
      local want = audit.events(rf)
      local got = {}
      for ev in audit.read_file(path, rf) do got[#got + 1] = ev end
      assert.are.same(want, (function()
        for _, ev in ipairs(got) do ev.prev, ev.hash = nil, nil end
        return got
      end)(), claw.json.encode(f))
      assert.is_true(#want > 0 or f.kind == "nothing")
    end
    assert.has_error(function() audit.read_file(path, { bogus = true }) end)
    local it, err = audit.read_file(dir .. "/none.jsonl")
    assert.is_nil(it)
    assert.matches("No such file", err)
  end)

  it("skip malformed and over-long lines, and count them", function()
    local path = dir .. "/mixed.jsonl"
    local s = assert(audit.sink { path = path })
    audit.emit("test.ok", { n = 1 })
    s:close()
    local f = assert(io.open(path, "a"))
    f:write("garbage\n", "{\"kind\":\"test.ok\",\"detail\":{\"n\":2}}\n", ("x"):rep(3 << 20), "\n",
      "\255\254\n", '{"kind":"test.ok","detail":{"n":"\\ud800"}}\n')
    s = assert(audit.sink { path = dir .. "/after.jsonl" })
    s:close()
    f:write(H.read_file(dir .. "/after.jsonl"))
    f:close()
    local r = assert(audit.reader(path, { filter = { kind = "test.ok" } }))
    local ns = {}
    while true do
      local ev = r:next()
      if not ev then break end
      ns[#ns + 1] = ev.detail.n
    end
    assert.are.same({ 1, 2 }, ns)
    local st = r:stats()
    assert.are.equal(3, st.malformed) -- garbage, bytes that are not UTF-8, a lone surrogate
    assert.are.equal(1, st.too_long)
    r:close()
    assert.has_error(function() r:next() end, "attempt to use a closed audit_reader")
  end)
end)
