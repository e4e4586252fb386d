-- Benchmark of clawlua.firewall against the ways it replaces, measured in the same run:
--   * attach then detach 1, 100 and 1,000 VMs (each: anti-spoofing + 3 policy rules + its map
--     elements) with clawlua (one batch for all; and one batch per VM), with one `nft -f` per
--     VM, and with `iptables` per rule (a chain per VM, jumped to from FORWARD: the replaced
--     design, here with the jump it forgot);
--   * adding one VM when 1,000 exist;
--   * the per-packet cost: iperf3 throughput of one allowed TCP flow from a VM namespace to a
--     "net" namespace through the firewall's namespace, with 1 and with 1,000 VMs attached (and
--     the iptables design with 1,000 chains in FORWARD for comparison).
-- Everything runs in network namespaces the benchmark creates and removes.
--
-- usage (root): build/bin/clawlua tests/bench/firewall.lua [--quick]
local claw = require "clawlua"

local src = os.getenv("CLAWLUA_SRC") or "."
package.path = src .. "/tests/lua/?.lua;" .. package.path
local H = require "helper"

local quick, inner = false, false
for _, a in ipairs(arg or {}) do
  if a == "--quick" then quick = true elseif a == "--inner" then inner = true end
end

local function sh(cmd) return H.sh(cmd, { timeout = 3600 }) end

