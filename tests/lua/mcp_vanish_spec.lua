-- labels: root nolauncher slow
-- timeout: 900
-- An MCP client that vanishes with a long sandbox_exec in flight: it closes the server's stdin,
-- or stdin and stdout, or is SIGKILLed (tests/integration/mcp_vanish_client.lua). Each time
-- `clawlua mcp` exits within 2 s, destroying its sandbox: no state dir, cgroup or command of it
-- left, and the test's own fds as before. CLAWLUA_FAULT_CYCLES cycles per way (default 5).
local claw = require "clawlua"
local json = require "clawlua.json"
local H = require "helper"

describe("clawlua mcp when its client vanishes mid-call", function()
  if not H.is_root() then
    pending("mcp_vanish tests skipped: jail sandboxes need root")
    return
  end
  local base
  local cycles = tonumber(os.getenv("CLAWLUA_FAULT_CYCLES")) or 5
  -- a command of this run's own (the host and stock runs of the spec run side by side)
  local SLEEP = require("netns").own_sleep(97)
  setup(function() base = H.tmpdir("mcpvanish") end)
  teardown(function() H.rm_rf(base) end)

  local function sh(c) return (H.sh(c, { may_fail = true })) end
  local function leftovers(pid)
    return {
      sandboxes = sh("ls -A " .. base .. "/sandboxes 2>/dev/null || true"),
      cgroups = table.concat(H.cgroups_of(pid), "\n"),
      command = sh("pgrep -f '^sleep " .. SLEEP .. "$' || true"),
      server = sh("ps -o stat= -p " .. pid .. " | grep -v '^Z' || true"),
    }
  end
  local nothing = { sandboxes = "", cgroups = "", command = "", server = "" }

  local function client(mode)
    return assert(claw.proc.spawn { H.bin, H.src .. "/tests/integration/mcp_vanish_client.lua", H.bin,
                                    mode, SLEEP, stdout = "pipe", stderr = "pipe",
                                    env = { CLAWLUA_STATE_DIR = base } })
  end

  local function cycle(mode)
    local c = client(mode)
    c.stdout:set_timeout(60)
    local line = c.stdout:read_line()
    local m = line and json.decode(line)
    if not m then error("the client stopped: " .. (c.stderr:read_all() or "")) end
    local pid, after
    if mode == "kill" then
      assert.equal("ready", m.op)
      pid = m.pid
      local t0 = claw.now()
      c:kill("KILL") -- the client only: the server leads a process group of its own
      -- exited: gone, or a zombie its new parent (pid 1 of this container) has not reaped yet
      local function gone()
        local st = H.sh("cat /proc/" .. pid .. "/stat 2>/dev/null || true")
        return st == "" or st:match("^%d+ %b() Z") ~= nil
      end
      assert(H.eventually(gone, 5),
        "clawlua mcp still runs 5 s after its client was killed")
      after = claw.now() - t0
    else
      assert.equal("exit", m.op, line)
      assert.equal(0, m.status.code, line)
      pid, after = m.status.pid, m.after
    end
    assert.is_true(after < 2 * H.scale, ("%s: exited %.2f s after its client vanished"):format(mode, after))
    c.stdout:read_all()
    c.stderr:read_all()
    c:wait(10)
    c:close()
    assert.are.same(nothing, leftovers(pid))
    return after
  end

  for _, mode in ipairs { "eof", "close", "kill" } do
    it(("exits within 2 s and destroys its sandbox: client %s, %d cycles"):format(mode, cycles), function()
      claw.run(function()
        cycle(mode) -- warm-up: what the first cycle opens for good (the loop's own) is not a leak
        H.settle()
        local fds = H.fds()
        local t0, worst = claw.now(), 0
        for _ = 1, cycles do worst = math.max(worst, cycle(mode)) end
        H.settle()
        assert.are.same(fds, H.fds())
        io.stderr:write(("mcp_vanish %s: %d cycles in %.1f s, slowest exit %.2f s\n")
          :format(mode, cycles, claw.now() - t0, worst))
      end)
    end)
  end
end)
