-- labels: vm root slow
-- timeout: 900
-- The examples run as a user runs them (scripts/run's main job among them), and say what they
-- should, and leave nothing behind: a broken example is a broken promise in the README.
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

  -- The examples are child processes either way: once is enough.
  local skip = (H.stock and "runs in the host's run of this spec") or T.no_qemu()
    or (not T.is_root() and "namespaces, taps and nftables need root") or nil

  --- What an example could leave in the host: namespaces (their links, addresses, routes and
  --- nft tables go with them), links and tables in this one, temp dirs, servers, state dirs.
  --- (Only what the examples name: other tests may make and remove their own meanwhile.)
  local function host_state()
    return {
      netns = H.sh("ip netns list | grep cldemo || true"),
      links = H.sh("ip -o link show | grep -E 'cldemo|up0' || true"),
      tables = H.sh("nft list tables | grep -E 'clawlua_example|cldemo' || true"),
      tmp = H.sh("ls /tmp | grep clawlua-sandbox || true"),
      procs = H.sh("pgrep -af 'clawlua-sandbox\\.' || true"),
      state = H.sh("ls /run/clawlua/sandboxes 2>/dev/null | grep -x demo || true"),
    }
  end

  local function run_example(name)
    local before, host = T.snapshot(), host_state()
    local r = H.clawlua({ H.src .. "/examples/" .. name },
                        { timeout = 900, cwd = H.src, env = { PATH = os.getenv("PATH"), CLAWLUA_BUILD = T.build } })
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    T.assert_clean(before)
    assert.are.same(host, host_state())
    return r.stdout
  end

  it("sandbox.lua: a policy's guest reaches the allowed name only, and the audit says so", function()
    if skip then return pending(skip) end
    local out = run_example("sandbox.lua")
    for _, want in ipairs {
      "sandbox demo from policy demo%-egress: vm backend %(qemu, %a+%)",
      "wget http://allowed%.example/ +%-> exit 0: hello from allowed%.example\n",
      "wget http://blocked%.example/ +%-> exit 1: wget: bad address 'blocked%.example'",
      "wget http://203%.0%.113%.11/ %(direct%) %-> no answer %(timed out%)",
      "wget http://169%.254%.169%.254/ +%-> no answer %(timed out%)",
      "allowed  DNS A    allowed%.example %-> 203%.0%.113%.10 %(pinned into the firewall%)",
      "denied   DNS A    blocked%.example: NXDOMAIN, not forwarded",
      "dropped  tcp 10%.[%d.]+ %-> 203%.0%.113%.11:80 %(rule egress%.policy%)",
      "dropped  tcp 10%.[%d.]+ %-> 169%.254%.169%.254:80 %(rule egress%.metadata%)",
      "audit chain verified: intact",
      "upstream DNS server saw: allowed%.example [1-9]%d* time%(s%), blocked%.example 0 time%(s%)" } do
      assert.matches(want, out)
    end
  end)

  it("primitives.lua drives a VM, its firewall, seccomp and the audit, and leaves nothing", function()
    -- its firewall table and NFLOG group are fixed, as in any operator's script
    if skip then return pending(skip) end
    local out = run_example("primitives.lua")
    for _, want in ipairs {
      "guest agent ready after", "guest: Linux ", "stdin %-> UNTRUSTED WORK\\n, exit code 3",
      "timed_out=true%), the VM lives: still here", "round%-tripped: identical; guest sha256 matches host",
      "seccomp: inet socket refused: Operation not permitted; unix socket made",
      "shutdown: graceful=true", "fw%.attach×1", "vm%.ready×1", "audit chain verified: intact" } do
      assert.matches(want, out)
    end
  end)
end)
