-- labels: vm root slow
-- timeout: 900
-- The examples run as a user runs them (scripts/run's main job among them), and say what they
-- should: a broken example is a broken promise in the README.
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"

describe("the examples", function()
  it("foundation.lua fetches, runs and checksums for real", function()
    local r = H.clawlua({ H.src .. "/examples/foundation.lua" }, { timeout = 120 })
    assert.are.equal(0, r.code, r.stderr)
    local out = assert(claw.json.decode(r.stdout))
    assert.are.equal(8, out.documents)
    assert.are.equal(36, out.tools)
    assert.matches("^%x+$", out.sha256)
  end)

  it("sandbox.lua drives a VM, its firewall, seccomp and the audit, and leaves nothing", function()
    -- The example is a child process either way: once is enough, and two at once would share
    -- its fixed table and NFLOG group, as two copies of any operator's script would.
    local skip = (H.stock and "runs in the host's run of this spec") or T.no_qemu()
      or (not T.is_root() and "taps and nftables need root") or nil
    if skip then return pending(skip) end
    local before = T.snapshot()
    local tables = H.sh("nft list tables")
    local r = H.clawlua({ H.src .. "/examples/sandbox.lua" },
                        { timeout = 900, cwd = H.src, env = { PATH = os.getenv("PATH"), CLAWLUA_BUILD = T.build } })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    for _, want in ipairs {
      "guest agent ready after", "guest: Linux ", "stdin %-> UNTRUSTED WORK\\n, exit code 3",
      "timed_out=true%), the VM lives: still here", "round%-tripped: identical; guest sha256 matches host",
      "seccomp: inet socket refused: Operation not permitted; unix socket made",
      "shutdown: graceful=true", "fw%.attach×1", "vm%.ready×1", "audit chain verified: intact" } do
      assert.matches(want, r.stdout)
    end
    T.assert_clean(before)
    assert.are.equal(tables, H.sh("nft list tables"))
    assert.are.equal("", H.sh("ls /tmp | grep clawlua-sandbox || true"))
  end)
end)
