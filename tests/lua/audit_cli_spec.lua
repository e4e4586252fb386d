-- `clawlua audit tail`: the last records of audit logs, filtered, and following a live log.
local claw = require "clawlua"
local H = require "helper"
local audit = claw.audit

local dir, path
setup(function()
  dir = H.tmpdir()
  path = dir .. "/cli.jsonl"
  local s = assert(audit.sink { path = path, max_bytes = 0 })
  for i = 1, 30 do
    audit.emit(i % 3 == 0 and "seccomp.kill" or "vm.exec", { sandbox = "vm-" .. (i % 2), pid = 1000 + i, i = i })
  end
  s:close()
end)
teardown(function() H.rm_rf(dir) end)

local function out_lines(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

describe("clawlua audit tail", function()
  it("prints the last 10 records, one readable line each", function()
    local r = H.clawlua { "audit", "tail", path }
    assert.are.equal(0, r.code, r.stderr)
    local lines = out_lines(r.stdout)
    assert.are.equal(10, #lines)
    assert.matches("^%S+Z #%d+ seccomp%.kill %[vm%-0%] pid=1030 i=30$", lines[10])
    assert.is_nil(r.stdout:find("\27", 1, true)) -- no colour when stdout is not a terminal
  end)

  it("filters by kind, sandbox and pid, with -n", function()
    local r = H.clawlua { "audit", "tail", "-n", "3", "--kind", "seccomp", "--vm", "vm-1", path }
    local lines = out_lines(r.stdout)
    assert.are.equal(3, #lines)
    for _, l in ipairs(lines) do assert.matches("seccomp%.kill %[vm%-1%]", l) end
    assert.matches("i=27$", lines[3])
    r = H.clawlua { "audit", "tail", "--pid", "1007", path }
    assert.matches("^%S+ #%d+ vm%.exec %[vm%-1%] pid=1007 i=7\n$", r.stdout)
    r = H.clawlua { "audit", "tail", "--kind=vm.exec", "-n", "100", path }
    assert.are.equal(20, #out_lines(r.stdout))
  end)

  it("prints records as stored with --json", function()
    local r = H.clawlua { "audit", "tail", "-n", "2", "--json", path }
    local lines = out_lines(r.stdout)
    assert.are.equal(2, #lines)
    local ev = claw.json.decode(lines[2])
    assert.are.equal(30, ev.detail.i)
    assert.matches('"hash":"%x+"}$', lines[2])
  end)

  it("exits 2 on usage errors and 1 on unreadable files", function()
    assert.are.equal(2, H.clawlua { "audit", "tail" }.code)
    assert.are.equal(2, H.clawlua { "audit", "tail", "-n", "x", path }.code)
    assert.are.equal(2, H.clawlua { "audit", "tail", "--bogus", path }.code)
    assert.are.equal(2, H.clawlua { "audit", "frobnicate" }.code)
    local r = H.clawlua { "audit", "tail", dir .. "/none.jsonl" }
    assert.are.equal(1, r.code)
    assert.matches("No such file", r.stderr)
    assert.are.equal(0, H.clawlua { "audit", "help" }.code)
    assert.matches("audit", H.clawlua { "help" }.stdout)
  end)

  -- A chained log written by a sink, all but its last record at dir/<name>.jsonl, and a
  -- follower that has read those: the tests below lay out by hand what a rotation leaves for a
  -- moment. Returns the log's lines, the live path and the reader.
  local function follower_at_end(name)
    local src = dir .. "/" .. name .. "-src.jsonl"
    local s = assert(audit.sink { path = src, max_bytes = 0 })
    for n = 1, 3 do audit.emit("test." .. name, { n = n }) end
    s:close()
    local lines = out_lines(H.read_file(src))
    local live = dir .. "/" .. name .. ".jsonl"
    H.write_file(live, table.concat(lines, "\n", 1, #lines - 1) .. "\n")
    local r = assert(audit.reader(live, { follow = true, raw = true }))
    for _ = 1, #lines - 1 do assert.is_string((r:next())) end
    assert.is_nil(r:next())
    return lines, live, r
  end

  it("a follower waits for a new file's first record instead of jumping past the file", function()
    local lines, live, r = follower_at_end("gap")
    -- the old file rotated to .1, the new one made but still empty
    assert(os.rename(live, live .. ".1"))
    H.write_file(live, "")
    -- the empty file may continue the chain: not taken (nor counted as a gap) yet
    assert.is_nil(r:next())
    assert.are.equal(0, r:stats().reopened)
    H.write_file(live, lines[#lines] .. "\n")
    assert.are.equal(lines[#lines], (r:next()))
    local st = r:stats()
    assert.are.equal(1, st.reopened)
    assert.are.equal(0, st.gaps)
    r:close()
  end)

  it("a follower looks past the number a rotation in progress has just vacated", function()
    local lines, live, r = follower_at_end("hole")
    -- mid-shift: ours moved up to .3, the file continuing it already at .2, .1 not there yet,
    -- and a newer file (not of this chain) at the path
    assert(os.rename(live, live .. ".3"))
    H.write_file(live .. ".2", lines[#lines] .. "\n")
    H.write_file(live, lines[1] .. "\n")
    assert.are.equal(lines[#lines], (r:next()))
    assert.are.equal(0, r:stats().gaps)
    r:close()
  end)

  it("follows a live log with -f, across rotations, without blocking", function()
    local live = dir .. "/live.jsonl"
    local s = assert(audit.sink { path = live, max_bytes = 4096, keep = 50 })
    audit.emit("test.live", { n = 0 })
    local p = assert(claw.proc.spawn { H.bin, "audit", "tail", "-f", "-n", "1", "--kind", "test.live", live,
      stdout = "pipe", stderr = "null" })
    p.stdout:set_timeout(10 * H.scale)
    assert.matches("test%.live n=0$", p.stdout:read_line())
    local rotations = s:stats().rotations
    for n = 1, 60 do
      audit.emit("test.live", { n = n, pad = ("r"):rep(150) })
      audit.emit("test.other", { n = n })
    end
    assert.is_true(s:stats().rotations > rotations + 2)
    for n = 1, 60 do
      local l = p.stdout:read_line()
      assert.is_string(l, "tail -f stopped at " .. n)
      assert.matches(("test%%.live n=%d pad="):format(n), l)
    end
    p:kill("INT")
    local st = p:wait(10 * H.scale)
    assert.are.equal(130, st.code)
    p:close()
    s:close()
  end)
end)
