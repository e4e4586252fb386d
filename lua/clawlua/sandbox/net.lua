-- clawlua.sandbox.net: a sandbox's network. Per sandbox: a /30 from a pool (checked against
-- the routes of the namespace clawlua runs in), the host side address on the sandbox's
-- interface (a VM's tap, or a veth whose peer lives in a network namespace made for a jail),
-- IPv4 forwarding, masquerade towards whatever the namespace routes to (its uplink), the
-- firewall's chains for the interface (clawlua.firewall: egress as the policy says, DNS only to
-- the forwarder, the metadata address dropped, drops audited as fw.drop with the sandbox id),
-- and a DNS forwarder (clawlua.sandbox.dns) that is the sandbox's only resolver and pins what
-- it answers for allowed names into the firewall for the answer's TTL. Every kernel object is
-- announced to `record(kind, name)` before it is made and to `forget(kind, name)` after it is
-- gone; `net.cleanup(kind, name)` removes one left behind by a runtime that died.
local claw = require "clawlua"
local json = require "clawlua.json"
local dns = require "clawlua.sandbox.dns"
local state = require "clawlua.sandbox.state"

local M = {}

local config = {
  pool = "10.213.0.0/16",
  table = "clawlua",        -- the firewall's table (shared with other users of clawlua.firewall)
  log_group = 7213,         -- NFLOG group of the firewall's drop log
  min_pin = 10, max_pin = 3600, max_pins = 1024,
  rundir = nil,             -- where resolv.conf files go (default: /run/clawlua/net or XDG)
}

--- Changes module-wide settings (before the first sandbox): `pool` ("A.B.C.D/N", N <= 30),
--- `table`, `log_group`, `min_pin`/`max_pin` (seconds a DNS answer's addresses stay pinned,
--- clamped from its TTL), `max_pins` (addresses pinned per sandbox), `rundir`.
---@param opts table
function M.configure(opts)
  for k, v in pairs(opts) do
    if config[k] == nil and k ~= "rundir" then error(("bad field '%s' (unknown field)"):format(k), 2) end
    config[k] = v
  end
end

-- ---------------------------------------------------------------------------------------------
-- Small helpers

