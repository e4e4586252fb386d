-- labels: root slow
-- timeout: 600
-- Fault injection (issue 14): the disk under a JSONL audit sink fills up, over and over. Each
-- cycle checks that the error is clear (it names the file and ENOSPC, once), that every record
-- written before the disk filled is in the file intact and the chain verifies, that the runtime
-- goes on (the ring still takes and answers), and that when room comes back the file accounts
-- for every record it lacks; half the cycles write in batches (batch = true), where the disk
-- fills in the middle of a batch. After all cycles: no fd, thread or mount left behind.
local claw = require "clawlua"
local H = require "helper"
local U = require "audit_util"
local audit = claw.audit

-- (50 under the gc stage: the sink's C paths are what this checks, and a collection at every
-- call makes each cycle ~20x dearer: 1,000 outlasted the timeout there)
local CYCLES = tonumber(os.getenv("CLAWLUA_FULL_CYCLES")) or (os.getenv("CLAWLUA_GC_STRESS") and 50 or 1000)

local function threads()
  local n = 0
  for _ in io.popen("ls /proc/self/task"):lines() do n = n + 1 end
  return n
end

local function mounted(dir)
  for line in io.lines("/proc/self/mountinfo") do
    if line:find(" " .. dir .. " ", 1, true) then return true end
  end
  return false
end

-- The ring's records after seq, by seq.
local function ring_after(seq)
  local t = {}
  for _, ev in ipairs(audit.events { after_seq = seq }) do t[ev.seq] = ev end
  return t
end

-- One cycle on the tmpfs mounted at mnt; `i` varies the record sizes so that some writes are
-- cut short in the middle of a record (and undone) and others fail whole.
local function cycle(mnt, i)
  local path = mnt .. "/audit-" .. i .. ".jsonl"
  local filler = mnt .. "/filler"
  H.write_file(filler, ("f"):rep(8192)) -- room given back after the disk is full
  local fsync = ({ "never", "interval", "always" })[i % 3 + 1]
  -- Every other cycle in batches: the disk fills in the middle of a batch of records.
  local batch = i % 2 == 0
  local s <close> = assert(audit.sink { path = path, max_bytes = 0, fsync = fsync, batch = batch })
  local seq0 = audit.stats().last_seq
  local emitted = {}
  local pad = ("d"):rep(200 + (i * 37) % 1800)
  local n = 0
  local dropped, jump = 0, 0
  while dropped < 3 do
    for _ = 1, batch and 8 or 1 do
      n = n + 1
      assert(n < 5000, "the disk never filled")
      emitted[#emitted + 1] = audit.emit("test.fill", { cycle = i, n = n, pad = pad:sub(1, #pad - n % 50) })
    end
    local d = s:stats().dropped -- stats() writes a waiting batch first
    jump = math.max(jump, d - dropped)
    dropped = d
  end
  local st = s:stats()
  -- The error is clear: once, naming the file and ENOSPC.
  assert.are.equal("No space left on device", st.error) -- (a small record may still fit after)
  local errs = audit.events { after_seq = seq0, kind = "audit.sink.error" }
  assert.are.equal(1, #errs, "one error event per failure, not one per record")
  assert.are.same({ sink = path, error = "No space left on device", errno = 28, code = "ENOSPC",
                    op = "write" }, errs[1].detail)
  -- Nothing written before is lost: the file holds its anchor, then every record the sink
  -- wrote, byte for byte what the ring holds, in order, and nothing torn. Every event emitted
  -- before the first drop is there; the sink saw every event since seq0, and what it could not
  -- write is exactly what it counted as dropped.
  local lines, torn = U.lines(path)
  assert.is_nil(torn, "a torn line on a full disk")
  assert.are.equal("audit.anchor", claw.json.decode(lines[1]).kind)
  local ring = ring_after(seq0)
  local in_file, prev_seq = {}, 0
  for k = 2, #lines do
    local ev = claw.json.decode(lines[k])
    ev.prev, ev.hash = nil, nil
    assert.is_true(ev.seq > prev_seq)
    prev_seq = ev.seq
    in_file[ev.seq] = true
    assert.are.same(ring[ev.seq], ev)
  end
  local k = 1
  while in_file[emitted[k]] do k = k + 1 end
  assert.is_true(k > 1 and k <= #emitted, "no record written before the disk filled")
  local seen = 0
  for _ in pairs(ring) do seen = seen + 1 end
  assert.are.equal(seen - st.dropped, #lines - 1)
  local rep, found = U.verify(path)
  assert.is_true(rep.ok, found)
  assert.are.equal(#lines, rep.files[1].records)
  -- The runtime goes on: the ring takes events and answers queries.
  local probe = audit.emit("test.alive", { cycle = i })
  assert.are.equal(probe, audit.events { after_seq = probe - 1 }[1].seq)
  assert.are.equal(#emitted, #audit.events { after_seq = seq0, kind = "test.fill" })
  -- Room again: the next record is written, after a report of what was lost, in the file.
  os.remove(filler)
  audit.emit("test.fill", { cycle = i, after = true })
  st = s:stats()
  assert.is_false(st.failing)
  local missing, reported = U.drops_in_file(path)
  assert.are.equal(st.dropped, missing)
  assert.are.equal(st.dropped, reported)
  rep, found = U.verify(path)
  assert.is_true(rep.ok, found)
  assert.is_true(s:close())
  os.remove(path)
  return batch and jump > 1 -- a batch the disk cut part-way
end

describe("a JSONL sink on a disk that fills up", function()
  it("says so clearly, keeps what it wrote, and the runtime goes on (" .. CYCLES .. " cycles)", function()
    local ok, why = U.can_mount()
    if not ok then
      pending(why)
      return
    end
    audit.configure { capacity = 10000, event_cap = 4096 }
    H.settle()
    local fds0, threads0 = H.fds(), threads()
    local mnt, umount = U.tmpfs("64k")
    local ok2, err = pcall(function()
      local cut = 0
      for i = 1, CYCLES do
        if cycle(mnt, i) then cut = cut + 1 end
      end
      assert.is_true(cut > 0, "no batch was cut by the full disk")
    end)
    local ok3, err3 = pcall(umount)
    assert(ok2, err)
    assert(ok3, err3)
    assert.is_false(mounted(mnt), "the tmpfs is still mounted")
    H.settle()
    assert.are.same(fds0, H.fds())
    assert.are.equal(threads0, threads())
    assert.are.equal(0, audit.stats().sinks)
  end)
end)
