-- labels: root
-- scripts/leak-audit (the suite's last check) really sees every kind of object it claims to
-- cover: its self-test leaves a named netns, a veth link, an address, an nft table, a
-- clawlua-* cgroup, a mount, a process named like a test helper, a process in that cgroup and
-- a file in the state dir, expects diff to name each and fail, then removes them.
local claw = require "clawlua"
local H = require "helper"

describe("scripts/leak-audit", function()
  local script = H.src .. "/scripts/leak-audit"

  it("refuses unknown commands and a missing FILE with usage", function()
    claw.run(function()
      local r = claw.proc.run { script, "nonsense" }
      assert.are.equal(2, r.code)
      assert.truthy(r.stderr:find("usage: scripts/leak-audit", 1, true), r.stderr)
      r = claw.proc.run { script, "diff" }
      assert.are.equal(2, r.code)
    end)
  end)

  it("takes the state dir's own layout, made by a first run on a fresh host, for no leak", function()
    local dir = H.tmpdir("leak-audit")
    local before = dir .. "/before"
    local base = dir .. "/state"
    claw.run(function()
      local function audit(cmd)
        return claw.proc.run { script, cmd, before, env = { CLAWLUA_STATE_DIR = base }, timeout = 120 }
      end
      assert.are.equal(0, audit("save").code)
      -- what any run makes and keeps: sandboxes/ and net/ with the subnet table, the jail's /bin
      H.sh(("mkdir -p %s/sandboxes %s/net %s/bin-busybox-1982256 && touch %s/net/subnets %s/net/subnets.lock"
        .. " %s/bin-busybox-1982256/sh"):format(base, base, base, base, base, base))
      -- (only lines of this state dir count: the host's other objects change as other tests run)
      local r = audit("diff")
      assert.falsy(r.stdout:find("file " .. base, 1, true), r.stdout .. r.stderr)
      -- what a run leaves: a sandbox's record, a half-made /bin, a subnet table being rewritten
      H.sh(("mkdir -p %s/sandboxes/sb1 %s/bin-busybox-1982256.new.42 && touch %s/net/subnets.42"):format(base,
        base, base))
      r = audit("diff")
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      for _, f in ipairs { "sandboxes/sb1", "bin-busybox-1982256.new.42", "net/subnets.42" } do
        assert.truthy(r.stdout:find("file " .. base .. "/" .. f .. "\n", 1, true), r.stdout)
      end
      assert.falsy(r.stdout:find("/sh\n", 1, true), r.stdout)
    end)
    H.rm_rf(dir)
  end)

  it("reports an object of every kind left on the host, and nothing after its clean-up", function()
    if not H.is_root() then
      print("SKIP leak_audit_spec: the self-test makes kernel objects, which needs root")
      return
    end
    claw.run(function()
      local r = claw.proc.run { script, "self-test", timeout = 120 }
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      for _, kind in ipairs { "netns", "link", "addr", "nft", "cgroup", "mount", "proc", "file" } do
        assert.truthy(r.stdout:find("detected: " .. kind .. " ", 1, true), kind .. " not detected:\n" .. r.stdout)
      end
      assert.falsy(r.stdout:find("MISSED", 1, true), r.stdout)
      assert.truthy(r.stdout:find("self-test passed", 1, true), r.stdout)
    end)
  end)
end)
