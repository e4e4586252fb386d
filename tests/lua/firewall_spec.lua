-- labels: root netns
-- timeout: 900
-- clawlua.firewall against the real kernel: rules are checked with real packets between network
-- namespaces the tests create (tests/lua/netns.lua), and the kernel's ruleset is read back with
-- nft. The firewall's netlink sockets are opened inside the "host" namespace (firewall.open's
-- netns option, which creates them on a helper thread that entered it), so the test process
-- stays in its own namespace and drives all of them.
local claw = require "clawlua"
local firewall = claw.firewall
local json = require "clawlua.json"
local H = require "helper"
local N = require "netns"

local available, why = N.available()

local TCP, UDP, DENIED_PORT = 5001, 5002, 5003

-- Runs fn(t, fw) on a fresh topology; whatever happens, closes what the test registered in
-- t.cleanups, the firewall and the topology, and checks that no namespace is left. (busted keeps
-- one `finally` per test, so tests register clean-ups here instead.)
local function with_topo(opts, fn)
  local t = N.topology(opts)
  t.cleanups = {}
  local fw
  local ok, err = xpcall(function()
    fw = assert(firewall.open { netns = t.host, resolvers = opts.resolvers or {},
                                log_group = opts.log_group, on_drop = opts.on_drop,
                                min_ttl = opts.min_ttl })
    fn(t, fw)
  end, debug.traceback)
  for i = #t.cleanups, 1, -1 do pcall(t.cleanups[i]) end
  if fw then fw:close() end
  t:destroy()
  if not ok then error(err, 0) end
  assert.are.same({}, N.leftovers(t.prefix))
end

local function oks(results)
  local r = {}
  for i, x in ipairs(results) do r[i] = x.ok end
  return r
end

-- The ruleset without its counters (the VMs' own background traffic, e.g. IPv6 router
-- solicitations, moves them at any time).
local function ruleset_text(t) return (t:nft("list ruleset"):gsub("packets %d+ bytes %d+", "")) end

