-- Network topologies for tests, built from network namespaces and veth pairs that the test
-- creates and removes. Every name carries the test process's pid, so parallel runs never meet.
--
--   vm<i>  --eth0 ~~ tap<i>--  host  --up0 ~~ eth0--  net
--   10.200.<i>.2                10.200.<i>.1 / 10.99.0.1    10.99.0.2, and on lo: 10.98.0.1,
--   fd00:200:<i>::2             fd00:200:<i>::1 / fd99::1    10.98.0.2, 10.97.0.1, 10.98.0.53,
--                                                            169.254.169.254, fd98::1, fd98::2
--
-- "host" routes between the VMs and "net" and is where the firewall's rules go (the tap<i>
-- ends play the VMs' taps). "net" runs the listeners (tests/integration/netprobe.py serve).
-- Traffic only ever flows between these namespaces.
local claw = require "clawlua"
local json = require "clawlua.json"
local H = require "helper"

local N = {}

local function my_pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("a"):match("^(%d+)")
  f:close()
  return pid
end

N.pid = my_pid()
N.prefix = "clfw" .. N.pid .. "_"

--- A `sleep` duration of this run's own ("<seconds>.<from the pid>"), so that `pgrep -f` finds
--- only this run's sleepers: the host and stock runs of a spec go side by side.
---@param seconds integer
---@return string
function N.own_sleep(seconds) return ("%d.%d"):format(seconds, 1000 + tonumber(N.pid) % 9000) end
local serial = 0

--- Whether the machine can run these tests; the reason when not.
---@return boolean ok, string|nil reason
function N.available()
  if not H.is_root() then return false, "needs root (network namespaces, nftables)" end
  local _, r = H.sh("ip netns list && command -v python3 && command -v nft", { may_fail = true })
  if r.code ~= 0 then return false, "needs iproute2 (ip netns), python3 and nft" end
  return true
end

