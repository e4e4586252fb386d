-- The main job: a sandbox made from a policy file, whose guest really uses the network through
-- clawlua's firewall and DNS forwarder, and what was allowed and denied, read back from the audit.
-- Needs root (namespaces, taps, nftables) and qemu-system-x86_64.
--
--   build/bin/clawlua examples/sandbox.lua          (scripts/run does this by default)
--
-- It never sends a packet outside namespaces it makes. It builds a small "internet" of two:
--   host  (clawlua runs here, under `nsenter --net`: this namespace's routes are the uplink)
--         up0 10.77.0.1/24, default route via inet
--   inet  eth0 10.77.0.2/24; on lo: 203.0.113.10 and .11 (HTTP, port 80), 203.0.113.53 (a DNS
--         server answering allowed.example -> .10 and blocked.example -> .11, logging every
--         query), and 169.254.169.254 (the cloud metadata address)
-- and then, inside host, runs examples/policies/demo-egress.lua's sandbox: a QEMU microVM that
-- may reach allowed.example:80 and nothing else. The guest image is built on first use by
-- scripts/build-guest-image (Debian's kernel and busybox-static, fetched with apt, plus clawlua's
-- guest agent) and cached in build/guest. examples/primitives.lua drives the primitives alone.
local claw = require "clawlua"
local audit, proc = claw.audit, claw.proc

local build = os.getenv("CLAWLUA_BUILD") or "build"
local script = arg[0]

local function check(ok, err, ...)
  if not ok then error(err, 2) end
  return ok, err, ...
end

--- A to-be-closed value that runs fn when its scope ends, by error or not.
local function defer(fn) return setmetatable({}, { __close = fn }) end

local function step(fmt, ...)
  io.stdout:write(("==> " .. fmt .. "\n"):format(...))
  io.stdout:flush()
end

local function sh(cmd)
  local r = check(proc.run { "sh", "-c", "set -e\n" .. cmd, timeout = 30 })
  if r.code ~= 0 then error(("%s: %s"):format(cmd:match("^[^\n]*"), r.stderr), 2) end
  return r.stdout
end

-- -------------------------------------------------------------------------------------------
-- Inside the host namespace: the sandbox, its guest's traffic, the audit.

local function inside(dir)
  local policy, sandbox = require "clawlua.policy", require "clawlua.sandbox"
  local log_path = dir .. "/audit.jsonl"
  local sink = check(audit.sink { path = log_path, fsync = "never" })

  local p = check(policy.load "examples/policies/demo-egress.lua")
  local sb <close> = check(sandbox.create(p, { id = "demo" }))
  local info = sb:info()
  local vm = info.backend_info
  step("sandbox %s from policy %s: %s backend (%s, %s), started from %s in %.2f s; guest %s, gateway %s",
       sb.id, p.name, sb.backend, vm.vm.backend, vm.vm.accel, vm.from, vm.boot_seconds,
       info.network.address, info.network.gateway)

  local function guest(what, cmd, timeout)
    local r = check(sb:exec { "sh", "-c", cmd .. " 2>&1", timeout = timeout })
    local out = r.stdout:gsub("%s+$", ""):gsub("\n", " | ")
    local status = r.code and ("exit " .. r.code) or ("signal " .. tostring(r.signal))
    step("guest: %-34s -> %s", what, r.timed_out and "no answer (timed out)" or ("%s: %s"):format(status, out))
  end
  guest("wget http://allowed.example/", "busybox wget -q -O - http://allowed.example/", 30)
  guest("wget http://blocked.example/", "busybox wget -q -O - http://blocked.example/", 30)
  guest("wget http://203.0.113.11/ (direct)", "busybox wget -q -O - http://203.0.113.11/", 4)
  guest("wget http://169.254.169.254/", "busybox wget -q -O - http://169.254.169.254/", 4)

  -- The firewall's drops reach the audit through NFLOG: give the last ones a moment.
  for _ = 1, 20 do
    if #audit.events { kind = "fw.drop", sandbox = sb.id } >= 2 then break end
    claw.sleep(0.1)
  end
  sb:destroy()
  step("sandbox destroyed")
  sink:close()

  -- What was allowed and denied, read back from the hash-chained log on disk.
  local qtypes = { [1] = "A", [28] = "AAAA" }
  local lines, other = {}, {}
  local function add(fmt, ...)
    local line = fmt:format(...)
    if not lines[line] then lines[#lines + 1], lines[line] = line, true end
  end
  for ev in audit.read_file(log_path) do
    local d = ev.detail or {}
    local qtype = qtypes[d.qtype] or tostring(d.qtype)
    if ev.sandbox ~= "demo" then
      goto next
    elseif ev.kind == "dns.allow" then
      add("allowed  DNS %-4s %s -> %s", qtype, d.name,
          #(d.addrs or {}) > 0 and table.concat(d.addrs, ", ") .. " (pinned into the firewall)" or "no address")
    elseif ev.kind == "dns.deny" then
      add("denied   DNS %-4s %s: NXDOMAIN, not forwarded", qtype, d.name)
    elseif ev.kind == "fw.drop" and tostring(d.rule):match("^egress") then
      add("dropped  %s %s -> %s:%s (rule %s)", d.proto, d.src, d.dst, d.dport, d.rule)
    elseif ev.kind == "fw.drop" then -- e.g. the guest kernel's IPv6 chatter before its set-up
      other[tostring(d.rule)] = (other[tostring(d.rule)] or 0) + 1
    end
    ::next::
  end
  for rule, n in pairs(other) do add("dropped  %d other packet(s) (rule %s)", n, rule) end
  step("audit of sandbox demo:")
  for _, line in ipairs(lines) do io.stdout:write("      ", line, "\n") end
  local verdict = audit.verify(audit.log_files(log_path))
  step("audit chain verified: %s", verdict.ok and "intact" or "BROKEN")
end

-- -------------------------------------------------------------------------------------------
-- Outside: the guest image, the demo internet, then this script again inside it.

local function outside()
  local ok_root = check(proc.run { "id", "-u" }).stdout:match("^0%s") ~= nil
  if not ok_root then error("examples/sandbox.lua needs root (network namespaces, taps, nftables)", 0) end

  step("guest image in %s/guest", build)
  local r = check(proc.run { "scripts/build-guest-image", "--out", build .. "/guest",
                             "--agent", build .. "/bin/clawlua-agent", "--rootfs", -- as the sandbox's backend builds it
                             stdout = "inherit", stderr = "inherit", timeout = 1800 })
  if r.code ~= 0 then error("scripts/build-guest-image failed: " .. (r.code or r.signal_name)) end

  local dir = sh("mktemp -d /tmp/clawlua-sandbox.XXXXXX"):gsub("%s+$", "")
  local _ <close> = defer(function() proc.run { "rm", "-rf", dir } end)

  -- 1. The demo internet. Every namespace is removed on the way out, whatever happens.
  local tag = "cldemo" .. dir:match("[^.]+$") -- mktemp's random part
  local host, inet = tag .. "h", tag .. "i"
  local _ <close> = defer(function()
    proc.run { "sh", "-c", ("ip netns del %s 2>/dev/null; ip netns del %s 2>/dev/null; true"):format(host, inet) }
  end)
  sh(([[
ip netns add $H; ip netns add $I
ip -n $H link set lo up; ip -n $I link set lo up
ip -n $H link add up0 type veth peer name eth0 netns $I
ip -n $H addr add 10.77.0.1/24 dev up0; ip -n $H link set up0 up
ip -n $I addr add 10.77.0.2/24 dev eth0; ip -n $I link set eth0 up
for a in 203.0.113.10 203.0.113.11 203.0.113.53 169.254.169.254; do ip -n $I addr add $a/32 dev lo; done
ip -n $H route add default via 10.77.0.2
mkdir "$D/www"; echo "hello from allowed.example" > "$D/www/index.html"
cat > "$D/zone.json" <<EOF
{"allowed.example": {"a": ["203.0.113.10"], "ttl": 30}, "blocked.example": {"a": ["203.0.113.11"], "ttl": 30}}
EOF]]):gsub("%$H", host):gsub("%$I", inet):gsub("%$D", dir))

  local servers = {}
  local _ <close> = defer(function()
    for _, s in ipairs(servers) do
      if s:running() then s:kill("KILL", "group") end
      s:wait(5)
      s:close()
    end
  end)
  servers[1] = check(proc.spawn { "ip", "netns", "exec", inet, "python3", "-m", "http.server", "--bind",
                                  "0.0.0.0", "80", "--directory", dir .. "/www", stdout = "null", stderr = "null" })
  local dnsd = check(proc.spawn { "ip", "netns", "exec", inet, "python3", "tests/integration/dnsd.py",
                                  "203.0.113.53", "53", dir .. "/zone.json", stdout = "pipe", stderr = "inherit" })
  servers[2] = dnsd
  dnsd.stdout:set_timeout(15)
  if dnsd.stdout:read_line() ~= "ready" then error("the demo DNS server did not start") end
  dnsd.stdout:set_timeout(-1)
  local queries = {}
  local reader = claw.spawn(function()
    for line in function() return dnsd.stdout:read_line() end do
      local name = line:match("^query (%S+)")
      if name then queries[name] = (queries[name] or 0) + 1 end
    end
  end)
  reader:set_daemon(true)
  local up
  for _ = 1, 50 do
    up = proc.run { "ip", "netns", "exec", inet, "busybox", "wget", "-q", "-O", "/dev/null", "http://203.0.113.10/" }
    if up and up.code == 0 then break end
    claw.sleep(0.1)
  end
  if not (up and up.code == 0) then error("the demo web server did not start") end
  step("demo internet: namespaces %s (uplink) and %s (HTTP on 203.0.113.10/.11, DNS on .53, 169.254.169.254)",
       host, inet)

  -- 2. This script again, in the host namespace (`nsenter --net` keeps the mounts, so the
  --    VMM's cgroups work as anywhere else). If we are stopped (Ctrl-C, SIGTERM), it gets the
  --    signal too and is given the time to destroy its sandbox before the namespaces go.
  local child = check(proc.spawn { "nsenter", "--net=/run/netns/" .. host, build .. "/bin/clawlua", script,
                                   "--inside", dir, stdout = "inherit", stderr = "inherit" })
  local _ <close> = defer(function()
    if child:running() then
      child:kill("TERM")
      if not child:wait(30) then child:kill("KILL") end
    end
    child:wait(5)
    child:close()
  end)
  local st = check(child:wait())
  if st.code ~= 0 then error("the sandbox part failed: " .. (st.code or st.signal_name), 0) end

  -- 3. The upstream's side: what the demo DNS server was asked.
  claw.sleep(0.1)
  step("upstream DNS server saw: allowed.example %d time(s), blocked.example %d time(s)",
       queries["allowed.example"] or 0, queries["blocked.example"] or 0)
end

claw.run(function()
  if arg[1] == "--inside" then inside(arg[2]) else outside() end
end)
