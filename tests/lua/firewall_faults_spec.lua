-- labels: root netns slow
-- timeout: 900
-- Netlink faults of clawlua.firewall, provoked for real in a test namespace
-- (tests/integration/fw_faults_child.lua): ENOBUFS (a refused batch whose error replies
-- overflow a receive buffer shrunk through the CLAWLUA_TEST_FW_RCVBUF seam) and EBUSY (a rule
-- of someone else jumping to a VM's chain). The operation fails naming the object and the
-- errno, the ruleset and the handle's view are unchanged (atomic), the same call succeeds once
-- the cause is gone, and the fds are flat. CLAWLUA_FAULT_CYCLES cycles each (default 20).
local json = require "clawlua.json"
local H = require "helper"
local N = require "netns"

local available, why = N.available()
local cycles = tonumber(os.getenv("CLAWLUA_FAULT_CYCLES")) or 20

describe("firewall under netlink faults", function()
  if not available then
    pending("firewall_faults tests skipped: " .. why)
    return
  end
  local ns = N.prefix .. "ff"
  setup(function() H.sh("ip netns add " .. ns) end)
  teardown(function()
    H.sh("ip netns del " .. ns, { may_fail = true })
    assert.are.same({}, N.leftovers())
  end)

  local function child(mode, env)
    local r = H.clawlua({ H.src .. "/tests/integration/fw_faults_child.lua", ns, mode, tostring(cycles) },
      { env = env, timeout = 600 })
    assert.equal(0, r.code, r.stderr)
    local res = json.decode(r.stdout)
    assert.equal(cycles, res.cycles)
    assert.equal(res.fds_before, res.fds_after, "fds leaked")
    assert.equal("", H.sh("ip netns exec " .. ns .. " nft list ruleset"), "the ruleset is not empty after")
    io.stderr:write(("firewall_faults %s: %d cycles in %.1f s: %s\n")
      :format(mode, res.cycles, res.seconds, table.concat(res.errors, " | ")))
    return res
  end

  it("ENOBUFS: a refused batch whose replies overflow fails naming the first refusal, changing nothing", function()
    local res = child("enobufs", { CLAWLUA_TEST_FW_RCVBUF = "1" })
    assert.is_true(res.chains >= 80)
    assert.are.same({ "firewall: attach_many: chain '<chain> of vm 'x<n>': File exists" }, res.errors)
  end)

  it("EBUSY: a detach refused because of someone else's rule changes nothing, and succeeds after", function()
    local res = child("ebusy")
    assert.are.same({ "firewall: detach 'busy': chain '<chain> of vm 'busy': Device or resource busy" }, res.errors)
  end)
end)
