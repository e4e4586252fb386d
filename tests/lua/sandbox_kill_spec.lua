-- labels: root netns nolauncher slow
-- timeout: 1200
-- kill -9 of a runtime mid-create and mid-exec of a sandbox with a network, then `clawlua
-- cleanup`: the namespace the runtime ran in (a test namespace: `ip netns exec`, as in
-- sandbox_net_spec) has the same links, addresses, routes and nft ruleset as before, `ip netns
-- list` is the same, and no cgroup, mount, process or state dir of the runtime is left.
local H = require "helper"
local K = require "sbkill"
local N = require "netns"

local available, why = N.available()
local W = require "sbnet"

describe("kill -9 mid-create and mid-exec, then clawlua cleanup", function()
  if not available then
    pending("sandbox_kill tests skipped: " .. why)
    return
  end
  local w, base, k
  setup(function()
    w = W.make()
    base = H.tmpdir("sbkill")
    k = K.new(w, base)
  end)
  teardown(function()
    if w then W.destroy(w) end
    H.rm_rf(base)
    assert.are.same({}, N.leftovers(W.prefix))
  end)

  local policies = H.src .. "/examples/policies/"
  local resolvers = { "203.0.113.53" }

  it("mid-create (the network half made), under examples/policies/pip-install.lua", function()
    k.check({ id = "sbkill-c", policy = policies .. "pip-install.lua", resolvers = resolvers, hang_at = "fw" },
      { "netns", "link", "addr", "fw" })
  end)

  it("mid-exec (a command running in the sandbox's network), under examples/policies/ci-runner.lua", function()
    local lines = k.check({ id = "sbkill-e", policy = policies .. "ci-runner.lua", resolvers = resolvers },
      { "netns", "link", "addr", "fw" })
    assert.equal("true\n", W.find(lines, "exec").stdout) -- the policy's env
  end)

  it("at every step of create and a first exec (the runtime SIGKILLs itself), then cleanup", function()
    local n, cycles, names, seconds = k.steps { id = "sbkill-s", policy = policies .. "ci-runner.lua",
                                                resolvers = resolvers }
    assert.is_true(n > 20, "only " .. n .. " steps")
    io.stderr:write(("sandbox_kill: %d steps, %d kills in %.1f s; steps: %s\n")
      :format(n, cycles, seconds, table.concat(names, " | ")))
  end)
end)