describe("firewall", function()
  if not available then
    pending("firewall tests skipped: " .. why)
    return
  end
  local fds0
  setup(function() fds0 = H.fds() end)
  teardown(function()
    H.settle()
    if #N.leftovers() > 0 then print(H.sh("ip netns list")) end
    assert.are.same({}, N.leftovers())
    assert.is_true(H.fds() <= fds0, "file descriptors leaked")
  end)

  it("lets allowed flows through and drops denied CIDRs, ports, protocols and the rest", function()
    with_topo({}, function(t, fw)
      t:serve { TCP, UDP, DENIED_PORT }
      assert(fw:attach("vm-1", t:spec(1, {
        egress = {
          policy = "drop",
          allow = {
            { cidr = "10.98.0.0/16", proto = "tcp", port = TCP },
            { cidr = { "10.98.0.1", "fd98::/64" }, proto = "udp", port = "5000-5002" },
            { cidr = "10.97.0.1", proto = "icmp" },
            { cidr = "fd98::1", proto = "tcp", port = TCP },
          },
          deny = { { cidr = "10.98.0.2" } },
        },
      })))
      local r = t:probe(1, {
        { kind = "tcp", dst = "10.98.0.1", port = TCP },          -- 1 allowed
        { kind = "tcp", dst = "10.98.0.2", port = TCP },          -- 2 denied CIDR (deny wins)
        { kind = "tcp", dst = "10.98.0.1", port = DENIED_PORT },  -- 3 port not allowed
        { kind = "udp", dst = "10.98.0.1", port = UDP },          -- 4 allowed, reply comes back
        { kind = "udp", dst = "10.97.0.1", port = UDP },          -- 5 CIDR not allowed for udp
        { kind = "icmp", dst = "10.97.0.1" },                     -- 6 allowed protocol
        { kind = "icmp", dst = "10.98.0.1" },                     -- 7 protocol not allowed there
        { kind = "tcp", dst = "fd98::1", port = TCP },            -- 8 v6 allowed
        { kind = "tcp", dst = "fd98::2", port = TCP },            -- 9 v6 default drop
        { kind = "udp", dst = "fd98::2", port = UDP },            -- 10 v6 CIDR allowed
        { kind = "tcp", dst = "169.254.169.254", port = TCP },    -- 11 metadata
      })
      assert.are.same({ true, false, false, true, false, true, false, true, false, true, false },
                      oks(r))
      -- the denied packets never reached the listeners
      assert.are.equal(0, t:arrived { dst = "10.98.0.2" })
      assert.are.equal(0, t:arrived { port = DENIED_PORT })
      local c = assert(fw:counters("vm-1"))
      assert.is_true(c["egress.deny[1]"].packets >= 1)
      assert.is_true(c["egress.allow[1]"].packets >= 1)
      assert.is_true(c["egress.policy"].packets >= 1)
      assert.is_true(c["ingress.established"].packets >= 1) -- return traffic
    end)
  end)

  it("filters ingress, keeps return traffic, guards metadata and DNS", function()
    with_topo({}, function(t, fw)
      t:serve { TCP, UDP, 53 }
      -- a listener inside the VM for ingress
      local vm_srv = assert(claw.proc.spawn { "ip", "netns", "exec", t.vms[1], N.python,
        H.src .. "/tests/integration/netprobe.py", "serve", tostring(TCP), tostring(UDP),
        stdout = "pipe", stderr = "inherit" })
      t.procs[#t.procs + 1] = vm_srv
      vm_srv.stdout:set_timeout(15)
      assert.are.equal("ready", vm_srv.stdout:read_line())
      assert(fw:attach("vm-1", t:spec(1, {
        dns = { "10.98.0.53" },
        egress = { policy = "accept",
                   allow = { { cidr = "169.254.169.254", proto = "tcp", port = UDP } } },
        ingress = { allow = { { cidr = "10.99.0.0/24", proto = "tcp", port = TCP } } },
      })))
      local r = t:probe(1, {
        { kind = "tcp", dst = "10.98.0.1", port = TCP },        -- policy accept
        { kind = "tcp", dst = "169.254.169.254", port = TCP },  -- metadata: not the allowed port
        { kind = "udp", dst = "10.98.0.53", port = 53 },        -- DNS to the resolver
        { kind = "udp", dst = "10.98.0.1", port = 53 },         -- DNS elsewhere
        { kind = "udp", dst = "169.254.169.254", port = UDP },  -- metadata udp not allowed
      })
      assert.are.same({ true, false, true, false, false }, oks(r))
      -- from "net" into the VM: only the allowed port; the VM's answers flow back
      local into = json.decode(t:netprobe(t.net, { "probe", json.encode(json.array {
        { kind = "tcp", dst = t:vm_ip(1), port = TCP, timeout = 1 },
        { kind = "udp", dst = t:vm_ip(1), port = UDP, timeout = 1 },
        { kind = "icmp", dst = t:vm_ip(1), timeout = 1 },
      }) }))
      assert.are.same({ true, false, false }, oks(into))
      -- metadata is reachable only when explicitly allowed, and then only as allowed
      assert(fw:update("vm-1", t:spec(1, {
        egress = { policy = "drop", allow = { { cidr = "169.254.169.254", proto = "tcp", port = TCP },
                                              "0.0.0.0/0" } },
      })))
      r = t:probe(1, { { kind = "tcp", dst = "169.254.169.254", port = TCP },
                       { kind = "udp", dst = "169.254.169.254", port = UDP },
                       { kind = "udp", dst = "10.98.0.1", port = UDP } })
      assert.are.same({ true, false, true }, oks(r))
      assert(fw:update("vm-1", t:spec(1, { egress = { policy = "accept", allow = { "0.0.0.0/0" } } })))
      r = t:probe(1, { { kind = "tcp", dst = "169.254.169.254", port = TCP } })
      assert.are.same({ false }, oks(r))
    end)
  end)

  it("drops frames and packets with a forged source IP, MAC or ARP sender", function()
    with_topo({}, function(t, fw)
      t:serve { UDP }
      local gw = t:tap_mac(1)
      local vm = t.vms[1]
      local function forge()
        t:netprobe(vm, { "spoof-ip", "10.200.1.99", "10.98.0.1", UDP })
        t:netprobe(vm, { "spoof-mac", "eth0", "02:00:00:00:99:99", gw, t:vm_ip(1), "10.98.0.1", UDP })
        local arp_bad = t:netprobe(vm, { "arp", "eth0", t:vm_mac(1), "10.200.1.77", "10.200.1.1", 1 })
        local arp_mac = t:netprobe(vm, { "arp", "eth0", "02:00:00:00:99:98", t:vm_ip(1), "10.200.1.1", 1 })
        local arp_ok = t:netprobe(vm, { "arp", "eth0", t:vm_mac(1), t:vm_ip(1), "10.200.1.1", 1 })
        claw.sleep(0.3 * H.scale)
        return { ip = t:arrived { payload_prefix = "spoofed-ip" }, mac = t:arrived { payload_prefix = "spoofed-mac" },
                 arp_bad = arp_bad:match("%a+"), arp_mac = arp_mac:match("%a+"), arp_ok = arp_ok:match("%a+") }
      end
      -- without the firewall the forgeries get through: the test can see them
      assert.are.same({ ip = 1, mac = 1, arp_bad = "reply", arp_mac = "reply", arp_ok = "reply" }, forge())
      assert(fw:attach("vm-1", t:spec(1, { egress = { policy = "accept" } })))
      assert.are.same({ ip = 1, mac = 1, arp_bad = "none", arp_mac = "none", arp_ok = "reply" }, forge())
      local c = assert(fw:counters("vm-1"))
      assert.are.equal(1, c["spoof.ip"].packets)
      assert.are.equal(1, c["spoof.mac"].packets)
      assert.is_true(c["arp.sender_ip"].packets >= 1)
      -- and the VM's own traffic still flows
      assert.are.same({ true }, oks(t:probe(1, { { kind = "udp", dst = "10.98.0.1", port = UDP } })))
    end)
  end)

  it("updates with no gap: allowed traffic is never lost, denied never passes", function()
    with_topo({}, function(t, fw)
      t:serve { UDP, DENIED_PORT }
      local a = t:spec(1, { egress = { allow = {
        { cidr = "10.98.0.1", proto = "udp", port = UDP }, { cidr = "10.98.0.2", proto = "udp", port = UDP } } } })
      local b = t:spec(1, { egress = { allow = {
        { cidr = "10.98.0.1", proto = "udp", port = UDP }, { cidr = "10.97.0.1", proto = "udp", port = UDP } } } })
      assert(fw:attach("vm-1", a))
      -- two floods, each datagram from a new source port (a new conntrack flow, so each one is
      -- judged by the rules in force when it passes), while the policy flips between a and b
      local N_MSGS = 1500
      local function flood(dst, port, tag)
        return claw.spawn(function()
          return t:netprobe(t.vms[1], { "flood", dst, port, N_MSGS, 0.001, tag }, { timeout = 60 })
        end)
      end
      local allowed, denied = flood("10.98.0.1", UDP, "allowed"), flood("10.98.0.1", DENIED_PORT, "denied")
      local updates = 0
      while not (allowed:done() and denied:done()) do
        assert(fw:update("vm-1", updates % 2 == 0 and b or a))
        updates = updates + 1
        claw.sleep(0.005)
      end
      assert.matches("sent " .. N_MSGS, allowed:join())
      denied:join()
      -- (many more without a sanitizer: the point is that updates ran while traffic flowed)
      assert.is_true(updates >= 10, "only " .. updates .. " updates during the flood")
      assert.is_true(H.eventually(function()
        return t:arrived { payload_prefix = "seq allowed" } == N_MSGS
      end, 5 * H.scale), ("allowed: %d of %d arrived"):format(t:arrived { payload_prefix = "seq allowed" }, N_MSGS))
      assert.are.equal(0, t:arrived { payload_prefix = "seq denied" })
      -- the policy in force is the last one
      local last = updates % 2 == 0 and "10.98.0.2" or "10.97.0.1"
      local other = last == "10.98.0.2" and "10.97.0.1" or "10.98.0.2"
      assert.are.same({ true, false }, oks(t:probe(1, {
        { kind = "udp", dst = last, port = UDP }, { kind = "udp", dst = other, port = UDP } })))
      -- control: a naive replacement (detach, then attach) opens a window the same traffic shows
      local control = flood("10.98.0.1", DENIED_PORT, "control")
      while not control:done() do
        assert(fw:detach("vm-1"))
        claw.sleep(0.01)
        assert(fw:attach("vm-1", a))
        claw.sleep(0.01)
      end
      control:join()
      claw.sleep(0.2)
      assert.is_true(t:arrived { payload_prefix = "seq control" } > 0)
    end)
  end)

  it("restores unfiltered traffic on detach and leaves nothing in the kernel", function()
    with_topo({}, function(t, fw)
      t:serve { TCP }
      assert(fw:attach("vm-1", t:spec(1, { egress = { policy = "drop" } })))
      assert.are.same({ false }, oks(t:probe(1, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
      assert(fw:detach("vm-1"))
      assert.are.same({ true }, oks(t:probe(1, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
      assert.is_nil(t:nft("list ruleset"):find("vm_", 1, true))
      assert.are.same({}, fw:list())
      local r, err, code = fw:detach("vm-1")
      assert.is_nil(r)
      assert.matches("not attached", err)
      assert.are.equal("ENOENT", code)
      -- destroy removes the tables
      assert(fw:destroy())
      assert.is_nil(t:nft("list tables"):find("clawlua", 1, true))
      assert.has_error(function() fw:list() end, "attempt to use a closed firewall")
    end)
  end)

  it("leaves the previous ruleset intact when the kernel refuses a batch", function()
    with_topo({}, function(t, fw)
      t:serve { TCP }
      assert(fw:attach("vm-1", t:spec(1, { egress = { policy = "drop" } })))
      -- someone made a chain with the name vm-2's chain will have: its attach must fail whole
      local base = firewall.names("vm-2")
      t:nft("add chain inet clawlua " .. base .. "_i")
      local before = ruleset_text(t)
      local ok, err, code = fw:attach("vm-2", t:spec(2, { egress = { policy = "drop" } }))
      assert.is_nil(ok)
      assert.are.equal("firewall: attach 'vm-2': chain '" .. base .. "_i' of vm 'vm-2': File exists", err)
      assert.are.equal("EEXIST", code)
      assert.are.equal(before, ruleset_text(t))
      assert.are.equal(1, #fw:list())
      -- an update that the kernel refuses half-way (one of its sets vanished) changes nothing
      assert(fw:update("vm-1", t:spec(1, { egress = { policy = "drop", allow = {
        { host = nil, cidr = { "10.97.0.1", "10.97.0.2", "10.97.0.3", "10.97.0.4", "10.97.0.5",
                               "10.97.0.6", "10.97.0.7", "10.97.0.8", "10.97.0.9" } } } } })))
      local set = t:nft("list sets inet"):match("set (vm_vm_1_%x+_g%d+_oa1_4)")
      assert.is_truthy(set)
      local chain = firewall.names("vm-1") .. "_o"
      local handle = t:nft("-a list chain inet clawlua " .. chain):match("@" .. set .. "[^\n]-# handle (%d+)")
      t:nft(("delete rule inet clawlua %s handle %s"):format(chain, handle))
      t:nft("delete set inet clawlua " .. set)
      before = ruleset_text(t)
      ok, err = fw:update("vm-1", t:spec(1, { egress = { policy = "accept" } }))
      assert.is_nil(ok)
      assert.matches("set '" .. set .. "' of vm 'vm%-1': No such file or directory", err)
      assert.are.equal(before, ruleset_text(t))
      assert.are.same({ false }, oks(t:probe(1, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
    end)
  end)

  it("adopts what a crashed runtime left and reconciles it", function()
    with_topo({ vms = 3 }, function(t, fw)
      fw:close()
      t:serve { TCP }
      -- a runtime that attaches three VMs and is killed
      local script = ([[
        local fw = assert(require("clawlua").firewall.open { netns = %q, resolvers = {} })
        for i = 1, 3 do
          assert(fw:attach("vm-" .. i, { iface = "tap" .. i, ip = "10.200." .. i .. ".2",
                                          egress = { policy = "drop" } }))
        end
        print("attached")
        io.stdout:flush()
        require("clawlua").sleep(60)
      ]]):format(t.host)
      local child = assert(claw.proc.spawn { H.bin, "-e", script, stdout = "pipe", stderr = "inherit" })
      t.procs[#t.procs + 1] = child
      child.stdout:set_timeout(30)
      assert.are.equal("attached", child.stdout:read_line())
      child:kill("KILL")
      child:wait()
      for i = 1, 3 do
        assert.are.same({ false }, oks(t:probe(i, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
      end
      local fw2 = assert(firewall.open { netns = t.host, resolvers = {} })
      t.cleanups[#t.cleanups + 1] = function() fw2:close() end
      local l = fw2:list()
      assert.are.same({ "vm-1", "vm-2", "vm-3" }, { l[1].id, l[2].id, l[3].id })
      assert.are.same({ "tap1", "tap2", "tap3" }, { l[1].iface, l[2].iface, l[3].iface })
      assert.is_true(l[1].adopted)
      local removed = assert(fw2:reconcile { "vm-2" })
      table.sort(removed)
      assert.are.same({ "vm-1", "vm-3" }, removed)
      assert.are.equal(1, #fw2:list())
      local rs = ruleset_text(t)
      assert.is_nil(rs:find(firewall.names("vm-1"), 1, true))
      assert.is_nil(rs:find(firewall.names("vm-3"), 1, true))
      assert.is_truthy(rs:find(firewall.names("vm-2"), 1, true))
      assert.are.same({ true }, oks(t:probe(1, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
      assert.are.same({ false }, oks(t:probe(2, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
      -- an adopted VM can be updated and detached like any other
      assert(fw2:update("vm-2", t:spec(2, { egress = { policy = "accept" } })))
      assert.are.same({ true }, oks(t:probe(2, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
      assert.are.same({}, fw2:reconcile { "vm-2" })
    end)
  end)

  it("counts packets and bytes per rule", function()
    with_topo({}, function(t, fw)
      t:serve { UDP }
      assert(fw:attach("vm-1", t:spec(1, { egress = {
        allow = { { cidr = "10.97.0.1", proto = "icmp" } }, deny = { { cidr = "10.98.0.2", proto = "udp" } } } })))
      local before = assert(fw:counters("vm-1"))
      assert.are.equal(0, before["egress.allow[1]"].packets)
      local probes = {}
      for i = 1, 5 do probes[i] = { kind = "icmp", dst = "10.97.0.1" } end
      for i = 6, 8 do probes[i] = { kind = "udp", dst = "10.98.0.2", port = UDP } end
      assert.are.same({ true, true, true, true, true, false, false, false }, oks(t:probe(1, probes)))
      local c = assert(fw:counters("vm-1"))
      assert.are.equal(5, c["egress.allow[1]"].packets)
      assert.are.equal(5 * (20 + 8 + 7), c["egress.allow[1]"].bytes) -- IPv4 + ICMP + payload
      assert.are.equal(3, c["egress.deny[1]"].packets)
      assert.are.equal(5, c["ingress.established"].packets) -- the echo replies
      assert.are.equal(0, c["egress.policy"].packets)
      local r, err = fw:counters("nope")
      assert.is_nil(r)
      assert.matches("not attached", err)
    end)
  end)

  it("refuses bad input naming the field and value, leaving the kernel unchanged", function()
    with_topo({ vms = 2 }, function(t, fw)
      assert(fw:attach("vm-1", t:spec(1)))
      local before = ruleset_text(t)
      local function refuses(id, spec, pattern)
        local ok, err = pcall(fw.attach, fw, id, spec)
        assert.is_false(ok)
        assert.matches(pattern, err)
        assert.are.equal(before, ruleset_text(t))
      end
      local function eg(entry) return t:spec(2, { egress = { allow = { entry } } }) end
      refuses("vm-2", eg { cidr = "10.0.0.0/33" },
              "bad field 'egress.allow%[1%]%.cidr' %(invalid CIDR '10%.0%.0%.0/33'%)")
      refuses("vm-2", eg { cidr = { "10.0.0.1", "10.0.0.300" } },
              "bad field 'egress.allow%[1%]%.cidr%[2%]' %(invalid CIDR '10%.0%.0%.300'%)")
      refuses("vm-2", eg { cidr = "fd00::/129" }, "invalid CIDR 'fd00::/129'")
      refuses("vm-2", eg { proto = "tcp", port = 0 },
              "bad field 'egress.allow%[1%]%.port' %(port 0 out of range 1%-65535%)")
      refuses("vm-2", eg { proto = "tcp", port = 65536 }, "port 65536 out of range")
      refuses("vm-2", eg { proto = "udp", port = "9-5" }, "invalid port or range '9%-5'")
      refuses("vm-2", eg { proto = "udp", port = "1-70000" }, "invalid port or range '1%-70000'")
      refuses("vm-2", eg { proto = "sctp" }, "bad field 'egress.allow%[1%]%.proto' %(unknown protocol 'sctp'")
      refuses("vm-2", eg { proto = "icmp", port = 80 }, "a port needs proto tcp, udp or any")
      refuses("vm-2", eg { prot = "tcp" }, "bad field 'egress.allow%[1%]%.prot' %(unknown field%)")
      refuses("vm-2", t:spec(2, { colour = "red" }), "bad field 'colour' %(unknown field%)")
      refuses("vm-2", t:spec(2, { egress = { policy = "maybe" } }),
              "bad field 'egress.policy' %(\"drop\" or \"accept\" expected, got 'maybe'%)")
      refuses("vm-2", t:spec(2, { egress = { allowed = {} } }), "bad field 'egress.allowed' %(unknown field%)")
      refuses("vm-2", t:spec(2, { iface = "tap-name-too-long" }),
              "bad field 'iface' %(interface name 'tap%-name%-too%-long' longer than 15 bytes%)")
      refuses("vm-2", t:spec(2, { iface = "tap1" }), "bad field 'iface' %(interface 'tap1' is used by vm 'vm%-1'%)")
      refuses("vm-2", t:spec(2, { mac = "02:00:00:00:00" }), "bad field 'mac' %(invalid MAC address '02:00:00:00:00'")
      refuses("vm-2", t:spec(2, { ip = "10.0.0.1/24" }), "bad field 'ip' %(invalid IPv4 address '10%.0%.0%.1/24'%)")
      refuses("vm-2", t:spec(2, { egress = { rate = { packets = 0 } } }), "bad field 'egress.rate.packets'")
      refuses("vm-2", t:spec(2, { log = true }), "bad field 'log' %(the firewall was opened without log_group%)")
      refuses("vm-2", eg { host = "not a name" }, "invalid host name 'not a name'")
      refuses("vm-1", t:spec(1), "vm 'vm%-1' is already attached")
      refuses("", t:spec(2), "empty vm id")
      refuses("a\nb", t:spec(2), "invalid byte 0x0a at 2 of vm id")
      refuses(("x"):rep(129), t:spec(2), "vm id longer than 128 bytes")
      refuses("vm-3", { iface = "tap2", mac = t:vm_mac(2) }, "the VM needs an address")
      -- the caps that bound a spec's memory
      local many = {}
      for k = 1, 4097 do many[k] = ("10.%d.%d.%d"):format(k // 65536, (k // 256) % 256, k % 256) end
      refuses("vm-2", eg { cidr = many }, "bad field 'egress.allow%[1%]%.cidr%[4097%]' %(more than 4096 addresses")
      local entries = {}
      for k = 1, 513 do entries[k] = "10.0.0.1" end
      refuses("vm-2", t:spec(2, { egress = { allow = entries } }), "bad field 'egress.allow' %(more than 512 entries%)")
      assert.has_error(function() fw:update("vm-9", t:spec(2)) end,
                       "bad argument #1 to 'update' (vm 'vm-9' is not attached)")
      assert.are.equal(1, #fw:list())
    end)
  end)

  it("links every VM chain to a hook through the maps, whoever adds them and however", function()
    with_topo({ vms = 3 }, function(t, fw)
      -- attaches from concurrent tasks: each is one batch, they queue on the socket
      local tasks = {}
      for i = 1, 3 do
        tasks[i] = claw.spawn(function() return fw:attach("vm-" .. i, t:spec(i, { egress = { policy = "drop" } })) end)
      end
      for i = 1, 3 do assert.is_true(tasks[i]:join()) end
      local rs = t:ruleset_json()
      local chains, elems, hooked_maps = {}, {}, {}
      for _, o in ipairs(rs) do
        if o.chain and o.chain.table == "clawlua" and o.chain.name:match("^vm_") then
          chains[#chains + 1] = o.chain.family .. ":" .. o.chain.name
        elseif (o.map or o.set) and (o.map or o.set).table == "clawlua" then
          local m = o.map or o.set
          for _, e in ipairs(m.elem or {}) do
            local v = e[2] or (e.elem and e.elem.val)
            local target = type(v) == "table" and v.jump and v.jump.target
            if target then elems[m.family .. ":" .. target] = m.family .. ":" .. m.name end
          end
        elseif o.rule and o.rule.table == "clawlua" then
          for _, x in ipairs(o.rule.expr) do
            if x.vmap then hooked_maps[o.rule.family .. ":" .. x.vmap.data:gsub("^@", "")] = o.rule.chain end
          end
        end
      end
      assert.are.equal(12, #chains) -- 3 VMs x (spoof, egress, ingress, arp)
      for _, c in ipairs(chains) do
        assert.is_truthy(elems[c], c .. " is not in any map")
        assert.is_truthy(hooked_maps[elems[c]], elems[c] .. " is not used by a base chain")
      end
      -- and the rules are reached: each VM's traffic is dropped
      for i = 1, 3 do
        assert.are.same({ false }, oks(t:probe(i, { { kind = "icmp", dst = "10.98.0.1" } })))
      end
    end)
  end)

  it("gives 10,000 random ids (long, sharing prefixes) distinct names within limits", function()
    local seen, ids = {}, {}
    local chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+="
    math.randomseed(42)
    local function rnd(n)
      local b = {}
      for i = 1, n do
        local k = math.random(#chars)
        b[i] = chars:sub(k, k)
      end
      return table.concat(b)
    end
    local long = ("p"):rep(100)
    local i = 0
    while #ids < 10000 do
      i = i + 1
      local id
      if i % 4 == 0 then id = long .. rnd(math.random(1, 28))           -- share 100 bytes
      elseif i % 4 == 1 then id = "vm-" .. rnd(math.random(1, 125))
      elseif i % 4 == 2 then id = ("x"):rep(16) .. rnd(math.random(1, 30)) -- same sanitised prefix
      else id = rnd(math.random(1, 128)) end
      if not seen[id] then
        seen[id] = true
        ids[#ids + 1] = id
      end
    end
    -- ids that sanitise to the same text differ only in the hash
    for _, id in ipairs { "a.b", "a_b", "a-b", "a/b", "a:b" } do
      if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
    end
    local names = {}
    for _, id in ipairs(ids) do
      local base, key = firewall.names(id)
      assert.is_nil(names[base], ("ids %q and %q collide"):format(tostring(names[base]), id))
      names[base] = id
      assert.matches("^vm_[%w_]*_%x+$", base)
      assert.are.equal(20, #key)
      assert.is_true(#base + #"_g4294967295_dns_6" < 64) -- and the kernel allows 256
      assert.are.equal(base, (firewall.names(id))) -- deterministic
    end
    assert.is_true(#ids >= 10000)
    -- the kernel agrees: all of them attached in one batch, each with its own chains
    with_topo({ vms = 0 }, function(t, fw)
      local specs = {}
      for k, id in ipairs(ids) do
        specs[id] = { iface = ("t%d"):format(k), ip = "10.0.0.2" }
      end
      assert(fw:attach_many(specs))
      local listed = fw:list()
      assert.are.equal(#ids, #listed)
      local n = 0
      for line in t:nft("list chains inet"):gmatch("chain (vm_%S+)_o ") do
        n = n + 1
        assert.is_truthy(names[line])
      end
      assert.are.equal(#ids, n)
      local fw2 = assert(firewall.open { netns = t.host, resolvers = {} }) -- adopts them all
      t.cleanups[#t.cleanups + 1] = function() fw2:close() end
      local adopted = fw2:list()
      assert.are.equal(#ids, #adopted)
      table.sort(ids)
      for k = 1, #ids do assert.are.equal(ids[k], adopted[k].id) end
      assert.are.equal(#ids, #assert(fw2:reconcile {}))
    end)
  end)

  it("resolves domain names on the loop and refreshes them on TTL", function()
    local zone = os.tmpname()
    local function set_zone(z) H.write_file(zone, json.encode(z)) end
    set_zone { ["svc.test"] = { a = { "10.98.0.1" }, aaaa = { "fd98::1" }, ttl = 1 },
               ["alias.test"] = { cname = "svc.test", ttl = 30 } }
    with_topo({ resolvers = { "10.98.0.53" }, min_ttl = 0.5 }, function(t, fw)
      t.cleanups[#t.cleanups + 1] = function() os.remove(zone) end
      t:serve { TCP }
      local dnsd = assert(claw.proc.spawn { "ip", "netns", "exec", t.net, N.python,
        H.src .. "/tests/integration/dnsd.py", "10.98.0.53", "53", zone, stdout = "pipe", stderr = "inherit" })
      t.procs[#t.procs + 1] = dnsd
      dnsd.stdout:set_timeout(15)
      assert.are.equal("ready", dnsd.stdout:read_line())
      local r = assert(fw:resolve("alias.test"))
      table.sort(r.addrs)
      assert.are.same({ "10.98.0.1", "fd98::1" }, r.addrs)
      assert.are.equal(1, r.ttl) -- the smallest TTL of the chain
      local nx, err = fw:resolve("nothing.test")
      assert.is_nil(nx)
      assert.matches("NXDOMAIN", err)

      local seq0 = claw.audit.stats().last_seq
      assert(fw:attach("vm-1", t:spec(1, {
        egress = { allow = { { host = "svc.test", proto = "tcp", port = TCP } } } })))
      assert.are.same({ true, false, true }, oks(t:probe(1, {
        { kind = "tcp", dst = "10.98.0.1", port = TCP }, { kind = "tcp", dst = "10.98.0.2", port = TCP },
        { kind = "tcp", dst = "fd98::1", port = TCP } })))
      local ev = claw.audit.events { after_seq = seq0, kind = "fw.resolve" }[1]
      assert.are.equal("vm-1", ev.sandbox)
      assert.are.equal("svc.test", ev.detail.host)
      -- the name moves: the set follows within the TTL
      set_zone { ["svc.test"] = { a = { "10.98.0.2" }, ttl = 1 } }
      assert.is_truthy(H.eventually(function()
        for _, e in ipairs(claw.audit.events { after_seq = seq0, kind = "fw.resolve" }) do
          if e.detail.changed and e.detail.addrs[1] == "10.98.0.2" then return true end
        end
      end, 5 * H.scale))
      assert.are.same({ false, true }, oks(t:probe(1, {
        { kind = "tcp", dst = "10.98.0.1", port = TCP }, { kind = "tcp", dst = "10.98.0.2", port = TCP } })))
      local h = fw:list()[1].hosts[1]
      assert.are.same({ host = "svc.test", addrs = { "10.98.0.2" }, ttl = 1 }, h)
      -- a slow answer: the update waits for it without holding up the loop
      set_zone { ["svc.test"] = { a = { "10.98.0.2" }, ttl = 1 },
                 ["slow.test"] = { a = { "10.98.0.1" }, ttl = 30, delay = 0.4 } }
      local ticks, done = 0, false
      local ticker = claw.spawn(function()
        while not done do
          ticks = ticks + 1
          claw.sleep(0.02)
        end
      end)
      local t0 = claw.now()
      local up = claw.spawn(function()
        return fw:update("vm-1", t:spec(1, {
          egress = { allow = { { host = "slow.test", proto = "tcp", port = TCP } } } }))
      end)
      assert.is_true(up:join())
      done = true
      ticker:join()
      assert.is_true(claw.now() - t0 >= 0.4)
      assert.is_true(ticks >= 5, ticks .. " ticks while the update waited")
      assert.are.same({ true }, oks(t:probe(1, { { kind = "tcp", dst = "10.98.0.1", port = TCP } })))
    end)
  end)

  it("logs drops to NFLOG as fw.drop events and to the callback", function()
    local got = {}
    with_topo({ log_group = 3000 + tonumber(N.pid) % 1000, on_drop = function(ev) got[#got + 1] = ev end },
      function(t, fw)
        t:serve { UDP }
        local seq0 = claw.audit.stats().last_seq
        assert(fw:attach("vm-1", t:spec(1, { log = true, egress = { policy = "drop" } })))
        assert.are.same({ false }, oks(t:probe(1, { { kind = "udp", dst = "10.98.0.1", port = UDP } })))
        assert.is_truthy(H.eventually(function() return #got > 0 end, 3 * H.scale))
        local ev = got[1]
        assert.are.same({ vm = "vm-1", rule = "egress.policy", family = "ip", proto = "udp",
                          src = t:vm_ip(1), dst = "10.98.0.1", dport = UDP, sport = ev.sport,
                          mac = ev.mac }, ev)
        local a = claw.audit.events { after_seq = seq0, kind = "fw.drop" }[1]
        assert.are.equal("vm-1", a.sandbox)
        assert.are.equal("10.98.0.1", a.detail.dst)
        assert.are.equal(UDP, a.detail.dport)
        assert.is_true(fw:stats().log.received >= 1)
      end)
  end)

  it("bounds the queue of drop events a slow callback has not taken yet", function()
    local calls = 0
    with_topo({ log_group = 4000 + tonumber(N.pid) % 1000,
                on_drop = function() calls = calls + 1; claw.sleep(2) end }, function(t, fw)
      assert(fw:attach("vm-1", t:spec(1, { log = true, egress = { policy = "drop" } })))
      t:netprobe(t.vms[1], { "flood", "10.98.0.1", UDP, 2000, 0.0002, "log" })
      -- wait until the reader has taken everything the kernel delivered (it may drop some
      -- when the socket buffer is full; those are not ours to count)
      local last = -1
      assert.is_truthy(H.eventually(function()
        local n = fw:stats().log.received
        local settled = n == last and n > 1100
        last = n
        claw.sleep(0.2)
        return settled
      end, 10 * H.scale))
      local st = fw:stats().log
      assert.are.equal(1024, st.queued) -- the cap, while the callback sleeps on the first one
      assert.is_true(st.lost_queue > 0)
      assert.are.equal(st.received, st.queued + st.lost_queue + calls)
    end)
  end)

  it("rate-limits logging without letting limited packets through", function()
    with_topo({ log_group = 5000 + tonumber(N.pid) % 1000 }, function(t, fw)
      t:serve { UDP }
      assert(fw:attach("vm-1", t:spec(1, { log = { rate = 5, burst = 5 }, egress = { policy = "drop" } })))
      t:netprobe(t.vms[1], { "flood", "10.98.0.1", UDP, 200, 0, "lim" })
      claw.sleep(0.5 * H.scale)
      local logged = fw:stats().log.received
      assert.is_true(logged >= 5 and logged <= 20, logged .. " drops logged")
      assert.is_true(fw:counters("vm-1")["egress.policy"].packets >= 200) -- all dropped
      assert.are.equal(0, t:arrived { payload_prefix = "seq lim" })
    end)
  end)

  it("limits the rate of a VM's traffic", function()
    with_topo({}, function(t, fw)
      t:serve { UDP }
      assert(fw:attach("vm-1", t:spec(1, { egress = { policy = "accept", rate = { packets = 20, burst = 20 } } })))
      t:netprobe(t.vms[1], { "flood", "10.98.0.1", UDP, 300, 0, "rate" })
      claw.sleep(0.3)
      local got = t:arrived { payload_prefix = "seq rate" }
      assert.is_true(got >= 20 and got < 150, got .. " of 300 arrived")
      assert.is_true(fw:counters("vm-1")["egress.rate"].packets >= 150)
    end)
  end)

  it("yields inside tasks and rejects use after close", function()
    with_topo({}, function(t, fw)
      local order = {}
      local a = claw.spawn(function()
        order[#order + 1] = "a-start"
        assert(fw:attach("vm-1", t:spec(1)))
        order[#order + 1] = "a-done"
      end)
      local b = claw.spawn(function() order[#order + 1] = "b" end)
      a:join()
      b:join()
      assert.are.equal("a-start", order[1])
      assert.are.equal(3, #order)
      fw:close()
      fw:close() -- twice is fine
      assert.has_error(function() fw:attach("vm-2", t:spec(1)) end, "attempt to use a closed firewall")
      assert.matches("closed", tostring(fw))
    end)
  end)
end)