--- Namespaces whose name starts with prefix (default: every one this process made).
function N.leftovers(prefix)
  prefix = prefix or N.prefix
  local out = H.sh("ip netns list")
  local left = {}
  for name in out:gmatch("(%S+)[^\n]*\n?") do
    if name:sub(1, #prefix) == prefix then left[#left + 1] = name end
  end
  return left
end

local Topo = {}
Topo.__index = Topo

local function q(s) return "'" .. s .. "'" end

--- Builds a topology with opts.vms VM namespaces (default 1).
function N.topology(opts)
  opts = opts or {}
  serial = serial + 1
  local p = N.prefix .. serial
  local t = setmetatable({ prefix = p, host = p .. "h", net = p .. "n", vms = {}, procs = {},
                           nvms = opts.vms or 1, arrivals = {} }, Topo)
  for i = 1, t.nvms do t.vms[i] = p .. "v" .. i end
  local cmds = { "set -e" }
  -- Namespaces first, with duplicate address detection off, so that addresses (link-local
  -- ones too) are usable at once instead of after a second of DAD.
  for _, ns in ipairs { t.host, t.net, table.unpack(t.vms) } do
    cmds[#cmds + 1] = "ip netns add " .. ns
    cmds[#cmds + 1] = "ip netns exec " .. ns .. " sysctl -qw net.ipv6.conf.all.accept_dad=0"
      .. " net.ipv6.conf.default.accept_dad=0"
    cmds[#cmds + 1] = "ip -n " .. ns .. " link set lo up"
  end
  for _, c in ipairs {
    "ip netns exec " .. t.host .. " sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
      .. " net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0",
    ("ip -n %s link add up0 type veth peer name eth0 netns %s"):format(t.host, t.net),
    "ip -n " .. t.host .. " addr add 10.99.0.1/24 dev up0",
    "ip -n " .. t.host .. " addr add fd99::1/64 dev up0 nodad",
    "ip -n " .. t.host .. " link set up0 up",
    "ip -n " .. t.net .. " addr add 10.99.0.2/24 dev eth0",
    "ip -n " .. t.net .. " addr add fd99::2/64 dev eth0 nodad",
    "ip -n " .. t.net .. " link set eth0 up",
  } do cmds[#cmds + 1] = c end
  for _, a in ipairs { "10.98.0.1/32", "10.98.0.2/32", "10.97.0.1/32", "10.98.0.53/32",
                       "169.254.169.254/32" } do
    cmds[#cmds + 1] = "ip -n " .. t.net .. " addr add " .. a .. " dev lo"
  end
  for _, a in ipairs { "fd98::1/128", "fd98::2/128" } do
    cmds[#cmds + 1] = "ip -n " .. t.net .. " addr add " .. a .. " dev lo nodad"
  end
  cmds[#cmds + 1] = "ip -n " .. t.net .. " route add default via 10.99.0.1"
  cmds[#cmds + 1] = "ip -n " .. t.net .. " -6 route add default via fd99::1"
  for _, r in ipairs { "10.97.0.0/16", "10.98.0.0/16", "169.254.169.254/32" } do
    cmds[#cmds + 1] = "ip -n " .. t.host .. " route add " .. r .. " via 10.99.0.2"
  end
  cmds[#cmds + 1] = "ip -n " .. t.host .. " -6 route add fd98::/64 via fd99::2"
  for i, vm in ipairs(t.vms) do
    cmds[#cmds + 1] = ("ip -n %s link add tap%d type veth peer name eth0 netns %s"):format(t.host, i, vm)
    cmds[#cmds + 1] = ("ip -n %s link set eth0 address %s"):format(vm, t:vm_mac(i))
    cmds[#cmds + 1] = ("ip -n %s addr add 10.200.%d.1/24 dev tap%d"):format(t.host, i, i)
    cmds[#cmds + 1] = ("ip -n %s addr add fd00:200:%d::1/64 dev tap%d nodad"):format(t.host, i, i)
    cmds[#cmds + 1] = ("ip -n %s link set tap%d up"):format(t.host, i)
    cmds[#cmds + 1] = ("ip -n %s addr add %s/24 dev eth0"):format(vm, t:vm_ip(i))
    cmds[#cmds + 1] = ("ip -n %s addr add %s/64 dev eth0 nodad"):format(vm, t:vm_ip6(i))
    cmds[#cmds + 1] = ("ip -n %s link set eth0 up"):format(vm)
    cmds[#cmds + 1] = ("ip -n %s route add default via 10.200.%d.1"):format(vm, i)
    cmds[#cmds + 1] = ("ip -n %s -6 route add default via fd00:200:%d::1"):format(vm, i)
  end
  local ok, err = pcall(H.sh, table.concat(cmds, "\n"))
  if ok then
    -- Resolve every neighbour (ARP, NDP) once, before any rule exists: a probe's first packet
    -- then never waits for address resolution, and a short probe timeout is enough.
    ok, err = pcall(function()
      for i = 1, t.nvms do
        local r = t:probe(i, { { kind = "icmp", dst = "10.98.0.1", timeout = 3 },
                               { kind = "icmp", dst = "fd98::1", timeout = 3 } })
        assert(r[1].ok and r[2].ok, "topology: vm " .. i .. " cannot reach net")
      end
    end)
  end
  if not ok then
    t:destroy()
    error(err, 2)
  end
  return t
end

function Topo.vm_ip(_, i) return ("10.200.%d.2"):format(i) end
function Topo.vm_ip6(_, i) return ("fd00:200:%d::2"):format(i) end
function Topo.vm_mac(_, i) return ("02:00:00:00:%02x:02"):format(i) end

--- The MAC address of tap<i> (the host end), as the VM sees its gateway.
function Topo:tap_mac(i)
  return (H.sh(("ip -n %s -o link show tap%d"):format(self.host, i)):match("link/ether (%x+:%x+:%x+:%x+:%x+:%x+)"))
end

--- A spec for VM i with its interface and addresses, merged with extra fields.
function Topo:spec(i, extra)
  local s = { iface = "tap" .. i, ip = self:vm_ip(i), ip6 = self:vm_ip6(i), mac = self:vm_mac(i) }
  for k, v in pairs(extra or {}) do s[k] = v end
  return s
end

--- Runs argv inside namespace ns; returns proc.run's result.
function Topo.exec(_, ns, argv, opts)
  local cmd = { "ip", "netns", "exec", ns }
  for _, a in ipairs(argv) do cmd[#cmd + 1] = a end
  for k, v in pairs(opts or {}) do cmd[k] = v end
  cmd.timeout = cmd.timeout or 30
  return assert(claw.proc.run(cmd))
end

local PROBE = H.src .. "/tests/integration/netprobe.py"
-- The system interpreter: version managers' shims on PATH add a second of start-up each.
local PYTHON = io.open("/usr/bin/python3") and "/usr/bin/python3" or "python3"
N.python = PYTHON

--- Starts the listeners in "net" on the given ports. Arrivals are appended to self.arrivals as
--- {proto=, port=, src=, dst=, payload=}.
function Topo:serve(ports)
  local argv = { "ip", "netns", "exec", self.net, PYTHON, PROBE, "serve", stdout = "pipe",
                 stderr = "inherit" }
  for _, p in ipairs(ports) do argv[#argv + 1] = tostring(p) end
  local proc = assert(claw.proc.spawn(argv))
  self.procs[#self.procs + 1] = proc
  proc.stdout:set_timeout(15)
  assert(proc.stdout:read_line() == "ready", "netprobe serve did not start")
  proc.stdout:set_timeout(-1)
  local reader = claw.spawn(function()
    -- read_line in a loop, not stream:lines(): a for-iterator cannot yield, so lines() inside a
    -- task would run a nested loop and hold up every other wait.
    while true do
      local line = proc.stdout:read_line()
      if not line then break end
      local proto, port, src, dst, payload = line:match("^(%a+) (%d+) (%S+) (%S+) ?(.*)$")
      if proto then
        self.arrivals[#self.arrivals + 1] = { proto = proto, port = tonumber(port), src = src,
                                              dst = dst, payload = payload }
      end
    end
  end)
  reader:set_daemon(true)
  return proc
end

--- Arrivals matching every field of pattern.
function Topo:arrived(pattern)
  local n = 0
  for _, a in ipairs(self.arrivals) do
    local ok = true
    for k, v in pairs(pattern) do
      if k == "payload_prefix" then ok = ok and a.payload:sub(1, #v) == v
      elseif a[k] ~= v then ok = false end
    end
    if ok then n = n + 1 end
  end
  return n
end

--- Runs probes from VM i in parallel: {kind=, dst=, port=, timeout=}; returns their results.
function Topo:probe(i, probes)
  -- Probes run in Python against the kernel's datapath, which sanitizers do not slow down:
  -- their timeouts are not scaled.
  for _, p in ipairs(probes) do p.timeout = p.timeout or 1.0 end
  local r = self:exec(self.vms[i], { PYTHON, PROBE, "probe", json.encode(json.array(probes)) })
  assert(r.code == 0, "netprobe probe failed: " .. r.stderr)
  return json.decode(r.stdout)
end

--- Runs netprobe.py with args inside namespace ns (default: VM 1); returns its stdout.
function Topo:netprobe(ns, args, opts)
  local argv = { PYTHON, PROBE }
  for _, a in ipairs(args) do argv[#argv + 1] = tostring(a) end
  local r = self:exec(ns or self.vms[1], argv, opts)
  assert(r.code == 0, "netprobe " .. args[1] .. " failed: " .. r.stderr)
  return r.stdout
end

--- nft in the host namespace.
function Topo:nft(args, may_fail)
  return H.sh("ip netns exec " .. self.host .. " nft " .. args, { may_fail = may_fail })
end

--- The ruleset of the host namespace as nft's JSON.
function Topo:ruleset_json()
  return json.decode((self:nft("-j list ruleset"))).nftables
end

--- Removes every process and namespace of the topology. Safe to call twice.
function Topo:destroy()
  for _, p in ipairs(self.procs) do
    if p:running() then p:kill("KILL", "group") end
    p:wait(5)
    p:close()
  end
  self.procs = {}
  local names = { self.host, self.net }
  for _, vm in ipairs(self.vms) do names[#names + 1] = vm end
  for _, n in ipairs(names) do
    H.sh("ip netns del " .. q(n) .. " 2>/dev/null", { may_fail = true })
  end
end

return N
