-- labels: vm root slow
-- timeout: 1200
-- A real QEMU guest (TCG here) whose VMM is SIGKILLed while a command runs in it, through
-- clawlua.sandbox (backend "vm"): the exec returns a clear error naming the kill, the sandbox
-- says its VM is dead, destroy removes everything (VMM, tap, run dir, state dir, cgroups, fds).
-- CLAWLUA_FAULT_VM_CYCLES cycles (default 3; each boots a guest: restored from a template
-- after the first).
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"

local skip = T.no_qemu() or (not T.is_root() and "taps and /run/clawlua need root") or nil
if not skip then
  local files, err = T.image_files()
  skip = not files and err or nil
end

local cycles = tonumber(os.getenv("CLAWLUA_FAULT_VM_CYCLES")) or 3

describe("SIGKILL of a sandbox's VMM mid-exec", function()
  if skip then
    pending(skip)
    return
  end
  local sandbox = require "clawlua.sandbox"
  local policy = require "clawlua.policy"
  local state = require "clawlua.sandbox.state"
  local B = require "clawlua.sandbox.vm"
  local base, before
  setup(function()
    base = H.tmpdir("vmkill")
    state.set_base(base)
    B.configure { template_dir = base .. "/templates" }
    before = T.snapshot()
  end)
  teardown(function()
    B.drain()
    B.configure {}
    state.set_base(nil)
    T.assert_clean(before)
    H.rm_rf(base)
  end)

  it(("fails the exec, says the VM died, and destroy cleans up (%d cycles)"):format(cycles), function()
    local p = assert(policy.from_table({ backend = "vm", resources = { vcpus = 1, memory_mib = 128 } }, "vmkill"))
    local t0 = claw.now()
    for i = 1, cycles do
      local sb = assert(sandbox.create(p, { id = "vmkill-" .. i }))
      local vi = sb:info().backend_info.vm
      T.tracked[#T.tracked + 1] = { id = vi.id, tap = vi.tap, rundir = vi.rundir, pid = vi.pid }
      local cgroups = H.cgroups_of(state.self())
      assert.are_not.same({}, cgroups, "the VMM has no cgroup")
      local started = claw.event()
      local task = claw.spawn(function()
        return sb:exec { "sh", "-c", "echo started; exec sleep 100", on_stdout = function() started:set() end }
      end)
      assert(started:wait(60 * H.scale), "the command did not start")
      H.sh("kill -KILL " .. vi.pid)
      local r, err = task:join(10 * H.scale)
      assert.is_nil(r)
      assert.matches("the guest agent channel closed: the VMM was killed %(SIGKILL%)", err)
      -- the VMM's exit reaches the vm on the loop's next turn after the channel's end
      assert(H.eventually(function() return sb:info().state == "dead" end, 2), sb:info().state)
      r, err = sb:exec { "true" }
      assert.is_nil(r)
      assert.matches("channel is closed", err)
      assert.is_true(sb:destroy())
      assert.equal("destroyed", sb:info().state)
      -- nothing of the sandbox is left: its state dir, the VMM's cgroups, its run dir and tap
      assert.equal("", H.sh("ls -A " .. base .. "/sandboxes | grep -v '^\\.spare' || true"))
      for _, cg in ipairs(cgroups) do
        assert(H.eventually(function() return #H.sh("ls -d " .. cg .. "* 2>/dev/null || true") == 0 end, 5),
          "cgroup left: " .. cg)
      end
      assert.is_nil(io.open(vi.rundir), "run dir left: " .. vi.rundir)
    end
    io.stderr:write(("vm_kill: %d cycles in %.1f s\n"):format(cycles, claw.now() - t0))
  end)
end)
