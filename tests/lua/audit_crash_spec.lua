-- labels: slow
-- timeout: 600
-- Killing a process in the middle of writing its audit log leaves a log that reads and
-- verifies up to its last whole record, and the next writer continues the chain.
local claw = require "clawlua"
local H = require "helper"
local U = require "audit_util"
local audit = claw.audit

local dir
setup(function() dir = H.tmpdir() end)
teardown(function() H.rm_rf(dir) end)

-- Emits as fast as it can, records of every size up to 900 KB (hundreds of pages: a write(2)
-- that SIGKILL can cut short), rotating often so some kills land in the middle of a rotation.
local WRITER = [[
  local claw = require "clawlua"
  local audit = claw.audit
  audit.configure { capacity = 64, event_cap = 1 << 20 }
  local s = assert(audit.sink { path = arg[1], max_bytes = 4 << 20, keep = 1000,
                                fsync = arg[2] })
  local pads = {}
  for k = 0, 15 do pads[k] = ("z"):rep(k * 60000) end
  local i = 0
  while true do
    i = i + 1
    audit.emit("test.crash", { i = i, pad = pads[i % 16], sandbox = "vm-" .. (i % 3) })
    if i == 20 then print("ready") io.stdout:flush() end
  end
]]

describe("a JSONL sink killed mid-write", function()
  it("leaves whole records that verify, and the next writer continues the chain", function()
    local path = dir .. "/crash.jsonl"
    H.write_file(dir .. "/writer.lua", WRITER)
    local torn_seen, rounds = 0, 8
    for round = 1, rounds do
      local p = assert(claw.proc.spawn { H.bin, dir .. "/writer.lua", path,
        round % 2 == 0 and "always" or "never", stdout = "pipe" })
      p.stdout:set_timeout(30 * H.scale)
      assert.are.equal("ready", p.stdout:read_line())
      claw.sleep(0.02 + (round % 4) * 0.02)
      p:kill("KILL")
      local st = p:wait()
      assert.are.equal("SIGKILL", st.signal_name)
      p:close()
      -- Readers see whole records only; verify passes up to the last one.
      local files = audit.log_files(path)
      local rep, found = U.verify(files)
      assert.is_true(rep.ok, "round " .. round .. ": " .. found)
      local last = rep.files[#rep.files]
      if last.torn then torn_seen = torn_seen + 1 end
      local r = assert(audit.reader(path))
      local n = 0
      while r:next() do n = n + 1 end
      local rs = r:stats()
      r:close()
      assert.are.equal(0, rs.malformed)
      assert.are.equal(last.records, n)
    end
    -- The next writer cuts any torn tail and continues: the whole set is one chain.
    local s = assert(audit.sink { path = path, max_bytes = 4 << 20, keep = 1000 })
    audit.emit("test.after", {})
    s:close()
    local files = audit.log_files(path)
    local rep, found = U.verify(files)
    assert.is_true(rep.ok, found)
    assert.is_false(rep.files[#rep.files].torn)
    for k = 2, #rep.files do
      assert.is_true(rep.files[k].anchor.checked, files[k] .. " is not linked to the file before it")
    end
    -- Every record of every round is there: seq numbers never go back and the only gaps are
    -- the records that were in flight when a process died.
    local prev, records = nil, 0
    for _, f in ipairs(files) do
      for ev in audit.read_file(f) do
        if prev then assert.is_true(ev.seq > prev, ("seq %d after %d"):format(ev.seq, prev)) end
        prev = ev.seq
        records = records + 1
      end
    end
    assert.is_true(records > rounds * 20)
    print(("\n  %d rounds, %d files, %d records, %d kills left a torn last line"):format(
      rounds, #files, records, torn_seen))
  end)

  -- A SIGKILL lands inside write(2) only now and then; a file size limit cuts a write short
  -- every time: the kernel writes up to the limit, then SIGXFSZ kills the process.
  it("killed by SIGXFSZ after a partial write: the torn line is skipped, then cut", function()
    local path = dir .. "/xfsz.jsonl"
    H.write_file(dir .. "/writer.lua", WRITER)
    local r = assert(claw.proc.run { "prlimit", "--fsize=3000000", H.bin, dir .. "/writer.lua",
      path, "never", timeout = 60 })
    assert.are.equal("SIGXFSZ", r.signal_name)
    local rep, found = U.verify(path)
    assert.is_true(rep.ok, found)
    assert.is_true(rep.files[1].torn)
    assert.are.equal(3000000, #H.read_file(path))
    local s = assert(audit.sink { path = path })
    s:close()
    rep, found = U.verify(path)
    assert.is_true(rep.ok, found)
    assert.is_false(rep.files[1].torn)
    assert.are.equal(rep.files[1].records, #U.lines(path))
  end)

  it("with SIGXFSZ ignored, a short write is undone and counted, never left torn", function()
    local path = dir .. "/efbig.jsonl"
    local r = H.sh(("trap '' XFSZ; exec prlimit --fsize=3000000 '%s' -e %q"):format(H.bin, [[
      local audit = require("clawlua").audit
      audit.configure { capacity = 64, event_cap = 1 << 20 }
      local s = assert(audit.sink { path = "]] .. path .. [[", max_bytes = 0 })
      for i = 1, 40 do audit.emit("test.efbig", { i = i, pad = ("q"):rep(200000) }) end
      local st = s:stats()
      print(st.dropped, st.error)
    ]]))
    local dropped, err = r:match("^(%d+)\t(.-)\n$")
    assert.is_true(tonumber(dropped) > 0)
    assert.are.equal("File too large", err)
    local rep, found = U.verify(path)
    assert.is_true(rep.ok, found)
    assert.is_false(rep.files[1].torn)
  end)
end)
