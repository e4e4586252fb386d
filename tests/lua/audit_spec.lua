-- clawlua.audit core: the bounded ring, emission from Lua and C, queries, subscribers.
local claw = require "clawlua"
local audit = claw.audit

describe("audit ring", function()
  before_each(function() audit.configure { capacity = 10000, event_cap = 4096 } end)

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
