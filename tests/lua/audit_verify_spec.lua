-- Tamper evidence: audit.verify and `clawlua audit verify` find each kind of tampering and say
-- which record (line and seq).
local claw = require "clawlua"
local H = require "helper"
local U = require "audit_util"
local audit = claw.audit

local dir, orig
local function copy() local t = {} for i, l in ipairs(orig) do t[i] = l end return t end
local function seq_of(line) return tonumber(line:match('"seq":(%d+)')) end

setup(function()
  dir = H.tmpdir()
  orig = U.make_log(dir .. "/orig.jsonl", 30)
end)
teardown(function() H.rm_rf(dir) end)

--- Writes lines to a file and verifies it; returns the one file's result and "kind@line ...".
local function check(lines, tail)
  local path = dir .. "/t.jsonl"
  U.write_lines(path, lines, tail)
  local rep, found = U.verify(path)
  return rep.files[1], found, rep
end

describe("audit.verify", function()
  it("passes an intact log, naming its range and head", function()
    local f, found, rep = check(copy())
    assert.is_true(rep.ok, found)
    assert.are.equal(31, f.records)
    assert.are.equal(seq_of(orig[1]), f.first_seq)
    assert.are.equal(seq_of(orig[31]), f.last_seq)
    assert.are.equal(orig[31]:match('"hash":"(%x+)"'), f.last_hash)
    assert.is_true(f.anchor.present and f.anchor.genesis)
  end)

  it("finds a modified record", function()
    local t = copy()
    t[10] = t[10]:gsub('"i":9', '"i":90')
    local f, found = check(t)
    assert.is_false(f.ok)
    assert.are.equal("modified@10", found)
    assert.are.equal(seq_of(orig[10]), f.issues[1].seq)
    assert.matches("does not match its hash", f.issues[1].message)
  end)

  it("finds a modified record whose hash was recomputed", function()
    local t = copy()
    local body = t[10]:match('^(.*),"prev":"%x+","hash":"%x+"}$'):gsub('"i":9', '"i":90') .. "}"
    t[10] = U.forge(t[9], body)
    local f, found = check(t)
    assert.is_false(f.ok)
    assert.are.equal("modified@10", found)
    assert.matches("recomputed", f.issues[1].message)
  end)

  it("finds a deleted record and the seq that is gone", function()
    local t = copy()
    table.remove(t, 12)
    local f, found = check(t)
    assert.is_false(f.ok)
    assert.are.equal("deleted@12", found)
    assert.are.equal(seq_of(orig[13]), f.issues[1].seq)
    assert.matches(("seq %d is not in the file"):format(seq_of(orig[12])), f.issues[1].message)
  end)

  it("finds records deleted from the start of a file", function()
    local t = copy()
    table.remove(t, 1)
    table.remove(t, 1)
    local _, found = check(t)
    assert.are.equal("deleted@1", found)
  end)

  it("finds an inserted record: a forged one chained in", function()
    local t = copy()
    table.insert(t, 16, U.forge(t[15], '{"detail":{"i":999},"kind":"test.log","seq":99999,"time":1.0}'))
    local f, found = check(t)
    assert.is_false(f.ok)
    assert.are.equal("inserted@16", found)
    assert.are.equal(99999, f.issues[1].seq)
  end)

  it("finds an inserted record: a copy of another line", function()
    local t = copy()
    table.insert(t, 20, t[5])
    local f, found = check(t)
    assert.are.equal("inserted@20", found)
    assert.matches("a copy of line 5", f.issues[1].message)
  end)

  it("finds an inserted record: a line that is not a record", function()
    local t = copy()
    table.insert(t, 7, '{"kind":"vm.start","seq":5}')
    local _, found = check(t)
    assert.are.equal("malformed@7", found)
  end)

  it("finds reordered records: two swapped", function()
    local t = copy()
    t[8], t[9] = t[9], t[8]
    local f, found = check(t)
    assert.is_false(f.ok)
    assert.are.equal("reordered@9", found)
    assert.are.equal(seq_of(orig[8]), f.issues[1].seq)
    assert.matches("belongs before line 8", f.issues[1].message)
  end)

  it("finds reordered records: one moved far down", function()
    local t = copy()
    table.insert(t, 25, table.remove(t, 6))
    local f, found = check(t)
    assert.are.equal("reordered@25", found)
    assert.are.equal(seq_of(orig[6]), f.issues[1].seq)
  end)

  it("finds reordered records: one moved up", function()
    local t = copy()
    table.insert(t, 4, table.remove(t, 20))
    local f, found = check(t)
    assert.are.equal("reordered@4", found)
    assert.are.equal(seq_of(orig[20]), f.issues[1].seq)
    assert.matches("belongs after line 20", f.issues[1].message)
  end)

  it("reports several tamperings in one file, in line order", function()
    local t = copy()
    t[3] = t[3]:gsub('"i":2', '"i":20')
    table.remove(t, 10)
    t[20], t[21] = t[21], t[20]
    local _, found = check(t)
    assert.are.equal("modified@3 deleted@10 reordered@21", found)
  end)

  it("accepts a torn last line (a crash mid-write) and verifies up to the record before it", function()
    local f, found, rep = check(copy(), orig[31]:sub(1, 77))
    assert.is_true(rep.ok, found)
    assert.is_true(f.torn)
    assert.are.equal(77, f.torn_bytes)
    assert.are.equal(31, f.records)
  end)

  it("rejects lines that are not records, and garbage bytes, without failing", function()
    local _, found = check({ "\0\1\2\255", "[1,2,3]", "{", ('{"a":'):rep(5000) })
    assert.are.equal("malformed@1 malformed@2 malformed@3 malformed@4", found)
    local long = { orig[1], ('{"detail":"' .. ("x"):rep(3 << 20) .. '"}') }
    local _, found2 = check(long)
    assert.are.equal("malformed@2", found2)
    local _, found3, rep3 = check({})
    assert.are.equal("", found3)
    assert.is_true(rep3.ok)
  end)

  it("reports a file it cannot read as not ok", function()
    local rep = audit.verify(dir .. "/none.jsonl")
    assert.is_false(rep.ok)
    assert.matches("No such file", rep.files[1].error)
  end)

  it("verifies a large file in bounded steps, letting the loop run", function()
    local path = dir .. "/big.jsonl"
    local s = assert(audit.sink { path = path, max_bytes = 0 })
    for i = 1, 60000 do audit.emit("test.big", { i = i }) end
    s:close()
    local ticks = 0
    local t = claw.spawn(function() while true do ticks = ticks + 1 claw.sleep(0) end end)
    local rep = claw.run(function() return audit.verify(path) end)
    t:cancel()
    assert.is_true(rep.ok)
    assert.are.equal(60001, rep.files[1].records)
    assert.is_true(ticks >= 2, "the loop did not run while verifying")
  end)
end)