local function spec(i)
  return {
    iface = ("t%d"):format(i),
    ip = ("10.%d.%d.2"):format(100 + i // 65536, (i // 256) % 256),
    mac = ("02:00:00:%02x:%02x:02"):format((i // 256) % 256, i % 256),
    egress = {
      policy = "drop",
      allow = { { cidr = "10.1.0.0/16", proto = "tcp", port = 443 },
                { cidr = "10.2.0.0/16", proto = "udp", port = 53 } },
      deny = { "10.3.0.0/16" },
    },
  }
end

-- The same VM for nft: a chain with anti-spoofing and the 3 policy rules, and the map element.
local function nft_attach(i)
  local s = spec(i)
  return table.concat({
    ("add chain inet nftb vm%d"):format(i),
    ("add rule inet nftb vm%d ether saddr != %s drop"):format(i, s.mac),
    ("add rule inet nftb vm%d ip saddr != %s drop"):format(i, s.ip),
    ("add rule inet nftb vm%d ip daddr 10.3.0.0/16 drop"):format(i),
    ("add rule inet nftb vm%d ip daddr 10.1.0.0/16 tcp dport 443 accept"):format(i),
    ("add rule inet nftb vm%d ip daddr 10.2.0.0/16 udp dport 53 accept"):format(i),
    ("add element inet nftb egress { \"%s\" : jump vm%d }"):format(s.iface, i),
  }, "\n") .. "\n"
end

local function nft_detach(i)
  return ("delete element inet nftb egress { \"t%d\" }\nflush chain inet nftb vm%d\n"
    .. "delete chain inet nftb vm%d\n"):format(i, i, i)
end

local NFT_BASE = [[
table inet nftb {
  map egress { type ifname : verdict; }
  chain forward { type filter hook forward priority 0; policy accept; iifname vmap @egress; }
}
]]

local function iptables_attach(i)
  local s = spec(i)
  local c = "vm" .. i
  return {
    { "iptables", "-N", c },
    { "iptables", "-A", c, "-m", "mac", "!", "--mac-source", s.mac, "-j", "DROP" },
    { "iptables", "-A", c, "!", "-s", s.ip, "-j", "DROP" },
    { "iptables", "-A", c, "-d", "10.3.0.0/16", "-j", "DROP" },
    { "iptables", "-A", c, "-d", "10.1.0.0/16", "-p", "tcp", "--dport", "443", "-j", "ACCEPT" },
    { "iptables", "-A", c, "-d", "10.2.0.0/16", "-p", "udp", "--dport", "53", "-j", "ACCEPT" },
    { "iptables", "-A", "FORWARD", "-i", s.iface, "-j", c },
  }
end

local function iptables_detach(i)
  local c = "vm" .. i
  return { { "iptables", "-D", "FORWARD", "-i", "t" .. i, "-j", c }, { "iptables", "-F", c },
           { "iptables", "-X", c } }
end

local function run(argv)
  local r = assert(claw.proc.run(argv))
  if r.code ~= 0 then error(table.concat(argv, " ") .. ": " .. r.stderr) end
end

local tmp = "/tmp/clawlua-fwbench-" .. (os.getenv("CLAWLUA_BENCH_ID") or "x")

-- Loads the chains of VMs 1..k in one iptables-restore (a fast fill, not what is measured).
local function iptables_bulk(k)
  local lines = { "*filter" }
  for i = 1, k do lines[#lines + 1] = (":vm%d - [0:0]"):format(i) end
  for i = 1, k do
    for _, a in ipairs(iptables_attach(i)) do
      if a[2] ~= "-N" then lines[#lines + 1] = table.concat(a, " ", 2) end
    end
  end
  lines[#lines + 1] = "COMMIT\n"
  H.write_file(tmp, table.concat(lines, "\n"))
  run { "iptables-restore", "-n", tmp }
end


local function nft_file(text)
  local f = assert(io.open(tmp, "w"))
  f:write(text)
  f:close()
  run { "nft", "-f", tmp }
end

local function timed(fn)
  collectgarbage()
  local t0 = claw.now()
  fn()
  return claw.now() - t0
end

local function fmt(s) return s < 1 and ("%.1f ms"):format(s * 1000) or ("%.2f s"):format(s) end

-- ------------------------------------------------------------------------------------------
-- Control plane: runs inside the firewall's namespace (so nft and iptables run there plainly)

local function control_plane()
  local firewall = claw.firewall
  local sizes = quick and { 1, 100 } or { 1, 100, 1000 }
  print(("%-8s %-26s %12s %12s %10s"):format("VMs", "method", "attach+detach", "per VM", "ratio"))
  local msgs_per_vm
  for _, n in ipairs(sizes) do
    local results = {}
    -- clawlua, one batch for all the VMs
    do
      local fw = assert(firewall.open { table = "clawb", resolvers = {} })
      local specs, ids = {}, {}
      for i = 1, n do
        specs["vm-" .. i] = spec(i)
        ids[i] = "vm-" .. i
      end
      local m0 = fw:stats().messages
      results[#results + 1] = { "clawlua (one batch)", timed(function()
        assert(fw:attach_many(specs))
        assert(fw:detach_many(ids))
      end) }
      msgs_per_vm = (fw:stats().messages - m0) / n
      assert(fw:destroy())
    end
    -- clawlua, a batch per VM (one attach call each)
    do
      local fw = assert(firewall.open { table = "clawb", resolvers = {} })
      results[#results + 1] = { "clawlua (batch per VM)", timed(function()
        for i = 1, n do assert(fw:attach("vm-" .. i, spec(i))) end
        for i = 1, n do assert(fw:detach("vm-" .. i)) end
      end) }
      assert(fw:destroy())
    end
    -- The per-VM peers cost O(VMs) per command (each loads the whole ruleset), so 1,000 of
    -- them would take an hour here. Up to 100 VMs they run in full; at 1,000 the first 450 VMs
    -- are loaded in bulk, the per-VM commands of VMs 451-550 are timed (attach, then detach),
    -- and the total is that mean per-VM cost times N: the mid-range sample of a cost that
    -- grows linearly with the VMs present.
    local sample = n > 100 and { from = 451, to = 550 } or nil
    local function peer(name, prefill, attach, detach, cleanup)
      local lo, hi = 1, n
      if sample then
        prefill(sample.from - 1)
        lo, hi = sample.from, sample.to
      end
      local el = timed(function()
        for i = lo, hi do attach(i) end
        for i = lo, hi do detach(i) end
      end)
      cleanup()
      local per = el / (hi - lo + 1)
      results[#results + 1] = { name .. (sample and " (est.)" or ""), per * n }
    end
    if not sample then nft_file(NFT_BASE) end
    peer("nft -f per VM",
      function(k)
        local text = { NFT_BASE }
        for i = 1, k do text[#text + 1] = nft_attach(i) end
        nft_file(table.concat(text))
      end,
      function(i) nft_file(nft_attach(i)) end,
      function(i) nft_file(nft_detach(i)) end,
      function() run { "nft", "delete", "table", "inet", "nftb" } end)
    peer("iptables per rule",
      function(k) iptables_bulk(k) end,
      function(i) for _, a in ipairs(iptables_attach(i)) do run(a) end end,
      function(i) for _, a in ipairs(iptables_detach(i)) do run(a) end end,
      function() run { "iptables", "-F" }; run { "iptables", "-X" } end)
    local base = results[1][2]
    for _, r in ipairs(results) do
      print(("%-8d %-26s %12s %12s %9.1fx"):format(n, r[1], fmt(r[2]), fmt(r[2] / n), r[2] / base))
    end
  end
  print("(est.: per-VM commands timed on VMs 451-550 of 1,000 after a bulk load of 1-450, times 1,000)")
  print(("(clawlua sends %.0f netlink messages per VM: anti-spoofing for IPv4, IPv6, MAC and ARP, "
    .. "egress and ingress chains with their fixed rules, the 3 policy rules, 4 map elements)")
    :format(msgs_per_vm))

  -- One more VM when 1,000 exist
  local n = quick and 100 or 1000
  print()
  print(("adding one VM when %d exist:"):format(n))
  local one = {}
  do
    local fw = assert(firewall.open { table = "clawb", resolvers = {} })
    local specs = {}
    for i = 1, n do specs["vm-" .. i] = spec(i) end
    assert(fw:attach_many(specs))
    local samples = {}
    for k = 1, 5 do
      samples[k] = timed(function() assert(fw:attach("extra", spec(n + 1))) end)
      assert(fw:detach("extra"))
    end
    table.sort(samples)
    one[#one + 1] = { "clawlua", samples[3] }
    assert(fw:destroy())
  end
  do
    nft_file(NFT_BASE)
    local text = {}
    for i = 1, n do text[#text + 1] = nft_attach(i) end
    nft_file(table.concat(text))
    local samples = {}
    for k = 1, 5 do
      samples[k] = timed(function() nft_file(nft_attach(n + 1)) end)
      nft_file(nft_detach(n + 1))
    end
    table.sort(samples)
    one[#one + 1] = { "nft -f", samples[3] }
    run { "nft", "delete", "table", "inet", "nftb" }
  end
  do
    -- fill through iptables-restore (fast), then time the per-rule commands of one more VM
    iptables_bulk(n)
    local samples = {}
    for k = 1, 5 do
      samples[k] = timed(function() for _, a in ipairs(iptables_attach(n + 1)) do run(a) end end)
      for _, a in ipairs(iptables_detach(n + 1)) do run(a) end
    end
    table.sort(samples)
    one[#one + 1] = { "iptables per rule", samples[3] }
    run { "iptables", "-F" }
    run { "iptables", "-X" }
  end
  for _, r in ipairs(one) do
    print(("  %-20s %10s %9.1fx"):format(r[1], fmt(r[2]), r[2] / one[1][2]))
  end
  os.remove(tmp)
end

-- ------------------------------------------------------------------------------------------
-- Data plane: iperf3 from a VM namespace to "net" through the firewall's namespace

local function data_plane(t)
  local firewall = claw.firewall
  local srv = assert(claw.proc.spawn { "ip", "netns", "exec", t.net, "iperf3", "-s", "-B", "10.98.0.1",
                                       stdout = "null", stderr = "null" })
  t.procs[#t.procs + 1] = srv
  claw.sleep(0.5)
  local secs = quick and 2 or 4
  local function iperf()
    local best = 0
    for _ = 1, 3 do
      local r = t:exec(t.vms[1], { "iperf3", "-c", "10.98.0.1", "-t", tostring(secs), "-J" }, { timeout = 60 })
      local doc = require("clawlua.json").decode(r.stdout)
      local bps = doc and doc["end"] and doc["end"].sum_received and doc["end"].sum_received.bits_per_second
      assert(bps, "iperf3 failed: " .. r.stdout:sub(1, 300) .. r.stderr)
      best = math.max(best, bps)
    end
    return best
  end
  local allowed = t:spec(1, { egress = { policy = "drop", allow = {
    { cidr = "10.98.0.0/16", proto = "tcp", port = 5201 } } } })
  local rows = {}
  rows[#rows + 1] = { "no firewall", iperf() }
  local fw = assert(firewall.open { netns = t.host, resolvers = {} })
  assert(fw:attach("vm-1", allowed))
  rows[#rows + 1] = { "clawlua, 1 VM attached", iperf() }
  local specs = {}
  for i = 2, 1000 do specs["vm-" .. i] = spec(i) end
  assert(fw:attach_many(specs))
  rows[#rows + 1] = { "clawlua, 1,000 VMs attached", iperf() }
  assert(fw:destroy())
  -- the replaced design: a FORWARD jump per VM, ours last (iptables walks the list per packet)
  local lines = { "*filter" }
  for i = 2, 1000 do lines[#lines + 1] = (":vm%d - [0:0]"):format(i) end
  lines[#lines + 1] = ":vm1 - [0:0]"
  for i = 2, 1000 do
    for _, a in ipairs(iptables_attach(i)) do
      if a[2] ~= "-N" then lines[#lines + 1] = table.concat(a, " ", 2) end
    end
  end
  lines[#lines + 1] = "-A vm1 -p tcp -d 10.98.0.0/16 --dport 5201 -j ACCEPT"
  lines[#lines + 1] = "-A vm1 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
  lines[#lines + 1] = "-A vm1 -j DROP"
  lines[#lines + 1] = "-A FORWARD -i tap1 -j vm1"
  lines[#lines + 1] = "COMMIT\n"
  H.write_file(tmp, table.concat(lines, "\n"))
  sh(("ip netns exec %s iptables-restore %s"):format(t.host, tmp))
  rows[#rows + 1] = { "iptables, 1,000 VM chains", iperf() }
  sh(("ip netns exec %s iptables -F && ip netns exec %s iptables -X"):format(t.host, t.host))
  os.remove(tmp)
  print()
  print("throughput of one allowed TCP flow (iperf3, best of 3):")
  for _, r in ipairs(rows) do
    print(("  %-30s %8.2f Gbit/s %8.3f"):format(r[1], r[2] / 1e9, r[2] / rows[2][2]))
  end
end

-- ------------------------------------------------------------------------------------------

if inner then
  control_plane()
  return
end

if not H.is_root() then
  print("firewall benchmark: needs root")
  return
end
local N = require "netns"
local t = N.topology {}
local ok, err = pcall(function()
  print("== control plane (in namespace " .. t.host .. ")")
  local r = claw.proc.run { "ip", "netns", "exec", t.host, H.bin, src .. "/tests/bench/firewall.lua",
                            "--inner", quick and "--quick" or "--full", stdout = "inherit",
                            stderr = "inherit", env = { CLAWLUA_SRC = src, CLAWLUA_BENCH_ID = N.pid },
                            timeout = 3600 }
  assert(r and r.code == 0, "control-plane benchmark failed")
  if os.execute("command -v iperf3 >/dev/null") then
    print()
    print("== data plane")
    data_plane(t)
  else
    print("iperf3 not installed: data-plane benchmark skipped")
  end
end)
t:destroy()
if not ok then error(err, 0) end
