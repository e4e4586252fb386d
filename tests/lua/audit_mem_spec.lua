-- labels: slow
-- timeout: 900
-- The ring's memory bound holds over a million appends with large fields: it never holds more
-- than capacity events, its accounted bytes stay under capacity x event_cap, and the process's
-- resident memory stays flat.
local claw = require "clawlua"
local audit = claw.audit

local function rss_kb()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return tonumber(s:match("VmRSS:%s+(%d+) kB"))
end

describe("the audit ring", function()
  it("stays within capacity and flat in memory over 1,000,000 appends with large fields", function()
    audit.configure { capacity = 10000, event_cap = 4096 }
    local big = ("x"):rep(16 * 1024)
    local detail = { s = big, list = { big, big }, n = 0, f = print, bad = "\xff\xfe", t = {} }
    detail.t.self = detail.t -- a cycle
    local before = audit.stats()
    -- Fill the ring, then measure.
    for i = 1, 50000 do
      detail.n = i
      audit.emit("test.mem", detail)
    end
    collectgarbage("collect")
    collectgarbage("collect")
    local base = rss_kb()
    local peak = base
    local total = 1000000
    for i = 50001, total do
      detail.n = i
      audit.emit("test.mem", detail)
      if i % 50000 == 0 then
        local st = audit.stats()
        assert.are.equal(st.capacity, st.count)
        assert.is_true(st.bytes <= st.max_bytes, ("%d > %d bytes"):format(st.bytes, st.max_bytes))
        collectgarbage("collect")
        peak = math.max(peak, rss_kb())
      end
    end
    local st = audit.stats()
    assert.are.equal(10000, st.count)
    assert.are.equal(before.dropped + before.count + total - 10000, st.dropped)
    assert.are.equal(before.last_seq + total, st.last_seq)
    assert.is_true(st.bytes <= st.max_bytes)
    -- The bound is what is held: 10,000 records of at most 4 KiB plus the slots.
    assert.is_true(st.max_bytes < 48 * 1024 * 1024)
    local growth = peak - base
    print(("\n  RSS %d kB after the ring filled, peak %d kB over %d more appends (+%d kB); ring %d of %d bytes")
      :format(base, peak, total - 50000, growth, st.bytes, st.max_bytes))
    assert.is_true(growth < 4096, ("resident memory grew by %d kB"):format(growth))
    local last = audit.events { limit = 1 }[1]
    assert.are.equal(total, last.detail.n)
    assert.is_true(last.truncated)
  end)
end)
