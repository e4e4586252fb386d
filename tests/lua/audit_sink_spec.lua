-- Audit sinks: JSONL files (chain, anchors, rotation, fsync policies, failures) and stderr.
local claw = require "clawlua"
local H = require "helper"
local U = require "audit_util"
local audit = claw.audit

local dir
setup(function() dir = H.tmpdir() end)
teardown(function() H.rm_rf(dir) end)

describe("a JSONL sink", function()
  before_each(function() audit.configure { capacity = 10000, event_cap = 4096 } end)

  it("writes each event as one chained line that starts with an anchor", function()
    local path = dir .. "/basic.jsonl"
    local s = assert(audit.sink { path = path, fsync = "never" })
    local seq = audit.emit("vm.start", { sandbox = "vm-1", image = "debian", pid = 42 })
    audit.emit("fw.drop", { vm = "vm-1", proto = "tcp", src = "10.0.0.2", sport = 40000,
                            dst = "10.0.0.9", dport = 22 })
    s:close()
    local lines, torn = U.lines(path)
    assert.is_nil(torn)
    assert.are.equal(3, #lines)
    local anchor = claw.json.decode(lines[1])
    assert.are.equal("audit.anchor", anchor.kind)
    assert.are.equal(("0"):rep(64), anchor.prev)
    assert.are.same({ sink = path, reason = "open", version = 1 }, anchor.detail)
    local ev = claw.json.decode(lines[2])
    assert.are.equal(seq, ev.seq)
    assert.are.equal("vm-1", ev.sandbox)
    assert.are.equal(42, ev.pid)
    assert.are.same({ image = "debian" }, ev.detail)
    -- The chain, recomputed with sha256sum: hash = SHA-256(prev || line without prev/hash).
    for i, l in ipairs(lines) do
      local body, prev, hash = l:match('^(.*),"prev":"(%x+)","hash":"(%x+)"}$')
      assert.are.equal(U.sha256(prev .. body .. "}"), hash)
      if i > 1 then assert.are.equal(lines[i - 1]:match('"hash":"(%x+)"'), prev) end
    end
    -- The ring's record is the line without the chain fields.
    local ring = audit.events { after_seq = seq - 1, limit = 2 }
    assert.are.same(ring[1], (function() ev.prev, ev.hash = nil, nil return ev end)())
    assert.is_true(audit.verify(path).ok)
  end)

  -- batch = true: one write(2) per batch instead of per record. The records are in the file
  -- once the loop runs (or 64 KiB wait, or on stats/sync/close), chained record by record.
  it("writes batches when the loop runs, chained record by record (batch = true)", function()
    local path = dir .. "/batch.jsonl"
    local s = assert(audit.sink { path = path, fsync = "never", batch = true })
    assert.are.equal(1, #U.lines(path)) -- the anchor is written at once
    local first = audit.emit("test.batch", { i = 0, sandbox = "vm-b" })
    for i = 1, 9 do audit.emit("test.batch", { i = i }) end
    assert.are.equal(1, #U.lines(path), "a batch was written before the loop ran")
    claw.sleep(0)
    local lines = U.lines(path)
    assert.are.equal(11, #lines)
    local ring = audit.events { after_seq = first - 1 }
    for k = 2, 11 do
      local ev = claw.json.decode(lines[k])
      ev.prev, ev.hash = nil, nil
      assert.are.same(ring[k - 1], ev)
    end
    -- More than 64 KiB waiting is written without the loop.
    local pad = ("p"):rep(1000)
    for i = 1, 70 do audit.emit("test.batch", { i = i, pad = pad }) end
    local n = #U.lines(path)
    assert.is_true(n > 11 and n < 81, "the batch was not cut at 64 KiB: " .. n)
    assert.are.equal(81, s:stats().written) -- stats() writes what waits
    assert.are.equal(81, #U.lines(path))
    audit.emit("test.batch", { last = true })
    s:close() -- and close
    assert.are.equal(82, #U.lines(path))
    local rep, found = U.verify(path)
    assert.is_true(rep.ok, found)
    assert.are.equal(82, rep.files[1].records)
    assert.has_error(function() audit.sink { type = "stderr", batch = true } end,
      "bad field 'batch' (a stderr sink writes no batches)")
    -- Rotation by size with batches: one chain over every file, nothing lost.
    local rot = dir .. "/batch-rot.jsonl"
    s = assert(audit.sink { path = rot, fsync = "never", batch = true, max_bytes = 4096, keep = 1000 })
    for i = 1, 500 do
      audit.emit("test.batch", { i = i, pad = ("z"):rep(i % 300) })
      if i % 37 == 0 then claw.sleep(0) end
    end
    s:close()
    local files = audit.log_files(rot)
    rep, found = U.verify(files)
    assert.is_true(rep.ok, found)
    local records = 0
    for _, f in ipairs(rep.files) do records = records + f.records end
    assert.is_true(#files > 5)
    assert.are.equal(500 + #files, records) -- every event, and one anchor per file
  end)

  it("applies its filter, but always writes its own anchor", function()
    local path = dir .. "/filtered.jsonl"
    local s = assert(audit.sink { path = path, filter = { kind = "seccomp", sandbox = "jail-1" } })
    audit.emit("seccomp.kill", { sandbox = "jail-1", syscall = "ptrace" })
    audit.emit("seccomp.kill", { sandbox = "jail-2", syscall = "ptrace" })
    audit.emit("vm.start", { sandbox = "jail-1" })
    s:close()
    local kinds = {}
    for ev in audit.read_file(path) do kinds[#kinds + 1] = ev.kind .. ":" .. tostring(ev.sandbox) end
    assert.are.same({ "audit.anchor:nil", "seccomp.kill:jail-1" }, kinds)
    assert.has_error(function() audit.sink { path = path, filter = { limit = 3 } } end,
      "bad field 'limit' (unknown field)")
  end)

  it("rotates by size and keeps N files, chained across files", function()
    local path = dir .. "/rot.jsonl"
    local s = assert(audit.sink { path = path, max_bytes = 4096, keep = 3 })
    local first = audit.stats().last_seq + 1
    for i = 1, 400 do audit.emit("test.rot", { i = i, pad = ("p"):rep(100) }) end
    local st = s:stats()
    s:close()
    assert.is_true(st.rotations >= 10, "rotations: " .. st.rotations)
    local files = audit.log_files(path)
    assert.are.same({ path .. ".3", path .. ".2", path .. ".1", path }, files)
    assert.is_nil(io.open(path .. ".4"))
    for _, f in ipairs(files) do
      local size = #H.read_file(f)
      assert.is_true(size <= 4096 + 400, f .. " is " .. size .. " bytes")
    end
    local rep, found = U.verify(files)
    assert.is_true(rep.ok, found)
    -- Each rotated file begins with an anchor naming where the previous one ended.
    for k = 2, #rep.files do
      local head = claw.json.decode(U.lines(files[k])[1])
      assert.are.equal("audit.anchor", head.kind)
      assert.are.equal("rotate", head.detail.reason)
      assert.are.equal(rep.files[k - 1].last_seq, head.detail.prev_seq)
      assert.are.equal(rep.files[k - 1].last_hash, head.prev)
    end
    -- Nothing between the oldest kept record and the last is missing.
    local seqs = {}
    for _, f in ipairs(files) do
      for ev in audit.read_file(f) do seqs[#seqs + 1] = ev.seq end
    end
    for k = 2, #seqs do assert.are.equal(seqs[k - 1] + 1, seqs[k]) end
    assert.is_true(seqs[1] > first)
    -- Dropping a middle file breaks the chain between the files around it.
    local rep2, found2 = U.verify { files[1], files[3], files[4] }
    assert.is_false(rep2.ok)
    assert.are.equal("anchor@1", found2)
  end)

  it("keep = 0 keeps only the current file", function()
    local path = dir .. "/keep0.jsonl"
    local s = assert(audit.sink { path = path, max_bytes = 4096, keep = 0 })
    for i = 1, 100 do audit.emit("test.rot", { i = i, pad = ("p"):rep(100) }) end
    assert.is_true(s:stats().rotations > 0)
    s:close()
    assert.are.same({ path }, audit.log_files(path))
  end)

  it("syncs per its fsync policy on a worker thread", function()
    -- always: every record is covered by an fdatasync soon after it is written
    local s = assert(audit.sink { path = dir .. "/always.jsonl", fsync = "always" })
    for i = 1, 1000 do audit.emit("test.sync", { i = i }) end
    assert.is_true(H.eventually(function() return s:stats().unsynced == 0 end, 5 * H.scale))
    assert.is_true(s:sync(5))
    local st = s:stats()
    assert.is_true(st.fsyncs >= 1 and st.fsyncs <= 1001, "fsyncs " .. st.fsyncs)
    assert.are.equal("always", st.fsync)
    s:close()
    -- interval: within the interval, without anyone asking
    s = assert(audit.sink { path = dir .. "/interval.jsonl", fsync = "interval", fsync_interval = 0.05 })
    audit.emit("test.sync", {})
    assert.is_true(H.eventually(function() return s:stats().unsynced == 0 end, 2 * H.scale))
    s:close()
    -- never: only when asked
    s = assert(audit.sink { path = dir .. "/never.jsonl", fsync = "never" })
    audit.emit("test.sync", {})
    claw.sleep(0.2)
    assert.are.equal(0, s:stats().fsyncs)
    assert.are.equal(2, s:stats().unsynced) -- the anchor and the event
    assert.is_true(s:sync(5))
    assert.are.equal(0, s:stats().unsynced)
    s:close()
  end)

  it("sync() yields inside a task, so other tasks keep running", function()
    local s = assert(audit.sink { path = dir .. "/yield.jsonl", fsync = "always" })
    local ticks = 0
    local ticker = claw.spawn(function() while true do ticks = ticks + 1 claw.sleep(0) end end)
    claw.run(function()
      for i = 1, 200 do audit.emit("test.sync", { i = i }) end
      assert.is_true(s:sync(5))
    end)
    ticker:cancel()
    assert.is_true(ticks >= 1)
    s:close()
  end)

  it("continues the chain of an existing file, past the seq it holds", function()
    local path = dir .. "/reopen.jsonl"
    os.remove(path)
    local script = ([[
      local audit = require("clawlua").audit
      local s = assert(audit.sink { path = %q })
      for i = 1, %d do audit.emit("test.reopen", { i = i }) end
      print(audit.stats().last_seq)
      s:close()
    ]])
    local r1 = H.clawlua { "-e", script:format(path, 50) }
    assert.are.equal(0, r1.code, r1.stderr)
    local r2 = H.clawlua { "-e", script:format(path, 1) }
    assert.are.equal(0, r2.code, r2.stderr)
    local last1, last2 = tonumber(r1.stdout), tonumber(r2.stdout)
    assert.are.equal(51, last1) -- the anchor and 50 events
    assert.are.equal(last1 + 2, last2) -- numbering goes on from the file, not from 1
    local lines = U.lines(path)
    assert.are.equal(53, #lines)
    local re = claw.json.decode(lines[52])
    assert.are.equal("audit.anchor", re.kind)
    assert.are.same({ sink = path, reason = "reopen", prev_seq = last1, version = 1 }, re.detail)
    assert.is_true(audit.verify(path).ok)
  end)

  it("cuts a torn last record before appending, and says so in its anchor", function()
    local path = dir .. "/torn.jsonl"
    local lines = U.make_log(path, 5)
    local torn = lines[3]:sub(1, 40)
    U.write_lines(path, lines, torn) -- a crash in the middle of write(2)
    local rep = audit.verify(path)
    assert.is_true(rep.ok) -- the chain verifies up to the last whole record
    assert.is_true(rep.files[1].torn)
    assert.are.equal(40, rep.files[1].torn_bytes)
    local r = assert(audit.reader(path))
    local n = 0
    while r:next() do n = n + 1 end
    assert.are.equal(#lines, n)
    assert.are.equal(1, r:stats().torn)
    r:close()
    local s = assert(audit.sink { path = path })
    audit.emit("test.after", {})
    s:close()
    local after, tail = U.lines(path)
    assert.is_nil(tail)
    assert.are.equal(#lines + 2, #after)
    assert.are.equal(40, claw.json.decode(after[#lines + 1]).detail.cut_torn_bytes)
    local rep2 = audit.verify(path)
    assert.is_true(rep2.ok)
    assert.is_false(rep2.files[1].torn)
  end)

  it("refuses what it cannot write, with errors and without leaking", function()
    local fds = H.fds()
    local s, err, code = audit.sink { path = dir .. "/missing/dir/a.jsonl" }
    assert.is_nil(s)
    assert.matches("No such file or directory", err)
    assert.are.equal("ENOENT", code)
    s, err = audit.sink { path = dir } -- a directory
    assert.is_nil(s)
    assert.is_string(err)
    H.write_file(dir .. "/file", "x")
    s, err = audit.sink { path = dir .. "/file/a.jsonl" }
    assert.is_nil(s)
    assert.matches("Not a directory", err)
    H.write_file(dir .. "/notlog.jsonl", "hello world\n")
    s, err = audit.sink { path = dir .. "/notlog.jsonl" }
    assert.is_nil(s)
    assert.matches("not an audit log", err)
    assert.are.equal("hello world\n", H.read_file(dir .. "/notlog.jsonl")) -- untouched
    -- One writer per file.
    local a = assert(audit.sink { path = dir .. "/locked.jsonl" })
    s, err = audit.sink { path = dir .. "/locked.jsonl" }
    assert.is_nil(s)
    assert.matches("another process is writing", err)
    a:close()
    assert.has_error(function() audit.sink { path = dir .. "/x", fsync = "sometimes" } end,
      'bad field \'fsync\' ("never", "interval" or "always" expected)')
    assert.has_error(function() audit.sink { path = dir .. "/x", max_bytes = 10 } end)
    assert.has_error(function() audit.sink { path = dir .. "/x", keep = -1 } end)
    assert.has_error(function() audit.sink { path = dir .. "/x", bogus = 1 } end,
      "bad field 'bogus' (unknown field)")
    assert.has_error(function() audit.sink {} end, "bad field 'path' (a file path expected)")
    H.settle()
    assert.are.same(fds, H.fds())
  end)

  it("closes idempotently and rejects use after close", function()
    local s = assert(audit.sink { path = dir .. "/close.jsonl" })
    assert.is_true(s:close())
    assert.is_true(s:close())
    assert.has_error(function() s:sync() end, "attempt to use a closed audit_sink")
    assert.is_false(s:stats().open)
    do
      local _s <close> = assert(audit.sink { path = dir .. "/close2.jsonl" })
    end
    assert.are.equal(0, audit.stats().sinks)
  end)

  it("counts and reports what a full disk drops, and recovers (tmpfs)", function()
    local ok, why = U.can_mount()
    if not ok then
      pending(why)
      return
    end
    local mnt, umount = U.tmpfs("256k")
    local ok2, err = pcall(function()
      H.write_file(mnt .. "/filler", ("f"):rep(64 * 1024))
      local path = mnt .. "/full.jsonl"
      local s <close> = assert(audit.sink { path = path, max_bytes = 0, fsync = "always" })
      local seq0 = audit.stats().last_seq
      local dropped0 = audit.stats().sink_dropped
      local n = 0
      while s:stats().dropped < 20 and n < 5000 do
        n = n + 1
        audit.emit("test.fill", { n = n, pad = ("d"):rep(900) })
      end
      local st = s:stats()
      assert.is_true(st.dropped >= 20, "nothing dropped after " .. n .. " events")
      assert.are.equal("No space left on device", st.error)
      assert.are.equal(dropped0 + st.dropped, audit.stats().sink_dropped)
      local errs = U.events_after(seq0, "audit.sink.error")
      assert.are.equal(1, #errs) -- said once, not per record
      assert.are.equal(path, errs[1].detail.sink)
      assert.are.equal("No space left on device", errs[1].detail.error)
      -- Whole records only, and the chain holds.
      local _, torn = U.lines(path)
      assert.is_nil(torn)
      assert.is_true(audit.verify(path).ok)
      -- Room again: writing resumes, and every record missing from the file is accounted for
      -- in the file itself.
      os.remove(mnt .. "/filler")
      audit.emit("test.fill", { after = true })
      st = s:stats()
      assert.is_false(st.failing)
      local missing, reported = U.drops_in_file(path)
      assert.are.equal(st.dropped, missing)
      assert.are.equal(st.dropped, reported)
      assert.is_true(audit.verify(path).ok)
      assert.is_true(s:sync(5))
      s:close()
    end)
    umount()
    assert(ok2, err)
  end)

  it("fails to open on a read-only filesystem with the reason (tmpfs)", function()
    local ok, why = U.can_mount()
    if not ok then
      pending(why)
      return
    end
    local mnt, umount = U.tmpfs("64k")
    local ok2, err = pcall(function()
      H.sh(("mount -o remount,ro '%s'"):format(mnt))
      local s, e, code = audit.sink { path = mnt .. "/new.jsonl" }
      assert.is_nil(s)
      assert.matches("Read%-only file system", e)
      assert.are.equal("EROFS", code)
    end)
    umount()
    assert(ok2, err)
  end)
end)

describe("the stderr sink", function()
  it("prints one readable line per event", function()
    local r = H.clawlua { "-e", [[
      local audit = require("clawlua").audit
      local s = audit.sink { type = "stderr", color = false, filter = { kind = "vm" } }
      audit.emit("vm.start", { sandbox = "vm-7", pid = 99, image = "debian 12", cpus = 2 })
      audit.emit("fw.drop", {})
      audit.emit("vm.stop", { sandbox = "vm-7", evil = "\27[31mred" })
      s:close()
    ]] }
    assert.are.equal(0, r.code)
    local lines = {}
    for l in r.stderr:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal(2, #lines)
    assert.matches(
      '^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ #1 vm%.start %[vm%-7%] pid=99 cpus=2 image="debian 12"$', lines[1])
    -- A control character in a field never reaches the terminal.
    assert.matches('#3 vm%.stop %[vm%-7%] evil="\\u001b%[31mred"$', lines[2])
  end)

  it("never blocks the loop on a full stderr pipe: it buffers, then counts what it drops", function()
    local p = assert(claw.proc.spawn { H.bin, "-e", [[
      local claw = require("clawlua")
      local s = claw.audit.sink { type = "stderr", color = false }
      local t0 = claw.now()
      for i = 1, 20000 do claw.audit.emit("test.flood", { i = i, pad = ("x"):rep(200) }) end
      local st = s:stats()
      print(("done %.3f %d %d"):format(claw.now() - t0, st.written, st.dropped))
      io.stdout:flush()
      claw.sleep(tonumber(os.getenv("WAIT")))
      s:close()
    ]], stdout = "pipe", stderr = "pipe", env = { WAIT = tostring(1 * H.scale) } })
    p.stdout:set_timeout(30 * H.scale)
    local line = assert(p.stdout:read_line())
    local secs, written, dropped = line:match("^done (%S+) (%d+) (%d+)$")
    assert.is_true(tonumber(secs) < 10 * H.scale)
    assert.is_true(tonumber(dropped) > 0)
    assert.are.equal(20000, tonumber(written) + tonumber(dropped))
    local err = p.stderr:read_all()
    assert.matches("clawlua audit: %d+ line%(s%) not shown %(stderr was full%)", err)
    assert.are.equal(0, p:wait().code)
    p:close()
  end)
end)
