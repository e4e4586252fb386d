-- Sandbox network benchmark (root): net.create + net.close of a jail network, against the peer
-- of the same kernel objects made by hand with iproute2 and nft (one shell script: namespace,
-- veth, addresses, route, masquerade table; then their removal), and a DNS round trip through
-- the forwarder (cached answer) against one straight to the upstream. Runs in a namespace of its
-- own: it re-executes itself under `ip netns exec`.
--   build/bin/clawlua tests/bench/sandbox_net.lua [runs=20]
local claw = require "clawlua"

local RUNS = tonumber(arg and arg[1]) or 20
local NS = os.getenv("CLAWLUA_BENCH_NS")

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

if not NS then
  local f = io.open("/proc/self/status")
  local root = f and f:read("a"):match("Uid:%s+0%s") ~= nil
  if f then f:close() end
  if not root then
    print("sandbox_net bench skipped: needs root (network namespaces, nftables)")
    return
  end
  local ns = "clbench" .. tostring(math.random(1e6))
  local made = assert(claw.proc.run { "ip", "netns", "add", ns })
  assert(made.code == 0, made.stderr)
  local exe = arg[-1] or "clawlua"
  local r = claw.proc.run { "ip", "netns", "exec", ns, exe, arg[0], tostring(RUNS),
                            env = { CLAWLUA_BENCH_NS = ns }, stdout = "inherit", stderr = "inherit",
                            timeout = 600 }
  claw.proc.run { "ip", "netns", "del", ns }
  os.exit(r and r.code or 1)
end

local net = require "clawlua.sandbox.net"
local dns = require "clawlua.sandbox.dns"

claw.run(function()
  assert(claw.proc.run { "ip", "link", "set", "lo", "up" })
  -- an upstream on loopback answering every A query with one address
  local up = assert(claw.udp.open { host = "127.0.0.1" })
  local up_port = select(2, up:address())
  local server = claw.spawn(function()
    while true do
      local msg, host, port = up:recv()
      if not msg then return end
      local ans = msg:sub(1, 2) .. "\129\128" .. msg:sub(5, 6) .. "\0\1\0\0\0\0" .. msg:sub(13)
        .. "\192\12\0\1\0\1\0\0\14\16\0\4\198\51\100\7"
      up:send(ans, host, port)
    end
  end)
  server:set_daemon(true)

  local network = { egress = "deny", allow = { { host = "bench.test", port = 443 } },
                    resolvers = { "127.0.0.1:" .. up_port } }
  assert(net.create { id = "warm", kind = "jail", network = network }):close()
  local c_create, c_close, c_total = {}, {}, {}
  for i = 1, RUNS do
    local t0 = claw.now()
    local n = assert(net.create { id = "bench" .. i, kind = "jail", network = network })
    local t1 = claw.now()
    assert(n:close())
    local t2 = claw.now()
    c_create[#c_create + 1], c_close[#c_close + 1], c_total[#c_total + 1] = t1 - t0, t2 - t1, t2 - t0
  end

  local script = [[
set -e
ip -batch - <<EOF
netns add pb
link add pbh type veth peer name eth0 netns pb
addr add 10.214.0.1/30 dev pbh
link set pbh up
EOF
ip -n pb -batch - <<EOF
link set lo up
addr add 10.214.0.2/30 dev eth0
link set eth0 up
route add default via 10.214.0.1
EOF
nft -f - <<EOF
table inet pbnat {
  chain p {
    type nat hook postrouting priority srcnat;
    ip saddr 10.214.0.0/30 masquerade
  }
}
EOF
nft delete table inet pbnat
ip -batch - <<EOF
link del pbh
netns del pb
EOF
]]
  local peer = {}
  for _ = 1, RUNS do
    local t0 = claw.now()
    local r = assert(claw.proc.run { "sh", "-c", script, timeout = 30 })
    assert(r.code == 0, r.stderr)
    peer[#peer + 1] = claw.now() - t0
  end

  -- DNS: through a sandbox's forwarder (cached after the first query) vs straight upstream
  local n = assert(net.create { id = "bench-dns", kind = "jail", network = network })
  local gw = n:info().gateway
  local client = assert(claw.udp.open { host = "0.0.0.0" })
  local function rtt(host, port)
    local t0 = claw.now()
    assert(client:send(dns.query("bench.test", "A", 7), host, port))
    assert(client:recv(2))
    return claw.now() - t0
  end
  rtt(gw, 53)
  local via, direct = {}, {}
  for _ = 1, RUNS * 10 do
    via[#via + 1] = rtt(gw, 53)
    direct[#direct + 1] = rtt("127.0.0.1", up_port)
  end
  n:close()
  up:close()

  local mc, mk, mt, mp = median(c_create), median(c_close), median(c_total), median(peer)
  print(("net.create %.1f ms + close %.1f ms = %.1f ms; peer (ip + nft by hand, same objects) %.1f ms;"
         .. " ratio %.2fx"):format(mc * 1e3, mk * 1e3, mt * 1e3, mp * 1e3, mt / mp))
  local mv, md = median(via), median(direct)
  print(("DNS round trip via the forwarder (cached) %.0f us; straight to the upstream %.0f us;"
         .. " ratio %.2fx"):format(mv * 1e6, md * 1e6, mv / md))
end)
