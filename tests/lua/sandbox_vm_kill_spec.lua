-- labels: root netns vm nolauncher slow
-- timeout: 900
-- kill -9 of a runtime at every step of creating a VM sandbox (backend "vm": a real QEMU guest,
-- TCG here) with a network, and of its first exec, then `clawlua cleanup`: as sandbox_kill_spec
-- for the jail (tests/lua/sbkill.lua), plus what a VM can leave: its VMM (by the run dir in its
-- command line, by the runtime's process group, by the runtime's cgroups), its tap (a link of the
-- namespace the runtime ran in), its run dir, its pool VMs. The guest kernel is the minimal one when
-- scripts/guest-kernel built it into build/guest. Two paths, each step by step: a cold boot
-- snapshotted as the template (vm.start = "auto", an empty template dir per run: a snapshot in
-- the making is left too), then a restore from a template (the test's own template dir); and a
-- runtime with a warm pool killed mid-exec.
-- CLAWLUA_FAULT_ROUNDS rounds (default 1).
local H = require "helper"
local K = require "sbkill"
local N = require "netns"
local T = require "vmtest"
local W = require "sbnet"

local available, why = N.available()
if available and T.no_qemu() then available, why = false, T.no_qemu() end

-- Where the runtime makes its VMs' run dirs: /run/clawlua as root (clawlua.sandbox.vm), under
-- $XDG_RUNTIME_DIR for vm.create without a run_dir (runtime/vm/host.c).
local function run_bases()
  local x = os.getenv("XDG_RUNTIME_DIR")
  if x and x ~= "" then return { "/run/clawlua", x .. "/clawlua" } end
  return { "/run/clawlua" }
end

describe("kill -9 at every step of a VM sandbox's create and first exec, then clawlua cleanup", function()
  if not available then
    pending("sandbox_vm_kill tests skipped: " .. why)
    return
  end
  -- sandbox ids vmk<pid>-<test>, the VM's too: its run dir is <run base>/<id>.XXXXXX
  local id = "vmk" .. N.pid .. "-"
  local w, base, k
  setup(function()
    local files = assert(T.image_files())
    w = W.make()
    base = H.tmpdir("sbvmkill")
    k = K.new(w, base, {
      -- the image the tests build, with scripts/guest-kernel's minimal kernel when it is there
      env = { CLAWLUA_GUEST_DIR = files.kernel:match("^(.*)/[^/]+$") },
      extra = function(pid)
        local function sh(c) return (H.sh(c, { may_fail = true })) end
        -- a template snapshot in the making (.tmp-*) is the runtime's too
        local s = { rundirs = "", vmms = "",
                    templates = sh("ls -d " .. base .. "/fresh/*/.tmp-* 2>/dev/null || true") }
        -- and the killed runtime's pool VMs (ids pool-<its pid>-<hex>); before a runtime was
        -- started, none (a "pool-0-" pattern matched the other run's `ls -d .../pool-0-*` shell,
        -- taken for a VMM)
        local prefixes = { id }
        if pid then prefixes[2] = ("pool-%d-"):format(pid) end
        for _, prefix in ipairs(prefixes) do
          for _, b in ipairs(run_bases()) do
            s.rundirs = s.rundirs .. sh("ls -d " .. b .. "/" .. prefix .. "* 2>/dev/null || true")
            -- ([/]: not the shell running pgrep, whose command line holds the pattern)
            s.vmms = s.vmms .. sh("pgrep -f '[/]" .. b:sub(2) .. "/" .. prefix .. "' || true")
          end
        end
        return s
      end,
    })
  end)
  teardown(function()
    if w then W.destroy(w) end
    if base then H.rm_rf(base) end
    assert.are.same({}, N.leftovers(W.prefix))
  end)

  local vm_policy = {
    backend = "vm",
    resources = { vcpus = 1, memory_mib = 128 },
    vm = { start = "cold" }, -- the mid-exec test's
    network = { egress = "deny", allow = { "allowed.test:80" }, resolvers = { "203.0.113.53" } },
    env = { CI = "true" },
  }

  it("mid-exec (a command running in the guest), the VMM and its tap left, then cleanup", function()
    local lines = k.check({ id = id .. "e", policy = vm_policy }, { "addr", "nft", "fw" })
    assert.equal("true\n", W.find(lines, "exec").stdout) -- the policy's env, in the guest
    assert.equal("vm", W.find(lines, "running").info.backend)
  end)

  it("at every step of create and a first exec (the runtime SIGKILLs itself), then cleanup", function()
    -- booted cold and snapshotted as a template (vm.start = "auto"), in a template dir of each
    -- run's own
    local p = {}
    for key, v in pairs(vm_policy) do p[key] = v end
    p.vm = { start = "auto" }
    local n, cycles, names, seconds = k.steps { id = id .. "s", policy = p, template_dir = base .. "/fresh",
                                                fresh_templates = true }
    assert.is_true(n > 20, "only " .. n .. " steps")
    local seen = table.concat(names, " | ")
    for _, step in ipairs { "vm.create", "vm:start", "vm:snapshot", "vm:exec", "record vmm_pid", "record run_dir" } do
      assert.is_truthy(seen:find(step, 1, true), "no step " .. step .. " in " .. seen)
    end
    io.stderr:write(("sandbox_vm_kill: %d steps, %d kills in %.1f s; steps: %s\n")
      :format(n, cycles, seconds, seen))
  end)

  it("at every step of create and a first exec from a template snapshot (vm.start = \"auto\")", function()
    local p = {}
    for key, v in pairs(vm_policy) do p[key] = v end
    p.vm = { start = "auto" }
    local plan = { id = id .. "t", policy = p, template_dir = base .. "/templates" }
    -- a first sandbox boots cold and leaves its VM's snapshot as the template; the steps restore it
    plan.kill_at = 0
    k.child(plan)
    assert.is_truthy(H.sh("ls " .. base .. "/templates/*/vm.json"))
    local n, cycles, names, seconds = k.steps(plan)
    local seen = table.concat(names, " | ")
    assert.is_truthy(seen:find("vm.restore", 1, true), "no step vm.restore in " .. seen)
    assert.is_nil(seen:find("vm.create", 1, true), "a cold boot in " .. seen)
    io.stderr:write(("sandbox_vm_kill (template): %d steps, %d kills in %.1f s\n"):format(n, cycles, seconds))
  end)

  it("with a warm pool: a sandbox taken from it and a VM booted behind it, killed mid-exec, then cleanup", function()
    local p = {}
    for key, v in pairs(vm_policy) do p[key] = v end
    p.vm = { start = "auto" }
    -- the template the test before left: the pool restores from it
    local lines = k.check({ id = id .. "p", policy = p, template_dir = base .. "/templates", prewarm = 1 },
      { "addr", "nft", "fw" })
    local pool = W.find(lines, "pool")
    assert.equal("pool", pool.from)
    -- the VM booted behind it has a state record of its own, written down before it was made
    assert.equal(1, #pool.records, table.concat(pool.records, " "))
    assert.matches("^pool%-%d+%-%x+$", pool.records[1])
  end)
end)