describe("clawlua audit verify", function()
  it("exits 0 for intact logs, 1 with what and where for tampered ones, 2 for usage", function()
    local good = dir .. "/good.jsonl"
    U.write_lines(good, orig)
    local r = H.clawlua { "audit", "verify", good }
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("good%.jsonl: OK %(31 records, seq %d+%.%.%d+, head %x+%)", r.stdout)
    local bad = dir .. "/bad.jsonl"
    local t = copy()
    table.remove(t, 12)
    U.write_lines(bad, t)
    r = H.clawlua { "audit", "verify", good, bad }
    assert.are.equal(1, r.code)
    assert.matches("bad%.jsonl: TAMPERED %(1 problem%)", r.stdout)
    assert.matches(("line 12 %%(seq %d%%): deleted: records missing before this line"):format(seq_of(orig[13])),
      r.stdout)
    r = H.clawlua { "audit", "verify" }
    assert.are.equal(2, r.code)
    r = H.clawlua { "audit", "verify", "--bogus", good }
    assert.are.equal(2, r.code)
    r = H.clawlua { "audit", "verify", dir .. "/none.jsonl" }
    assert.are.equal(1, r.code)
    assert.matches("cannot verify", r.stdout)
  end)

  it("checks a rotated set as one chain, in any order", function()
    local path = dir .. "/set.jsonl"
    local s = assert(audit.sink { path = path, max_bytes = 4096, keep = 4 })
    for i = 1, 150 do audit.emit("test.set", { i = i, pad = ("s"):rep(80) }) end
    s:close()
    local files = audit.log_files(path)
    assert.are.equal(5, #files)
    local r = H.clawlua { "audit", "verify", files[5], files[2], files[4], files[1], files[3] }
    assert.are.equal(0, r.code, r.stdout)
    -- A record deleted at the end of an older file shows in the next file's anchor.
    local t = U.lines(files[3])
    table.remove(t)
    U.write_lines(files[3], t)
    r = H.clawlua { "audit", "verify", table.unpack(files) }
    assert.are.equal(1, r.code)
    assert.matches(files[4]:gsub("%p", "%%%0") .. ": TAMPERED.-line 1 %(seq %d+%): anchor: the file does not continue",
      r.stdout)
  end)
end)
