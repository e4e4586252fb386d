-- labels: root slow
-- timeout: 900
-- A guest agent that hangs, that answers with garbage, and a VMM that dies mid-exec, each over
-- CLAWLUA_FAULT_CYCLES cycles (default 10; 1000 run locally) against
-- tests/integration/fake-qemu.py (no guest boots; the host side of the channel is what is under
-- test): every call fails clearly or times out when it says, close() is prompt, and nothing is
-- left (child processes, fds, run directories, mounts: vmtest's leak check after every batch).
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"

local cycles = tonumber(os.getenv("CLAWLUA_FAULT_CYCLES")) or 10

describe("vm against a faulty guest agent", function()
  if not H.is_root() then
    pending("vm_agent_faults tests skipped: the VMM's tap and jail need root")
    return
  end
  local dir, kernel, before
  before_each(function()
    before = T.snapshot()
    dir = H.tmpdir()
    kernel = dir .. "/vmlinux"
    H.write_file(kernel, "not a kernel: the fake VMM never reads it")
  end)
  after_each(function()
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  local function fake(mode, seed)
    local vmm = T.fake(mode)
    if seed then
      vmm[#vmm + 1] = "--seed"
      vmm[#vmm + 1] = tostring(seed)
    end
    local v = T.create { backend = "qemu", vmm = vmm, kernel = kernel, jail = false, accel = "tcg",
                         guest = { ready_timeout = 5 * H.scale } }
    assert(v:start())
    return v
  end

  -- close() of a VM whose agent misbehaves: prompt, and the VMM is gone
  local function close(v)
    local t0 = claw.now()
    v:close()
    assert.is_true(claw.now() - t0 < 3 * H.scale, ("close took %.2f s"):format(claw.now() - t0))
    assert.equal("closed", v:state())
  end

  local function report(what, n, t0)
    io.stderr:write(("vm_agent_faults %s: %d cycles in %.1f s\n"):format(what, n, claw.now() - t0))
  end

  it("an agent that hangs: ping times out when it says, a cancelled exec ends, close is prompt", function()
    local t0 = claw.now()
    for _ = 1, cycles do
      local v = fake("hang")
      local t1 = claw.now()
      local rt, msg, code = v:ping(0.2)
      assert.is_nil(rt)
      assert.are.same({ "timeout", "ETIMEDOUT" }, { msg, code })
      assert.is_true(claw.now() - t1 < 0.2 + H.scale, "ping's timeout not honoured")
      local task = claw.spawn(function() return v:exec { "sleep", "100" } end)
      claw.sleep(0.05)
      task:cancel()
      assert.are.same({ nil, "cancelled" }, { task:join(2 * H.scale) })
      close(v)
    end
    report("hang", cycles, t0)
  end)

  it("an agent that hangs: an exec with a timeout fails 10 s after it, naming the agent", function()
    local v = fake("hang")
    local t1 = claw.now()
    local r, err, code = v:exec { "sleep", "100", timeout = 0.2 }
    local took = claw.now() - t1
    assert.is_nil(r)
    assert.matches("exec: no answer from the guest agent 10 s after the command's timeout", err)
    assert.equal("ETIMEDOUT", code)
    assert.is_true(took >= 10 and took < 10.2 + 2 * H.scale, ("took %.2f s"):format(took))
    close(v)
  end)

  it("an agent that answers with garbage: the call fails naming the channel, the VM closes cleanly", function()
    local t0 = claw.now()
    local kinds = {}
    for i = 1, cycles do
      local v = fake("garbage", i)
      local r, err = v:exec { "true", timeout = 5 }
      assert.is_nil(r)
      -- a violation, or a frame cut short by the end of the stream
      local why = err:match("^vm [%w-]+: the guest agent channel closed: (.*)$")
      assert(why, err)
      local kind = why:match("^protocol violation by the guest agent: ([^(%d]+)")
      assert(kind or why == "end of stream from the guest", err)
      kinds[kind or why] = (kinds[kind or why] or 0) + 1
      r, err = v:ping(1)
      assert.is_nil(r)
      assert.matches("channel is closed", err)
      close(v)
    end
    local seen = {}
    for k, n in pairs(kinds) do seen[#seen + 1] = k .. " x" .. n end
    table.sort(seen)
    report("garbage (" .. table.concat(seen, "; ") .. ")", cycles, t0)
  end)

  it("a VMM killed mid-exec: the exec fails clearly, the VM says it died, close cleans up", function()
    local t0 = claw.now()
    for _ = 1, cycles do
      local v = fake("die")
      assert(v:ping(5))
      local r, err = v:exec { "sleep", "100" }
      assert.is_nil(r)
      assert.matches("^vm [%w-]+: the guest agent channel closed: the VMM was killed %(SIGKILL%)$", err)
      assert(H.eventually(function() return v:pid() == nil end, 5), "the dead VMM is still counted")
      assert.equal("exited", v:state())
      close(v)
    end
    report("die", cycles, t0)
  end)
end)
