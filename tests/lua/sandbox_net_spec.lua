-- labels: root netns
-- timeout: 600
-- clawlua.sandbox.net against the real kernel. The "internet" is a test namespace "inet" with
-- an HTTP server on 203.0.113.10 and .11 (port 80), a DNS server on 203.0.113.53 (logging every
-- query it sees) and the metadata address 169.254.169.254 on its loopback. clawlua runs in a
-- second test namespace "host" whose default route leads to inet (`ip netns exec host clawlua
-- tests/integration/sandbox_net_child.lua ...`), so that namespace's routes are the uplink the
-- sandbox is masqueraded to. The sandbox's processes are jails joined to the namespace the
-- module makes, running busybox wget. Traffic flows only between these namespaces.
local H = require "helper"
local N = require "netns"

local available, why = N.available()
local W = require "sbnet"
local make_world, destroy_world, queried, child, find, snapshot =
  W.make, W.destroy, W.queried, W.child, W.find, W.snapshot
local PREFIX = W.prefix

local EMPTY_NS = "0\n"

describe("sandbox networking", function()
  if not available then
    pending("sandbox_net tests skipped: " .. why)
    return
  end
  local w, before
  setup(function()
    w = make_world()
    before = snapshot(w)
  end)
  teardown(function()
    if w then destroy_world(w) end
    assert.are.same({}, N.leftovers(PREFIX))
  end)

  local function events(lines, kind)
    local out = {}
    for _, l in ipairs(lines) do
      if l.op == "events" then
        for _, ev in ipairs(l.events) do
          if not kind or ev.kind == kind then out[#out + 1] = ev end
        end
      end
    end
    return out
  end

  it("an allowed name resolves through the forwarder, is pinned and reachable; nothing else is", function()
    local lines = child(w, {
      id = "sbnet-a",
      network = { egress = "deny", allow = { { host = "allowed.test", port = 80 } },
                  resolvers = { "203.0.113.53" } },
      steps = {
        { op = "wget", url = "http://allowed.test/hello.txt" },
        { op = "info" },
        { op = "wget", url = "http://cdn.allowed.test/hello.txt" },
        { op = "wget", url = "http://denied.test/hello.txt" },
        { op = "wget", url = "http://203.0.113.11/hello.txt", timeout = 3 },
        { op = "wget", url = "http://169.254.169.254/hello.txt", timeout = 3 },
        { op = "events" },
        { op = "close" },
      },
    })
    local info = find(lines, "create").info
    assert.are.equal(info.gateway, info.dns)
    assert.matches("^10%.213%.", info.address)
    -- allowed: resolved by the test DNS server through the forwarder, then fetched through NAT
    local ok = find(lines, "wget", 1)
    assert.are.equal(0, ok.code, ok.stderr)
    assert.are.equal("hello-from-inet\n", ok.stdout)
    assert.is_true(queried(w, "allowed.test"))
    local pinned = find(lines, "info").info.pinned
    assert.are.equal("203.0.113.10", pinned[1].addr)
    assert.are.same({ "allowed.test" }, pinned[1].hosts)
    -- a name not on the list: NXDOMAIN from the forwarder, and the upstream never saw it
    local cdn = find(lines, "wget", 2)
    assert.are.equal(1, cdn.code)
    assert.matches("bad address", cdn.stderr)
    assert.is_false(queried(w, "cdn.allowed.test"))
    local denied = find(lines, "wget", 3)
    assert.are.equal(1, denied.code)
    assert.matches("bad address 'denied.test'", denied.stderr)
    assert.is_false(queried(w, "denied.test"))
    -- a direct connection to an address not allowed: dropped (the jail was killed waiting)
    local direct = find(lines, "wget", 4)
    assert.are.equal("SIGKILL", direct.signal)
    assert.are.equal("", direct.stdout)
    local meta = find(lines, "wget", 5)
    assert.are.equal("SIGKILL", meta.signal)
    -- audited with the sandbox id
    local drops, deny_names = {}, {}
    for _, ev in ipairs(events(lines, "fw.drop")) do
      assert.are.equal("sbnet-a", ev.sandbox)
      drops[ev.detail.dst .. " " .. ev.detail.rule] = true
    end
    assert.is_true(drops["203.0.113.11 egress.policy"])
    assert.is_true(drops["169.254.169.254 egress.metadata"])
    for _, ev in ipairs(events(lines, "dns.deny")) do deny_names[ev.detail.name] = true end
    assert.is_true(deny_names["denied.test"])
    assert.is_true(deny_names["cdn.allowed.test"])
    -- close: everything recorded was forgotten, and the host namespace is as before
    local c = find(lines, "close")
    assert.is_true(c.ok)
    assert.is_true(c.again)
    local recorded = {}
    for _, l in ipairs(lines) do
      if l.op == "record" then recorded[l.kind .. " " .. l.name] = (recorded[l.kind .. " " .. l.name] or 0) + 1 end
      if l.op == "forget" then recorded[l.kind .. " " .. l.name] = recorded[l.kind .. " " .. l.name] - 1 end
    end
    for k, v in pairs(recorded) do assert.are.equal(0, v, k .. " not forgotten") end
    for _, kind in ipairs { "netns ", "link ", "addr ", "nft ", "fw " } do
      local seen = false
      for k in pairs(recorded) do seen = seen or k:sub(1, #kind) == kind end
      assert.is_true(seen, "nothing recorded of kind " .. kind)
    end
    local after = snapshot(w, info.netns)
    assert.are.equal(EMPTY_NS, after.netns)
    after.netns = ""
    assert.are.same(before, after)
  end)

  it("with egress allowed, any address is reachable but the metadata address and the host are not", function()
    local lines = child(w, {
      id = "sbnet-b",
      network = { egress = "allow", resolvers = { "203.0.113.53" } },
      steps = {
        { op = "wget", url = "http://203.0.113.11/hello.txt" },
        { op = "wget", url = "http://later.test/hello.txt" },
        { op = "wget", url = "http://169.254.169.254/hello.txt", timeout = 3 },
        { op = "wget", url = "http://{gateway}:8080/hello.txt", timeout = 3 },
        { op = "wget", url = "http://10.77.0.1:8080/hello.txt", timeout = 3 },
        { op = "events", kind = "fw.drop" },
        { op = "close" },
      },
    })
    assert.are.equal("hello-from-inet\n", find(lines, "wget", 1).stdout)
    assert.are.equal("hello-from-inet\n", find(lines, "wget", 2).stdout)
    assert.is_true(queried(w, "later.test"))
    assert.are.equal("SIGKILL", find(lines, "wget", 3).signal)
    local meta = false
    for _, ev in ipairs(events(lines, "fw.drop")) do
      meta = meta or (ev.detail.dst == "169.254.169.254" and ev.sandbox == "sbnet-b")
    end
    assert.is_true(meta)
    -- the host's own services: not at the gateway address, nor at the uplink's
    assert.are.equal("SIGKILL", find(lines, "wget", 4).signal)
    assert.are.equal("SIGKILL", find(lines, "wget", 5).signal)
    assert.is_true(find(lines, "close").ok)
  end)

  it("update() allows one more name at once; a bad update raises and changes nothing", function()
    local lines = child(w, {
      id = "sbnet-c",
      pool = "10.213.7.0/29",
      network = { egress = "deny", allow = { "203.0.113.10:80/tcp" }, resolvers = { "203.0.113.53" } },
      steps = {
        { op = "wget", url = "http://203.0.113.10/hello.txt" },
        { op = "wget", url = "http://later.test/hello.txt" },
        { op = "update", network = { egress = "deny", allow = { "203.0.113.10:80/tcp", "later.test:80" },
                                     resolvers = { "203.0.113.53" } } },
        { op = "wget", url = "http://later.test/hello.txt" },
        { op = "update", network = { egress = "deny", allow = { "later.test:80", { host = "x", port = 99999 } } } },
        { op = "wget", url = "http://later.test/hello.txt" },
        { op = "info" },
        { op = "close" },
      },
    })
    assert.are.equal("hello-from-inet\n", find(lines, "wget", 1).stdout)
    assert.matches("bad address 'later.test'", find(lines, "wget", 2).stderr)
    assert.is_true(find(lines, "update", 1).ok)
    assert.are.equal("hello-from-inet\n", find(lines, "wget", 3).stdout)
    local bad = find(lines, "update", 2)
    assert.is_false(bad.ok)
    assert.matches("bad field 'network.allow%[2%]%.port'", bad.err)
    assert.are.equal("hello-from-inet\n", find(lines, "wget", 4).stdout)
    local info = find(lines, "info").info
    assert.are.equal(2, #info.allowed)
    -- the pool given: the sandbox got one of its two /30s
    assert.matches("^10%.213%.7%.[15]$", info.gateway)
    assert.is_true(find(lines, "close").ok)
  end)

  it("unpins an answer's addresses when its TTL has passed", function()
    local lines = child(w, {
      id = "sbnet-t",
      min_pin = 1,
      network = { egress = "deny", allow = { "short.test:80" }, resolvers = { "203.0.113.53" } },
      steps = {
        { op = "wget", url = "http://short.test/hello.txt" },
        { op = "info" },
        -- the name's address by number while pinned, then after the TTL
        { op = "wget", url = "http://203.0.113.10/hello.txt" },
        { op = "sleep", seconds = 2.5 },
        { op = "info" },
        { op = "wget", url = "http://203.0.113.10/hello.txt", timeout = 3 },
        { op = "close" },
      },
    })
    assert.are.equal("hello-from-inet\n", find(lines, "wget", 1).stdout)
    assert.are.equal("203.0.113.10", find(lines, "info", 1).info.pinned[1].addr)
    assert.are.equal("hello-from-inet\n", find(lines, "wget", 2).stdout)
    assert.are.same({}, find(lines, "info", 2).info.pinned)
    assert.are.equal("SIGKILL", find(lines, "wget", 3).signal)
    assert.is_true(find(lines, "close").ok)
  end)

  it("skips subnets that a route of the namespace already uses", function()
    -- The subnet table is shared by every runtime of a run dir, whatever its network namespace:
    -- with the default one, this spec's host and stock runs (side by side, same small pools)
    -- took each other's only free /30 ("no free /30 left", seen once under ASan). A run dir of
    -- this run's own.
    local rundir = H.tmpdir("sbnet-rundir")
    finally(function() H.rm_rf(rundir) end)
    -- 10.213.8.0/30 is taken by an address in the host namespace: only 10.213.8.4/30 is free
    H.sh("ip -n " .. w.host .. " link add cltaken type veth peer name cltaken2 && ip -n " .. w.host
         .. " addr add 10.213.8.1/30 dev cltaken && ip -n " .. w.host .. " link set cltaken up")
    local ok, lines = pcall(child, w, { id = "sbnet-d", pool = "10.213.8.0/29", rundir = rundir, network = {
      resolvers = { "203.0.113.53" } }, steps = { { op = "close" } } })
    H.sh("ip -n " .. w.host .. " link del cltaken")
    assert(ok, lines)
    local made = find(lines, "create")
    assert.is_table(made.info, made.err)
    assert.are.equal("10.213.8.5", made.info.gateway)
    local full = child(w, { id = "sbnet-e", pool = "10.213.8.0/30", rundir = rundir,
                            network = { resolvers = { "203.0.113.53" } }, steps = { { op = "close" } } })
    -- the only /30 is free again now, so this one works; a pool with none free fails cleanly
    assert.is_table(find(full, "create").info)
    H.sh("ip -n " .. w.host .. " addr add 10.213.9.1/30 dev lo")
    local none = child(w, { id = "sbnet-f", pool = "10.213.9.0/30", rundir = rundir,
                            network = { resolvers = { "203.0.113.53" } }, steps = { { op = "close" } } })
    H.sh("ip -n " .. w.host .. " addr del 10.213.9.1/30 dev lo")
    assert.matches("no free /30 left in 10.213.9.0/30", find(none, "create").err)
  end)

  it("a runtime killed with everything made leaves objects that net.cleanup removes", function()
    local lines = child(w, {
      id = "sbnet-k",
      network = { egress = "deny", allow = { "allowed.test:80" }, resolvers = { "203.0.113.53" } },
      steps = { { op = "hang" } },
    }, { until_op = "hang" })
    local info = find(lines, "create").info
    local left, order = {}, {}
    for _, l in ipairs(lines) do
      local k = l.kind and (l.kind .. "\0" .. l.name)
      if l.op == "record" then left[k] = true; order[#order + 1] = { l.kind, l.name } end
      if l.op == "forget" then left[k] = nil end
    end
    -- the leftovers are real: the namespace's name, the NAT table, the firewall's chains. (The
    -- namespace itself and its veth went with the runtime: `ip netns exec` gave the runtime a
    -- mount namespace of its own, the only place the namespace was pinned.)
    local mid = snapshot(w, info.netns)
    assert.are.equal("1\n", mid.netns)
    assert.matches("clawlua_net_", mid.nat)
    assert.matches("vm_", mid.chains)
    local todo = {}
    for i = #order, 1, -1 do
      if left[order[i][1] .. "\0" .. order[i][2]] then todo[#todo + 1] = order[i] end
    end
    local res = child(w, { cleanup = todo })
    for _, r in ipairs(res) do assert.is_true(r.ok, r.kind .. " " .. r.name .. ": " .. tostring(r.err)) end
    -- twice: idempotent
    for _, r in ipairs(child(w, { cleanup = todo })) do assert.is_true(r.ok, r.kind .. " " .. tostring(r.err)) end
    local after = snapshot(w, info.netns)
    assert.are.equal(EMPTY_NS, after.netns)
    after.netns = ""
    assert.are.same(before, after)
  end)
end)
