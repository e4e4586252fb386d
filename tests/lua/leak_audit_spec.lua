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
