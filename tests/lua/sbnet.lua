-- The "internet" the sandbox networking specs run against, built from test namespaces:
--   host (clawlua runs here: `ip netns exec host clawlua tests/integration/sandbox_net_child.lua`)
--     up0 10.77.0.1/24, default route via inet
--   inet: eth0 10.77.0.2/24; on lo 203.0.113.10 and .11 (HTTP on 80, /hello.txt),
--     203.0.113.53 (tests/integration/dnsd.py, every query logged), 169.254.169.254
-- Traffic flows only between these namespaces and the ones the sandbox module makes.
local claw = require "clawlua"
local json = require "clawlua.json"
local H = require "helper"
local N = require "netns"

local W = {}

W.prefix = "clsn" .. N.pid .. "_"
local PREFIX = W.prefix

local function q(s) return "'" .. s .. "'" end

-- The test's world: namespaces, servers, the DNS server's query log.
--- Builds the namespaces and starts the servers.
function W.make()
  local w = { host = PREFIX .. "h", inet = PREFIX .. "i", procs = {}, queries = {},
              dir = H.tmpdir("sbnet") }
  H.sh(table.concat({
    "set -e",
    "ip netns add " .. w.host, "ip netns add " .. w.inet,
    "ip -n " .. w.host .. " link set lo up", "ip -n " .. w.inet .. " link set lo up",
    ("ip -n %s link add up0 type veth peer name eth0 netns %s"):format(w.host, w.inet),
    "ip -n " .. w.host .. " addr add 10.77.0.1/24 dev up0",
    "ip -n " .. w.host .. " link set up0 up",
    "ip -n " .. w.inet .. " addr add 10.77.0.2/24 dev eth0",
    "ip -n " .. w.inet .. " link set eth0 up",
    "for a in 203.0.113.10 203.0.113.11 203.0.113.53 169.254.169.254; do ip -n " .. w.inet
      .. " addr add $a/32 dev lo; done",
    "ip -n " .. w.host .. " route add default via 10.77.0.2",
  }, "\n"))
  H.sh("mkdir -p " .. w.dir .. "/www && echo hello-from-inet > " .. w.dir .. "/www/hello.txt")
  H.write_file(w.dir .. "/zone.json", json.encode {
    ["allowed.test"] = { a = { "203.0.113.10" }, ttl = 30 },
    ["cdn.allowed.test"] = { cname = "allowed.test", ttl = 30 },
    ["denied.test"] = { a = { "203.0.113.11" }, ttl = 30 },
    ["later.test"] = { a = { "203.0.113.11" }, ttl = 30 },
    ["short.test"] = { a = { "203.0.113.10" }, ttl = 1 },
  })
  local web = assert(claw.proc.spawn { "ip", "netns", "exec", w.inet, N.python, "-m", "http.server",
                                       "--bind", "0.0.0.0", "80", "--directory", w.dir .. "/www",
                                       stdout = "null", stderr = "null" })
  w.procs[#w.procs + 1] = web
  -- a service on the host namespace itself (every address, port 8080): a sandbox must not reach it
  w.procs[#w.procs + 1] = assert(claw.proc.spawn {
    "ip", "netns", "exec", w.host, N.python, "-m", "http.server", "--bind", "0.0.0.0", "8080",
    "--directory", w.dir .. "/www", stdout = "null", stderr = "null" })
  local dnsd = assert(claw.proc.spawn { "ip", "netns", "exec", w.inet, N.python,
                                        H.src .. "/tests/integration/dnsd.py", "203.0.113.53", "53",
                                        w.dir .. "/zone.json", stdout = "pipe", stderr = "inherit" })
  w.procs[#w.procs + 1] = dnsd
  dnsd.stdout:set_timeout(15)
  assert(dnsd.stdout:read_line() == "ready", "dnsd did not start")
  dnsd.stdout:set_timeout(-1)
  local reader = claw.spawn(function()
    while true do
      local line = dnsd.stdout:read_line()
      if not line then break end
      local name = line:match("^query (%S+)")
      if name then w.queries[#w.queries + 1] = name end
    end
  end)
  reader:set_daemon(true)
  -- the web server is up when it answers from inside inet
  assert(H.eventually(function()
    local _, r = H.sh("ip netns exec " .. w.inet .. " busybox wget -q -O - http://203.0.113.10/hello.txt",
                      { may_fail = true })
    return r.code == 0
  end, 15), "http.server did not start")
  return w
end

--- Stops the servers and removes the namespaces.
function W.destroy(w)
  for _, p in ipairs(w.procs) do
    if p:running() then p:kill("KILL", "group") end
    p:wait(5)
    p:close()
  end
  for _, ns in ipairs { w.host, w.inet } do
    H.sh("ip netns del " .. q(ns) .. " 2>/dev/null", { may_fail = true })
  end
  H.rm_rf(w.dir)
end

--- Whether the test DNS server saw a query for name.
function W.queried(w, name)
  for _, n in ipairs(w.queries) do if n == name then return true end end
  return false
end

-- Runs the child script in the host namespace with a plan; returns its output lines (decoded).
-- opts.until_op: kill -9 the child once it printed a line with that op; opts.script: another
-- child script (tests/integration/...); opts.env: added to the child's environment;
-- opts.killed: the child SIGKILLs itself (read to its end, and it must have died so). Returns the
-- lines and the child's pid.
function W.child(w, plan, opts)
  opts = opts or {}
  local p = assert(claw.proc.spawn { "ip", "netns", "exec", w.host, H.bin,
                                     H.src .. "/tests/integration/" .. (opts.script or "sandbox_net_child.lua"),
                                     json.encode(plan), stdout = "pipe", stderr = "pipe", env = opts.env })
  local pid = p:pid()
  p.stdout:set_timeout(90)
  local lines = {}
  while true do
    local line = p.stdout:read_line()
    if not line then break end
    local t = json.decode(line)
    lines[#lines + 1] = t
    if opts.until_op and t.op == opts.until_op then
      p:kill("KILL", "group")
      break
    end
  end
  local err = p.stderr:read_all() or ""
  local st = p:wait(30)
  p:close()
  if opts.killed then
    assert(st and st.signal == 9, "the child was not killed: " .. json.encode(st or {}) .. " " .. err)
  elseif not opts.until_op then
    assert(st and st.code == 0, "child failed: " .. err)
  end
  if opts.until_op then
    local last = lines[#lines]
    assert(last and last.op == opts.until_op, "the child stopped before " .. opts.until_op .. ": " .. err)
  end
  return lines, pid
end

--- The n-th (default first) output line of the child with that op.
function W.find(lines, op, n)
  local k = 0
  for _, l in ipairs(lines) do
    if l.op == op then
      k = k + 1
      if k == (n or 1) then return l end
    end
  end
end

-- What the host namespace has that a sandbox could leave: links, addresses, routes, the NAT
-- tables, the firewall's per-sandbox chains; and the namespaces named clw-*.
function W.snapshot(w, netns_name)
  local function sh(c) return (H.sh(c, { may_fail = true })) end
  local fw = "ip netns exec " .. w.host .. " nft list table inet clawlua 2>/dev/null | "
  return {
    links = sh("ip -n " .. w.host .. " -o link show | sed 's/^[0-9]*: //; s/ state.*//'"),
    addrs = sh("ip -4 -n " .. w.host .. " -o addr show"),
    routes = sh("ip -4 -n " .. w.host .. " route show table all"),
    nat = sh("ip netns exec " .. w.host .. " nft list tables | grep clawlua_net_ || true"),
    chains = sh(fw .. "grep -o 'chain vm_[^ ]*' || true"),
    elems = sh(fw .. "grep -o '\"clv[^\"]*\"' || true"),
    netns = netns_name and sh("ip netns list | grep -c " .. q(netns_name) .. " || true") or "",
  }
end

return W