local function run(argv, opts)
  argv.timeout = argv.timeout or 15
  for k, v in pairs(opts or {}) do argv[k] = v end
  local r, err = claw.proc.run(argv)
  if not r then return nil, err end
  if r.code ~= 0 then
    return nil, ("%s: %s"):format(table.concat(argv, " ", 1, math.min(#argv, 6)),
                                  (r.stderr ~= "" and r.stderr or r.stdout):gsub("%s+$", ""))
  end
  return r.stdout
end

local function ip4_parse(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function ip4_text(n)
  return ("%d.%d.%d.%d"):format((n >> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255)
end

local function cidr_parse(s)
  local a, len = s:match("^([%d.]+)/(%d+)$")
  if not a then a, len = s, "32" end
  local n = ip4_parse(a)
  len = tonumber(len)
  if not n or len > 32 then return nil end
  local mask = len == 0 and 0 or (0xFFFFFFFF << (32 - len)) & 0xFFFFFFFF
  return n & mask, len
end

local function overlaps(a, alen, b, blen)
  local len = math.min(alen, blen)
  local mask = len == 0 and 0 or (0xFFFFFFFF << (32 - len)) & 0xFFFFFFFF
  return a & mask == b & mask
end

local function token()
  local f = io.open("/dev/urandom", "rb")
  local b = f:read(4)
  f:close()
  return ("%02x%02x%02x%02x"):format(b:byte(1, 4))
end

local function bad(field, msg, level) error(("bad field '%s' (%s)"):format(field, msg), level or 3) end

-- ---------------------------------------------------------------------------------------------
-- Policy: network = {egress = "deny"|"allow", allow = {...}, resolvers = {...}}

local PROTOS = { tcp = true, udp = true, icmp = true, any = true }

local function check_port(p, field)
  if math.type(p) == "integer" then
    if p < 1 or p > 65535 then bad(field, "a port 1..65535 expected") end
    return p
  end
  if type(p) == "string" then
    local lo, hi = p:match("^(%d+)%-(%d+)$")
    if not lo then lo = p:match("^(%d+)$"); hi = lo end
    lo, hi = tonumber(lo), tonumber(hi)
    if lo and lo >= 1 and hi <= 65535 and lo <= hi then return lo == hi and lo or p end
  end
  bad(field, "a port (443) or range (\"8000-8100\") expected, got " .. tostring(p))
end

local function check_cidr(s, field)
  if s:find(":") then
    local a, len = s:match("^([%x:.]+)/?(%d*)$")
    if a and (len == "" or tonumber(len) <= 128) then return s end
  elseif cidr_parse(s) then
    return s
  end
  bad(field, ("'%s' is not an address or network"):format(s))
end

-- One allow entry as {cidr=|host=, proto=, port=}. Strings: "198.51.100.10:80/tcp",
-- "10.1.0.0/16", "[fd00::1]:443/tcp", "pypi.org:443", "*.example.com".
local function parse_entry(e, field)
  local out = {}
  if type(e) == "string" then
    local s = e
    local proto = s:match("/(%a+)$")
    if proto then s = s:sub(1, -#proto - 2); out.proto = proto end
    local h6, p6 = s:match("^%[([%x:.]+)%]:?([%d-]*)$")
    if h6 then
      s = h6
      if p6 ~= "" then out.port = p6 end
    elseif not s:find(":.*:") then
      local h, p = s:match("^(.-):([%d-]+)$")
      if h then s, out.port = h, p end
    end
    if s:match("^[%d.]+/?%d*$") or s:find(":") then out.cidr = s else out.host = s end
  elseif type(e) == "table" then
    for k in pairs(e) do
      if k ~= "host" and k ~= "cidr" and k ~= "port" and k ~= "proto" then
        bad(field .. "." .. tostring(k), "unknown field")
      end
    end
    out.host, out.cidr, out.port, out.proto = e.host, e.cidr, e.port, e.proto
    if (out.host == nil) == (out.cidr == nil) then bad(field, "one of 'host' or 'cidr' expected") end
  else
    bad(field, "a string or table expected, got " .. type(e))
  end
  if out.host ~= nil then
    local name, why = dns.check_name(out.host)
    if not name then bad(field, why) end
    out.host = name
  else
    if type(out.cidr) ~= "string" then bad(field, "'cidr' must be a string") end
    out.cidr = check_cidr(out.cidr, field)
  end
  if out.port ~= nil then
    if type(out.port) == "string" and out.port:match("^%d+$") then out.port = tonumber(out.port) end
    out.port = check_port(out.port, field .. ".port")
  end
  if out.proto ~= nil and not PROTOS[out.proto] then
    bad(field .. ".proto", "tcp, udp, icmp or any expected, got " .. tostring(out.proto))
  end
  if out.port ~= nil and out.proto == nil then out.proto = "tcp" end
  if out.port ~= nil and out.proto == "icmp" then bad(field, "a port needs tcp, udp or any") end
  return out
end

local function host_resolvers()
  local list = {}
  local f = io.open("/etc/resolv.conf")
  if f then
    for line in f:lines() do
      local a = line:match("^%s*nameserver%s+(%S+)")
      if a then list[#list + 1] = a end
    end
    f:close()
  end
  return list
end

--- Validates a policy's network table; returns a normalised copy. Raises `bad field
--- 'network.<...>' (...)` on misuse.
---@param network table|nil
---@return table
function M.check_network(network)
  network = network or {}
  if type(network) ~= "table" then bad("network", "a table expected, got " .. type(network)) end
  for k in pairs(network) do
    if k ~= "egress" and k ~= "allow" and k ~= "resolvers" then bad("network." .. tostring(k), "unknown field") end
  end
  local egress = network.egress or "deny"
  if egress ~= "deny" and egress ~= "allow" then
    bad("network.egress", "\"deny\" or \"allow\" expected, got " .. tostring(egress))
  end
  local out = { egress = egress, allow = {}, resolvers = {} }
  local allow = network.allow or {}
  if type(allow) ~= "table" then bad("network.allow", "a list expected") end
  if #allow > 256 then bad("network.allow", "more than 256 entries") end
  for i, e in ipairs(allow) do out.allow[i] = parse_entry(e, ("network.allow[%d]"):format(i)) end
  local res = network.resolvers or host_resolvers()
  if type(res) ~= "table" then bad("network.resolvers", "a list expected") end
  for i, r in ipairs(res) do
    local host = type(r) == "string" and (r:match("^%[(.+)%]:%d+$") or r:match("^([%d.]+):%d+$") or r)
    if type(r) ~= "string" or not (ip4_parse(host) or host:find(":")) then
      bad(("network.resolvers[%d]"):format(i), "an address expected, got " .. tostring(r))
    end
    out.resolvers[i] = r
  end
  return out
end

-- ---------------------------------------------------------------------------------------------
-- Shared state of this runtime: the firewall handle, the subnets in use, forwarding

local fw_handle
local used = {}        -- subnet base -> true
local open_nets = setmetatable({}, { __mode = "k" })
local made_dirs = {}
local shutdown_hooked = false
local forwarding = { users = 0, changed = false }

-- An NFLOG group has one listener per network namespace: a runtime whose default group is
-- taken by another one in the same namespace takes the next free one (of 64); a group set with
-- configure{log_group=} is used as it is or fails.
local DEFAULT_LOG_GROUP, LOG_GROUPS = config.log_group, 64

local function firewall()
  if not fw_handle then
    local group, last = config.log_group, config.log_group
    if group == DEFAULT_LOG_GROUP then last = group + LOG_GROUPS - 1 end
    local f, err
    for g = group, last do
      f, err = claw.firewall.open { table = config.table, log_group = g }
      if f or not tostring(err):find("is taken by another listener", 1, true) then break end
    end
    if not f then return nil, err end
    fw_handle = f
  end
  return fw_handle
end

-- The IPv4 prefixes routed in this namespace (every table: an address on lo has its route only
-- in the local one), as {base, len}.
local function routes()
  local out, err = run { "ip", "-4", "-j", "route", "show", "table", "all" }
  if not out then return nil, err end
  local list = {}
  for _, r in ipairs(json.decode(out) or {}) do
    local dst = r.dst
    if dst and dst ~= "default" then
      local base, len = cidr_parse(dst)
      if base then list[#list + 1] = { base, len } end
    end
  end
  return list
end

local function read_file(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function write_file(path, data)
  local f, err = io.open(path, "w")
  if not f then return nil, err end
  f:write(data)
  f:close()
  return true
end

local function state_dir()
  if config.rundir then return config.rundir end
  local f = io.open("/proc/self/status")
  local uid = f and f:read("a"):match("Uid:%s+(%d+)")
  if f then f:close() end
  local xdg = os.getenv("XDG_RUNTIME_DIR")
  if uid ~= "0" and xdg and xdg ~= "" then return xdg .. "/clawlua/net" end
  return "/run/clawlua/net"
end

-- The run dir, made once per process.
local function run_dir()
  local dir = state_dir()
  if not made_dirs[dir] then
    local ok, err = run { "mkdir", "-p", dir }
    if not ok then return nil, err end
    made_dirs[dir] = true
  end
  return dir
end

-- Subnets taken by the runtimes sharing this run dir: <rundir>/subnets, a line "base pid start"
-- per /30, read and rewritten only under an exclusive flock of <rundir>/subnets.lock (two
-- runtimes creating sandboxes at the same moment must not pick the same /30: a route shows a
-- subnet only once its address is made, a VM's only after it booted). A line whose runtime is
-- gone (killed) counts as free and is dropped at the next change.
local function with_subnets(dir, fn)
  local deadline = claw.now() + 10
  while true do
    local lock, err, code = claw.proc.try_lock(dir .. "/subnets.lock")
    if lock then
      local taken = {}
      for b, pid, start in (read_file(dir .. "/subnets") or ""):gmatch("(%d+) (%d+) (%d+)\n") do
        pid, start = math.tointeger(tonumber(pid)), math.tointeger(tonumber(start))
        if state.alive(pid, start) then taken[math.tointeger(tonumber(b))] = { pid, start } end
      end
      local ok, res, ferr = pcall(fn, taken)
      local wok, werr = true, nil
      if ok then
        local lines = {}
        for b, o in pairs(taken) do lines[#lines + 1] = ("%d %d %d\n"):format(b, o[1], o[2]) end
        local tmp = ("%s/subnets.%d"):format(dir, state.self())
        wok, werr = write_file(tmp, table.concat(lines))
        if wok then wok, werr = os.rename(tmp, dir .. "/subnets") end
      end
      lock:unlock()
      if not ok then error(res, 0) end
      if not wok then return nil, "net: subnets of " .. dir .. ": " .. tostring(werr) end
      return res, ferr
    end
    if code ~= "EWOULDBLOCK" then return nil, "net: subnet lock " .. err end
    if claw.now() > deadline then return nil, "net: subnet lock " .. err .. " for 10 s" end
    claw.sleep(0.002)
  end
end

-- A free /30 in the pool: not used by this runtime nor recorded by another, overlapping no route
-- at least as specific as the pool (broader routes, a default route, are shadowed by ours).
local function allocate(dir)
  local pbase, plen = cidr_parse(config.pool)
  if not pbase or plen > 30 then bad("pool", "an IPv4 network of /30 or larger expected", 2) end
  local b, err = with_subnets(dir, function(taken)
    local rs, rerr = routes()
    if not rs then return nil, rerr end
    local count = 1 << (30 - plen)
    local start = math.random(0, count - 1)
    for i = 0, count - 1 do
      local base = pbase + ((start + i) % count) * 4
      local free = not used[base] and not taken[base]
      for _, r in ipairs(rs) do
        if free and r[2] >= plen and overlaps(base, 30, r[1], r[2]) then free = false end
      end
      if free then
        taken[base] = { state.self() }
        return base
      end
    end
    return nil, "net: no free /30 left in " .. config.pool
  end)
  if b then used[b] = true end
  return b, err
end

local function release_subnet(dir, base)
  used[base] = nil
  return with_subnets(dir, function(taken)
    taken[base] = nil
    return true
  end)
end

local FORWARD = "/proc/sys/net/ipv4/ip_forward"

local function forwarding_on(rec)
  if forwarding.users == 0 and (read_file(FORWARD) or ""):match("^0") then
    rec("sysctl", "net.ipv4.ip_forward")
    local ok, err = write_file(FORWARD, "1\n")
    if not ok then return nil, "net: enabling IPv4 forwarding: " .. tostring(err) end
    forwarding.changed = true
  end
  forwarding.users = forwarding.users + 1
  return true
end

local function forwarding_off(forget)
  forwarding.users = forwarding.users - 1
  if forwarding.users == 0 and forwarding.changed then
    write_file(FORWARD, "0\n")
    forwarding.changed = false
    forget("sysctl", "net.ipv4.ip_forward")
  end
end


-- ---------------------------------------------------------------------------------------------
-- The handle

local Net = {}
Net.__index = Net

local function nop() end

--- Creates a sandbox's network. opts: `id` (the sandbox id: firewall attachment, audit),
--- `network` (the policy's network table), `kind` ("jail": a namespace with a veth is made
--- now; "vm": the host side is set up by `attach(tap)` once the VM's tap exists), `record`,
--- `forget` (called with kind and name around every kernel object). Returns the handle or
--- nil and a message; nothing is left behind on failure.
---@param opts {id: string, network: table, kind: "jail"|"vm", record?: fun(kind: string, name: string),
---  forget?: fun(kind: string, name: string)}
---@return table|nil net, string|nil err
function M.create(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'create' (table expected)", 2) end
  if type(opts.id) ~= "string" or not opts.id:match("^[%w_.-]+$") then
    bad("id", "a sandbox id of [A-Za-z0-9_.-] expected", 2)
  end
  if opts.kind ~= "jail" and opts.kind ~= "vm" then bad("kind", "\"jail\" or \"vm\" expected", 2) end
  local network = M.check_network(opts.network)
  local tok = token()
  local self = setmetatable({
    id = opts.id, kind = opts.kind, network = network, tok = tok,
    record = opts.record or nop, forget = opts.forget or nop,
    owned = {},   -- {kind, name, undo} in the order made
    pins = {},    -- address -> {expires=, hosts = {pattern = true}}
    npins = 0,
  }, Net)
  -- The shared firewall tables (made by the first firewall() of the runtime) are written down
  -- too: a runtime killed before its first "fw" object leaves them for `clawlua cleanup`, which
  -- drops them once nobody is attached.
  self.record("fwtables", config.table)
  local fw, err = firewall()
  local dir, base
  if fw then dir, err = run_dir() end
  if dir then base, err = allocate(dir) end
  if not base then
    self.forget("fwtables", config.table)
    return nil, err
  end
  self.base, self.rundir = base, dir
  self.gateway = ip4_text(base + 1)
  self.address = ip4_text(base + 2)
  self.prefix = 30
  self.mac = ("02:c1:%s:%s:%s:%s"):format(tok:sub(1, 2), tok:sub(3, 4), tok:sub(5, 6), tok:sub(7, 8))
  local ok
  if self.kind == "jail" then
    ok, err = self:make_jail_ns()
    if ok then ok, err = self:attach("clv" .. tok, { mac = self.mac }) end
  else
    ok = true
  end
  if not ok then
    self:close()
    return nil, err
  end
  open_nets[self] = true
  if not shutdown_hooked then
    -- SIGINT/SIGTERM: every network is taken down while the loop still runs
    shutdown_hooked = true
    claw.on_shutdown(function()
      for n in pairs(open_nets) do n:close() end
    end)
  end
  self:audit("net.create", { address = self.address, gateway = self.gateway, kind = self.kind })
  return self
end

function Net:audit(kind, fields)
  fields.sandbox = self.id
  claw.audit.emit(kind, fields)
end

-- Records and makes one kernel object; undo removes it. Returns true or nil, err.
function Net:make(kind, name, doit, undo)
  self.record(kind, name)
  local pok, ok, err = pcall(doit)
  if not pok then ok, err = nil, ok end
  if not ok then
    -- a half-made object (a link made but not configured) goes too
    pcall(undo)
    self.forget(kind, name)
    return nil, err
  end
  self.owned[#self.owned + 1] = { kind = kind, name = name, undo = undo }
  return true
end

function Net:make_jail_ns()
  local ns, host = "clw-" .. self.tok, "clv" .. self.tok
  local cidr = self.gateway .. "/30"
  -- One `ip` process makes the namespace, the veth pair (the peer moved into the namespace) and
  -- the host side's address; a second configures the inside. Each object is recorded first;
  -- one undo (also one process) takes them all down: the link explicitly, because the kernel
  -- dismantles a deleted namespace's devices asynchronously.
  self.record("netns", ns)
  self.record("link", host)
  self.record("addr", host .. " " .. cidr)
  local undo = function()
    return run({ "ip", "-force", "-batch", "-" }, { stdin = ("link del %s\nnetns del %s\n"):format(host, ns) })
  end
  local ok, err = run({ "ip", "-batch", "-" }, { stdin = table.concat({
    "netns add " .. ns,
    ("link add %s type veth peer name eth0 netns %s"):format(host, ns),
    ("addr add %s dev %s"):format(cidr, host),
    "link set " .. host .. " up",
  }, "\n") .. "\n" })
  if ok then
    -- inside: the address, the default route through the host side, lo; no IPv6 address at all
    -- (addrgenmode none: the sandbox network is IPv4 only, and the jail cannot add one)
    ok, err = run({ "ip", "-n", ns, "-batch", "-" }, { stdin = table.concat({
      "link set lo up",
      "link set eth0 address " .. self.mac .. " addrgenmode none",
      ("addr add %s/30 dev eth0"):format(self.address),
      "link set eth0 up",
      "route add default via " .. self.gateway,
    }, "\n") .. "\n" })
  end
  if not ok then
    undo()
    for _, o in ipairs { { "addr", host .. " " .. cidr }, { "link", host }, { "netns", ns } } do
      self.forget(o[1], o[2])
    end
    return nil, err
  end
  local owned = self.owned
  owned[#owned + 1] = { kind = "netns", name = ns, undo = undo }
  owned[#owned + 1] = { kind = "link", name = host, undo = nop }
  owned[#owned + 1] = { kind = "addr", name = host .. " " .. cidr, undo = nop }
  self.host_addr = true
  self.netns = ns
  self.netns_path = "/run/netns/" .. ns
  local path = ("%s/%s.resolv.conf"):format(self.rundir, self.tok)
  ok, err = self:make("file", path, function()
    return write_file(path, ("# clawlua sandbox %s\nnameserver %s\noptions attempts:2 timeout:2\n")
                              :format(self.id, self.gateway))
  end, function() return os.remove(path) end)
  if not ok then return nil, err end
  self.resolv_conf = path
  return true
end

-- The firewall spec of the current policy and pins.
function Net:spec()
  local net = self.network
  local allow = {}
  for _, e in ipairs(net.allow) do
    if e.cidr then
      allow[#allow + 1] = { cidr = e.cidr, proto = e.proto, port = e.port }
    else
      local addrs = {}
      for addr, p in pairs(self.pins) do
        if p.hosts[e.host] then addrs[#addrs + 1] = addr end
      end
      table.sort(addrs)
      if #addrs > 0 then allow[#allow + 1] = { cidr = addrs, proto = e.proto, port = e.port } end
    end
  end
  local spec = {
    iface = self.ifname, ip = self.address, dns = { self.gateway },
    egress = { policy = net.egress == "allow" and "accept" or "drop", allow = allow },
    log = true,
  }
  if self.attach_mac then spec.mac = self.attach_mac end
  return spec
end

--- Sets up the host side on ifname (a VM's tap): address, link up, masquerade, the firewall's
--- chains, forwarding, the DNS forwarder. opts.mac: the guest's MAC (anti-spoofing).
---@param ifname string
---@param opts? {mac?: string}
---@return true|nil ok, string|nil err
function Net:attach(ifname, opts)
  if self.closed then error("attempt to use a closed sandbox network", 2) end
  if type(ifname) ~= "string" or not ifname:match("^[%w_.-]+$") or #ifname > 15 then
    bad("ifname", "an interface name expected", 2)
  end
  if self.ifname then error("net: already attached to " .. self.ifname, 2) end
  self.ifname = ifname
  self.attach_mac = opts and opts.mac
  local cidr = self.gateway .. "/30"
  local ok, err = true, nil
  if not self.host_addr then -- a jail's veth has it already
    ok, err = self:make("addr", ifname .. " " .. cidr, function()
      local script = ("addr add %s dev %s\nlink set %s up\n"):format(cidr, ifname, ifname)
      return run({ "ip", "-batch", "-" }, { stdin = script })
    end, function() return run { "ip", "addr", "del", cidr, "dev", ifname } end)
  end
  if not ok then return self:attach_failed(err) end
  ok, err = self:make("sysctl", "net.ipv4.ip_forward", function()
    return forwarding_on(nop)
  end, function() forwarding_off(nop) return true end)
  if not ok then return self:attach_failed(err) end
  -- A table of its own per sandbox, so it is made and removed in one step and a crashed
  -- runtime's leftover is one name: masquerade towards the uplink, and the host itself reached
  -- from the sandbox only at the DNS forwarder (the firewall's chains decide what is forwarded;
  -- without this, egress = "allow" would open every service listening on the host).
  local tbl = "clawlua_net_" .. self.tok
  ok, err = self:make("nft", "inet " .. tbl, function()
    return run({ "nft", "-f", "-" }, { stdin = ([[
table inet %s {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr %s/30 oifname != "%s" counter masquerade comment "sandbox %s"
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "%s" ip daddr %s udp dport 53 counter accept comment "DNS forwarder"
    iifname "%s" counter drop comment "nothing else on the host"
  }
}
]]):format(tbl, ip4_text(self.base), ifname, self.id, ifname, self.gateway, ifname) })
  end, function() return run { "nft", "delete", "table", "inet", tbl } end)
  if not ok then return self:attach_failed(err) end
  local fw = firewall()
  ok, err = self:make("fw", self.id, function()
    return fw:attach(self.id, self:spec())
  end, function() return fw:detach(self.id) end)
  if not ok then return self:attach_failed(err) end
  local fwd
  fwd, err = dns.start {
    host = self.gateway, port = 53, upstreams = self.network.resolvers, sandbox = self.id,
    max_ttl = config.max_pin,
    allowed = function(name) return self:name_allowed(name) end,
    pin = function(name, addrs) return self:pin(name, addrs) end,
  }
  if not fwd then return self:attach_failed("net: DNS forwarder: " .. tostring(err)) end
  self.dns = fwd
  self:audit("net.attach", { ifname = ifname, gateway = self.gateway, address = self.address })
  return true
end

function Net:attach_failed(err)
  self:release()
  self.ifname = nil
  return nil, err
end

function Net:name_allowed(name)
  if self.network.egress == "allow" then return true end
  for _, e in ipairs(self.network.allow) do
    if e.host and dns.match(name, e.host) then return true end
  end
  return false
end

-- Pins the addresses of an allowed answer into the firewall until their TTL ends.
function Net:pin(name, addrs)
  if self.network.egress == "allow" then return true end
  local patterns = {}
  for _, e in ipairs(self.network.allow) do
    if e.host and dns.match(name, e.host) then patterns[e.host] = true end
  end
  local now, changed = claw.now(), false
  for _, a in ipairs(addrs) do
    local ttl = math.max(config.min_pin, math.min(config.max_pin, a.ttl))
    local p = self.pins[a.addr]
    if not p then
      if self.npins >= config.max_pins then return nil, "more than " .. config.max_pins .. " pinned addresses" end
      p = { expires = 0, hosts = {} }
      self.pins[a.addr] = p
      self.npins = self.npins + 1
    end
    for h in pairs(patterns) do
      if not p.hosts[h] then p.hosts[h] = true; changed = true end
    end
    p.expires = math.max(p.expires, now + ttl)
  end
  if changed then
    local ok, err = self:apply()
    if not ok then return nil, err end
  end
  self:schedule_expiry()
  return true
end

function Net:apply()
  if not self.ifname or self.closed then return true end
  local ok, err = firewall():update(self.id, self:spec())
  if not ok then return nil, err end
  return true
end

-- One task per sandbox removes pins whose TTL has passed.
function Net:schedule_expiry()
  if self.expiry_task and not self.expiry_task:done() then return end
  self.expiry_task = claw.spawn(function()
    while not self.closed and self.npins > 0 do
      local now, next_at, changed = claw.now(), math.huge, false
      for addr, p in pairs(self.pins) do
        if p.expires <= now then
          self.pins[addr] = nil
          self.npins = self.npins - 1
          changed = true
        else
          next_at = math.min(next_at, p.expires)
        end
      end
      if changed then self:apply() end
      if next_at < math.huge then claw.sleep(math.max(0.05, next_at - claw.now())) end
    end
  end)
  self.expiry_task:set_daemon(true)
end

--- Options merged into clawlua.jail.spawn's: the namespace to join and /etc/resolv.conf.
---@return table
function Net:jail_options()
  if self.kind ~= "jail" then error("net: jail_options() of a vm network", 2) end
  if self.closed then error("attempt to use a closed sandbox network", 2) end
  return { net = self.netns_path, binds = { { src = self.resolv_conf, dst = "/etc/resolv.conf" } } }
end

--- Options for vm.create: the guest agent configures eth0 and /etc/resolv.conf from
--- `clawlua.net=ADDRESS/LEN,GATEWAY,DNS` on the kernel command line.
---@return table
function Net:vm_options()
  if self.closed then error("attempt to use a closed sandbox network", 2) end
  -- boot_args for a cold boot (the guest agent reads them); guest for a VM restored from a
  -- template or taken from a pool, which the VM backend configures through the agent instead
  return { boot_args = ("clawlua.net=%s/%d,%s,%s"):format(self.address, self.prefix, self.gateway,
                                                          self.gateway),
           guest = { address = ("%s/%d"):format(self.address, self.prefix), gateway = self.gateway,
                     resolvers = { self.gateway }, iface = "eth0" } }
end

--- Replaces the network policy in one firewall batch (packets see the old or the new rules);
--- pins of names no longer allowed are dropped, the forwarder's cache is flushed.
---@param network table
---@return true|nil ok, string|nil err
function Net:update(network)
  if self.closed then error("attempt to use a closed sandbox network", 2) end
  local checked = M.check_network(network)
  local old, old_pins, old_n = self.network, self.pins, self.npins
  self.network = checked
  local pins, n = {}, 0
  for addr, p in pairs(old_pins) do
    local hosts = {}
    for _, e in ipairs(checked.allow) do
      if e.host and p.hosts[e.host] then hosts[e.host] = true end
    end
    if next(hosts) then pins[addr] = { expires = p.expires, hosts = hosts }; n = n + 1 end
  end
  self.pins, self.npins = pins, n
  local ok, err = self:apply()
  if not ok then
    self.network, self.pins, self.npins = old, old_pins, old_n
    return nil, err
  end
  if self.dns then
    self.dns.upstreams = {}
    for i, r in ipairs(checked.resolvers) do
      local h, p = r:match("^%[(.+)%]:(%d+)$")
      if not h then h, p = r:match("^([%d.]+):(%d+)$") end
      self.dns.upstreams[i] = { host = h or r, port = tonumber(p) or 53 }
    end
    self.dns:flush()
  end
  self:audit("net.update", { egress = checked.egress, allow = #checked.allow })
  return true
end

--- `{address, gateway, prefix, dns, ifname, netns, mac, egress, allowed = {entries},
--- pinned = {{addr, hosts, expires_in}}, dns_stats}`.
---@return table
function Net:info()
  local allowed = {}
  for i, e in ipairs(self.network.allow) do
    allowed[i] = { host = e.host, cidr = e.cidr, port = e.port, proto = e.proto }
  end
  local pinned, now = {}, claw.now()
  for addr, p in pairs(self.pins) do
    local hosts = {}
    for h in pairs(p.hosts) do hosts[#hosts + 1] = h end
    table.sort(hosts)
    pinned[#pinned + 1] = { addr = addr, hosts = hosts, expires_in = math.max(0, p.expires - now) }
  end
  table.sort(pinned, function(a, b) return a.addr < b.addr end)
  return { address = self.address, gateway = self.gateway, prefix = self.prefix,
           dns = self.gateway, ifname = self.ifname, netns = self.netns, mac = self.mac,
           egress = self.network.egress, allowed = allowed, pinned = pinned,
           resolvers = self.network.resolvers, dns_stats = self.dns and self.dns:stats(),
           closed = self.closed or nil }
end

-- Releases everything made, newest first.
function Net:release()
  if self.dns then
    self.dns:close()
    self.dns = nil
  end
  local errs = {}
  for i = #self.owned, 1, -1 do
    local o = self.owned[i]
    local ok, a, b = pcall(o.undo)
    if not ok or (a == nil and b ~= nil) then
      -- an object that went with another one (the address with a VM's tap) is not an error
      local msg = tostring(ok and b or a)
      if not msg:find("Cannot find device") and not msg:find("No such") and not msg:find("not found") then
        errs[#errs + 1] = o.kind .. " " .. o.name .. ": " .. msg
      end
    end
    self.forget(o.kind, o.name)
    self.owned[i] = nil
  end
  return errs
end

--- Removes everything the network owns. Idempotent.
---@return true|nil ok, string|nil err
function Net:close()
  if self.closed then return true end
  self.closed = true
  if self.expiry_task and not self.expiry_task:done() then self.expiry_task:cancel() end
  local errs = self:release()
  self.forget("fwtables", config.table)
  if self.base then
    local ok, err = release_subnet(self.rundir, self.base)
    if not ok then errs[#errs + 1] = err end
  end
  open_nets[self] = nil
  self:audit("net.close", { errors = #errs > 0 and errs or nil })
  if #errs > 0 then return nil, "net: close: " .. table.concat(errs, "; ") end
  return true
end
Net.__close = Net.close
-- Collected unclosed: closing runs processes and waits, which a finaliser cannot, so a task on
-- the loop does it (the task keeps the handle alive until then).
Net.__gc = function(self)
  if not self.closed then pcall(claw.spawn, function() self:close() end) end
end

--- Removes one object recorded by a runtime that is gone: kind is what `record` was given
--- ("netns", "link", "addr", "nft", "fw", "fwtables", "file", "sysctl"), name likewise.
--- Something already gone counts as removed. "fwtables" (the shared tables) is left to
--- `drop_idle_firewall`, which drops them only when no sandbox of anyone is attached.
---@param kind string
---@param name string
---@return true|nil ok, string|nil err
function M.cleanup(kind, name)
  local ok, err
  if kind == "netns" then
    ok, err = run { "ip", "netns", "del", name }
  elseif kind == "link" then
    ok, err = run { "ip", "link", "del", name }
  elseif kind == "addr" then
    local ifname, cidr = name:match("^(%S+) (%S+)$")
    if not ifname then error("bad argument #2 to 'cleanup' (\"IFNAME CIDR\" expected)", 2) end
    ok, err = run { "ip", "addr", "del", cidr, "dev", ifname }
  elseif kind == "nft" then
    local family, tbl = name:match("^(%a+) (clawlua_net_%x+)$")
    if not family then error("bad argument #2 to 'cleanup' (a clawlua_net_ table expected)", 2) end
    ok, err = run { "nft", "delete", "table", family, tbl }
  elseif kind == "fw" then
    local fw
    fw, err = firewall()
    if fw then ok, err = fw:detach(name) end
  elseif kind == "file" then
    ok, err = os.remove(name)
  elseif kind == "sysctl" or kind == "fwtables" then
    -- forwarding stays on: another runtime's sandboxes may route through it now
    return true
  else
    error(("bad argument #1 to 'cleanup' (unknown kind '%s')"):format(tostring(kind)), 2)
  end
  if ok then return true end
  err = tostring(err)
  if err:find("Cannot find") or err:find("No such") or err:find("not found") or err:find("does not exist")
      or err:find("not attached") then
    return true
  end
  return nil, err
end

--- After `clawlua cleanup` reclaimed a dead runtime's firewall objects: deletes the shared
--- firewall tables (inet and arp `config.table`) when no VM of any runtime is attached to them
--- (the kernel's view: adopted chains count), so the namespace's ruleset is as before the
--- runtime. Returns true and whether they were deleted, or nil, err.
---@return true|nil ok, boolean|string deleted_or_err
function M.drop_idle_firewall()
  local fw, err = firewall()
  if not fw then return nil, err end
  if #fw:list() > 0 then return true, false end
  local ok, derr = fw:destroy()
  fw_handle = nil
  if not ok then return nil, derr end
  return true, true
end

--- The firewall handle the sandboxes share (opened on first use).
---@return table|nil fw, string|nil err
function M.firewall() return firewall() end

return M
