-- labels: root netns vm slow
-- timeout: 900
-- clawlua.sandbox.net with a real QEMU guest (TCG here): the guest agent configures eth0, the
-- default route and /etc/resolv.conf from the kernel command line the module gives vm.create,
-- and the guest's traffic crosses the firewall and the DNS forwarder on the VM's tap. Same test
-- "internet" as sandbox_net_spec (tests/lua/sbnet.lua); clawlua runs inside its "host"
-- namespace, so the VM's tap is made there.
local N = require "netns"
local T = require "vmtest"
local W = require "sbnet"

local available, why = N.available()
if available and T.no_qemu() then available, why = false, T.no_qemu() end

describe("sandbox networking in a QEMU guest", function()
  if not available then
    pending("sandbox_net_vm tests skipped: " .. why)
    return
  end
  local w, before, files
  setup(function()
    files = assert(T.image_files())
    w = W.make()
    before = W.snapshot(w)
  end)
  teardown(function()
    if w then W.destroy(w) end
    assert.are.same({}, N.leftovers(W.prefix))
  end)

  it("the guest gets its address, route and resolver; allowed name fetched, the rest dropped, spoofing too", function()
    local wget = "busybox wget -q -O - "
    local lines = W.child(w, {
      id = "sbnet-vm",
      vm = { kernel = files.kernel, initrd = files.initrd },
      network = { egress = "deny", allow = { { host = "allowed.test", port = 80 } },
                  resolvers = { "203.0.113.53" } },
      steps = {
        { op = "vexec", argv = { "sh", "-c", "ip -4 addr show eth0; ip route; cat /etc/resolv.conf" } },
        { op = "vexec", argv = { "sh", "-c", wget .. "http://allowed.test/hello.txt" }, timeout = 30 },
        { op = "vexec", argv = { "sh", "-c", wget .. "http://denied.test/hello.txt" }, timeout = 30 },
        { op = "vexec", argv = { "sh", "-c", wget .. "http://203.0.113.11/hello.txt" }, timeout = 5 },
        { op = "vexec", argv = { "sh", "-c", wget .. "http://169.254.169.254/hello.txt" }, timeout = 5 },
        -- a forged source address: the guest is root in its own kernel, the host side is not fooled
        { op = "vexec", argv = { "sh", "-c", "ip addr add 10.99.99.99/32 dev eth0 && "
                                 .. "ping -c 1 -W 2 -I 10.99.99.99 203.0.113.10" }, timeout = 10 },
        { op = "events", kind = "fw.drop" },
        { op = "close" },
      },
    })
    local info = W.find(lines, "create").info
    local conf = W.find(lines, "vexec", 1).result
    assert.are.equal(0, conf.code, conf.stderr)
    assert.matches("inet " .. info.address:gsub("%.", "%%.") .. "/30", conf.stdout)
    assert.matches("default via " .. info.gateway:gsub("%.", "%%."), conf.stdout)
    assert.matches("nameserver " .. info.gateway:gsub("%.", "%%."), conf.stdout)
    local ok = W.find(lines, "vexec", 2).result
    assert.are.equal(0, ok.code, ok.stderr)
    assert.are.equal("hello-from-inet\n", ok.stdout)
    assert.is_true(W.queried(w, "allowed.test"))
    local denied = W.find(lines, "vexec", 3).result
    assert.matches("bad address 'denied.test'", denied.stderr)
    assert.is_false(W.queried(w, "denied.test"))
    assert.is_true(W.find(lines, "vexec", 4).result.timed_out)
    assert.is_true(W.find(lines, "vexec", 5).result.timed_out)
    local drops = {}
    for _, ev in ipairs(W.find(lines, "events").events) do
      assert.are.equal("sbnet-vm", ev.sandbox)
      drops[ev.detail.dst .. " " .. ev.detail.rule] = true
    end
    assert.is_true(drops["203.0.113.11 egress.policy"])
    assert.is_true(drops["169.254.169.254 egress.metadata"])
    assert.are_not.equal(0, W.find(lines, "vexec", 6).result.code)
    local spoofed = false
    for _, ev in ipairs(W.find(lines, "events").events) do
      spoofed = spoofed or (ev.detail.src == "10.99.99.99" and ev.detail.rule == "spoof.ip")
    end
    assert.is_true(spoofed, "no spoof.ip drop for the forged source")
    assert.is_true(W.find(lines, "close").ok)
    assert.are.same(before, W.snapshot(w))
  end)
end)
