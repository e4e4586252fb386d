-- The VM backend of clawlua.sandbox: a sandbox is a clawlua.vm microVM booted from the guest
-- image, started one of three ways, fastest first:
--   pool      a VM booted ahead of time for the same VM-relevant policy (B.prewarm)
--   snapshot  a per-policy template snapshot (taken once, cached, keyed by the image's identity)
--             restored into a new VMM
--   cold      a fresh boot; when the policy allows templates and none is cached, this VM is
--             snapshotted at the agent's READY (before anything of the sandbox touches it) and
--             becomes the template for the next ones.
-- Pool and snapshot VMs boot with no network configuration; every sandbox's guest network (and,
-- after a restore, its clock and entropy) is set through the agent once its tap is attached.
local claw = require "clawlua"
local audit, proc, vm = claw.audit, claw.proc, claw.vm
local state_mod = require "clawlua.sandbox.state"

local B = {}

local DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
local FILTER_MT = "clawlua.seccomp.filter"

-- Module configuration (B.configure): where templates are cached, where the image is.
local config = {}

local function emit(kind, id, detail)
  detail = detail or {}
  detail.sandbox = id
  audit.emit(kind, detail)
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function read_all(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local d = f:read("a")
  f:close()
  return d
end

local function dirname(p) return p:match("^(.*)/[^/]*$") or "." end

local function run(argv)
  argv.timeout = argv.timeout or 60
  local r, err = proc.run(argv)
  if not r then return nil, err end
  if r.code ~= 0 then
    return nil, ("%s: %s"):format(argv[1], (r.stderr ~= "" and r.stderr or tostring(r.code or r.signal_name))
      :gsub("%s+$", ""))
  end
  return r.stdout
end

--- FNV-1a, 64 bits, as 16 hex digits: a stable name for a key string.
local function hash(s)
  local h = 0xcbf29ce484222325
  for i = 1, #s do
    h = ((h ~ s:byte(i)) * 0x100000001b3) & 0xffffffffffffffff
  end
  return ("%016x"):format(h)
end

local function random_hex(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local b = f:read(n)
  f:close()
  return (b:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local function cache_home()
  local x = os.getenv("XDG_CACHE_HOME")
  if x and x ~= "" then return x end
  return (os.getenv("HOME") or "/root") .. "/.cache"
end

-- ---------------------------------------------------------------------------------------------
-- The guest image

--- The build directory of the checkout this clawlua runs from: <build>/bin/clawlua (the host) or
--- <build>/lib/clawlua.so (stock lua5.4), or nil for an installed clawlua.
local function build_dir()
  local stat = read_all("/proc/self/stat")
  local pid = stat and stat:match("^(%d+)")
  local exe = pid and run { "readlink", "-f", "/proc/" .. pid .. "/exe" }
  exe = exe and exe:gsub("%s+$", "")
  if exe and exe:match("/bin/clawlua$") then return dirname(dirname(exe)) end
  local so = package.searchpath("clawlua", package.cpath)
  if so and so:match("/lib/clawlua%.so$") then
    local abs = run { "readlink", "-f", so }
    if abs then return dirname(dirname((abs:gsub("%s+$", "")))) end
  end
  return nil
end

local image_memo

--- The guest image a user's sandboxes boot: $CLAWLUA_GUEST_DIR as it is; else the checkout's
--- build/guest, (re)built by scripts/build-guest-image once per process (a no-op when cached);
--- else $XDG_CACHE_HOME/clawlua/guest when it holds an image.
---@return table|nil files {kernel=, initrd=, rootfs=, manifest=}
---@return string|nil err
local function default_image()
  if image_memo then return image_memo end
  local function files(dir)
    local f = { kernel = dir .. "/vmlinux", initrd = dir .. "/initrd.img", manifest = dir .. "/manifest", dir = dir }
    if not (exists(f.kernel) and exists(f.initrd)) then return nil end
    -- scripts/guest-kernel's minimal kernel, when it was built into the same directory
    if exists(dir .. "/vmlinux-min") then f.kernel_min = dir .. "/vmlinux-min" end
    return f
  end
  local dir = config.image_dir or os.getenv("CLAWLUA_GUEST_DIR")
  if dir and dir ~= "" then
    local f = files(dir)
    if not f then return nil, "vm backend: no guest image in " .. dir .. " (vmlinux and initrd.img expected)" end
    image_memo = f
    return f
  end
  local build = build_dir()
  local src = build and (read_all(build .. "/CMakeCache.txt") or ""):match("CMAKE_HOME_DIRECTORY:INTERNAL=([^\n]+)")
  local script = src and src .. "/scripts/build-guest-image"
  if script and exists(script) and exists(build .. "/bin/clawlua-agent") then
    local out = build .. "/guest"
    -- --rootfs: the image the tests, benchmarks and examples build (so one cached image serves all)
    local ok, err = run { script, "--out", out, "--agent", build .. "/bin/clawlua-agent", "--rootfs", "--quiet",
                          timeout = 1800 }
    if not ok then return nil, "vm backend: building the guest image: " .. err end
    image_memo = files(out)
    return image_memo or nil, "vm backend: scripts/build-guest-image made no image in " .. out
  end
  local cache = cache_home() .. "/clawlua/guest"
  image_memo = files(cache)
  if image_memo then return image_memo end
  return nil, "vm backend: no guest image: set policy.vm.kernel and policy.vm.initrd, CLAWLUA_GUEST_DIR, or run "
    .. "scripts/build-guest-image --out " .. cache
end

--- Size, mtime and inode of each file: the image's identity, for template keys.
local function identity(paths)
  local argv = { "stat", "-L", "-c", "%n %s %Y %i" }
  for _, p in ipairs(paths) do argv[#argv + 1] = p end
  return run(argv)
end

-- ---------------------------------------------------------------------------------------------
-- From a policy to vm.create options

local START_MODES = { auto = true, cold = true, snapshot = true }
local KERNEL_FLAVORS = { minimal = true, stock = true }

--- The kernel of the built-in image: the minimal one (no ACPI) when built and not declined.
local function pick_kernel(img, flavor)
  if flavor == nil then flavor = img.kernel_min and "minimal" or "stock" end
  if flavor == "stock" then return img.kernel, true end
  if not img.kernel_min then
    return nil, nil, "vm backend: no minimal kernel in " .. img.dir .. " (scripts/guest-kernel --out " .. img.dir
      .. " builds it)"
  end
  return img.kernel_min, false
end

--- What a VM for this policy needs (everything a pool or template key depends on).
---@return table|nil spec
---@return string|nil err
local function vm_spec(policy, nic)
  local res = policy.resources or {}
  local pv = policy.vm or {}
  local flavor = pv.kernel_flavor
  if flavor ~= nil and not KERNEL_FLAVORS[flavor] then
    error(("bad field 'vm.kernel_flavor' (\"minimal\" or \"stock\" expected, got %s)"):format(tostring(flavor)), 3)
  end
  local img, acpi
  if pv.kernel then
    img, acpi = { kernel = pv.kernel, initrd = pv.initrd, rootfs = pv.rootfs }, pv.acpi ~= false
  else
    local err, kernel
    img, err = default_image()
    if not img then return nil, err end
    kernel, acpi, err = pick_kernel(img, flavor)
    if not kernel then return nil, err end
    img = { kernel = kernel, initrd = img.initrd, rootfs = pv.rootfs, manifest = img.manifest }
  end
  local start = pv.start or "auto"
  if not START_MODES[start] then
    error(("bad field 'vm.start' (\"auto\", \"cold\" or \"snapshot\" expected, got %s)"):format(tostring(start)), 3)
  end
  local seccomp = policy.seccomp
  local mt = (type(seccomp) == "userdata") and getmetatable(seccomp)
  if not (mt and mt.__name == FILTER_MT) then seccomp = nil end -- a profile name is for the jail backend
  return {
    kernel = img.kernel, initrd = img.initrd, rootfs = img.rootfs,
    vcpus = res.vcpus or 1, mem_mib = res.memory_mib or 256,
    nic = nic and true or false, seccomp = seccomp, start = start,
    accel = pv.accel, acpi = acpi,
  }
end

local function spec_key(spec)
  return ("kernel=%s initrd=%s rootfs=%s vcpus=%d mem=%d nic=%s accel=%s acpi=%s"):format(spec.kernel,
    tostring(spec.initrd), tostring(spec.rootfs), spec.vcpus, spec.mem_mib, tostring(spec.nic),
    tostring(spec.accel), tostring(spec.acpi))
end

local function create_opts(spec, id, boot_args, run_dir)
  return {
    id = id, run_dir = run_dir, kernel = spec.kernel, initrd = spec.initrd, rootfs = spec.rootfs,
    rootfs_readonly = spec.rootfs and true or nil, -- shared by every sandbox (and template)
    vcpus = spec.vcpus, mem_mib = spec.mem_mib, net = spec.nic, seccomp = spec.seccomp,
    boot_args = boot_args, accel = spec.accel, acpi = spec.acpi,
  }
end

--- Starts a created VM; on failure or cancellation closes it.
local function start_or_close(v)
  local ok, r, err = pcall(v.start, v)
  if ok and r then return v end
  v:close()
  if not ok then error(r, 0) end
  return nil, err
end

-- ---------------------------------------------------------------------------------------------
-- files.readonly: host paths copied into a read-only ext4 disk of the sandbox's own

local function runtime_dir()
  local f = io.open("/proc/self/status")
  local uid = f and f:read("a"):match("\nUid:%s+(%d+)")
  if f then f:close() end
  if uid == "0" then return "/run/clawlua" end
  local x = os.getenv("XDG_RUNTIME_DIR")
  return (x and x ~= "" and x .. "/clawlua") or "/tmp"
end

-- A VM's run dir, named before vm.create / vm.restore make it, so that it can be written down
-- first (record: a function(kind, name)).
local function name_run_dir(vm_id, record)
  local dir = ("%s/%s.%s"):format(runtime_dir(), #vm_id <= 24 and vm_id or "vm", random_hex(4))
  if #dir > 80 then dir = "/tmp/clawlua-vm." .. random_hex(4) end -- its sockets' paths must fit
  record("run_dir", dir)
  return dir
end

--- Copies the paths into <dir>/stage/<i> and makes <dir>/files.ext4 of them.
--- made(dir) is called as soon as the directory exists (the state record writes it down).
---@return string|nil dir the directory holding the disk (removed at close)
---@return string disk path, or the error
local function readonly_disk(paths, id, made)
  for i, p in ipairs(paths) do
    if type(p) ~= "string" or p:sub(1, 1) ~= "/" or p:find("[%z\n]") or p:match("/%.%.?/") or p:match("/%.%.?$") then
      error(("bad field 'files.readonly[%d]' (an absolute path without . or .. expected)"):format(i), 4)
    end
    if not exists(p) then return nil, ("files.readonly[%d]: %s: No such file or directory"):format(i, p) end
  end
  local base = runtime_dir()
  -- named after the sandbox, so that what a sandbox left is told from another's
  local dir, err = run { "sh", "-c", 'mkdir -p "$1" && mktemp -d "$1/files.$2.XXXXXX"', "sh", base, id }
  if not dir then return nil, "files.readonly: " .. err end
  dir = dir:gsub("%s+$", "")
  made(dir)
  local argv = { "sh", "-c", [[
d=$1; shift; i=0; mkdir "$d/stage"
for p in "$@"; do i=$((i + 1)); cp -a -- "$p" "$d/stage/$i" || exit 1; done
kb=$(du -sk "$d/stage" | cut -f1)
mke2fs -q -t ext4 -F -L clawlua-files -d "$d/stage" "$d/files.ext4" "$((kb + kb / 4 + 8192))k" || exit 1
rm -rf "$d/stage"]], "sh", dir, timeout = 600 }
  for _, p in ipairs(paths) do argv[#argv + 1] = p end
  local done, ok, rerr = pcall(run, argv)
  if not (done and ok) then
    run { "rm", "-rf", dir }
    if not done then error(ok, 0) end -- cancelled
    return nil, "files.readonly: " .. rerr
  end
  return dir, dir .. "/files.ext4"
end

-- Binds each /mnt/root/<i> (the read-only disk) on its host path in the guest.
local BIND_SCRIPT = [[
i=0
for p in "$@"; do
  i=$((i + 1))
  if [ -d "/mnt/root/$i" ]; then mkdir -p "$p"; else mkdir -p "${p%/*}" && touch "$p"; fi
  mount -o bind "/mnt/root/$i" "$p" && mount -o remount,bind,ro "$p" || exit 1
done
]]

-- ---------------------------------------------------------------------------------------------
-- Guest network configuration through the agent

local function valid_ip4(s)
  if type(s) ~= "string" then return false end
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return false end
  for _, x in ipairs { a, b, c, d } do
    if tonumber(x) > 255 then return false end
  end
  return true
end

local function prefix_of(mask)
  local n, bits = 0, 0
  for x in mask:gmatch("%d+") do
    n = (n << 8) | tonumber(x)
  end
  while n & 0x80000000 ~= 0 do
    bits, n = bits + 1, (n << 1) & 0xffffffff
  end
  return bits
end

--- The guest's network configuration from a net handle's vm_options(): its `guest` table
--- {address = "A/len", gateway = "G", resolvers = {...}, mtu = n}, else the kernel's
--- `ip=<client>:<server>:<gw>:<netmask>:<host>:<dev>:<autoconf>:<dns0>:<dns1>` in boot_args.
--- nil when neither is there: then only a cold boot with those boot arguments can configure it.
local function guest_net(opts)
  local g = opts.guest
  if type(g) == "table" then
    local addr, len = tostring(g.address or ""):match("^([%d.]+)/(%d+)$")
    if not (valid_ip4(addr) and tonumber(len) <= 32) then
      error("bad field 'guest.address' of net:vm_options() (\"a.b.c.d/len\" expected)", 3)
    end
    return { address = addr .. "/" .. len, gateway = g.gateway, resolvers = g.resolvers or g.dns or {},
             mtu = g.mtu, iface = g.iface or "eth0" }
  end
  for tok in (opts.boot_args or ""):gmatch("%S+") do
    local v = tok:match("^ip=(.*)$")
    if v then
      local f, i = {}, 1
      for part in (v .. ":"):gmatch("([^:]*):") do
        f[i], i = part, i + 1
      end
      if valid_ip4(f[1]) and valid_ip4(f[4]) then
        return { address = f[1] .. "/" .. prefix_of(f[4]), gateway = valid_ip4(f[3]) and f[3] or nil,
                 resolvers = { valid_ip4(f[8]) and f[8] or nil, valid_ip4(f[9]) and f[9] or nil },
                 iface = (f[6] ~= "" and f[6]) or "eth0" }
      end
    end
  end
  return nil
end

--- What the backend configures in the guest from a net handle's vm_options() (nil: nothing it can
--- set after boot, so the sandbox boots cold with the options' boot_args). For the net layer's tests.
B.guest_net = guest_net

-- Run once in the guest before the sandbox is handed out: "$1" is what to do (c: clock,
-- e: entropy, n: network), then the clock, the interface, address, gateway, mtu, a seed, and the
-- resolvers. Values are checked on the host (addresses are dotted quads) and passed as arguments.
-- Under TCG every process costs: the seed goes in through a shell builtin, and the clock is set
-- last by exec'ing date in place of the shell.
local SETUP_SCRIPT = [[
set -e
what=$1 now=$2 dev=$3 addr=$4 gw=$5 mtu=$6 seed=$7
shift 7
case $what in *e*) printf %s "$seed" > /dev/urandom ;; esac
case $what in *n*)
  ip link set dev "$dev" up
  [ -z "$mtu" ] || ip link set dev "$dev" mtu "$mtu"
  ip addr add "$addr" dev "$dev"
  [ -z "$gw" ] || ip route add default via "$gw" dev "$dev"
  : > /etc/resolv.conf
  for r in "$@"; do echo "nameserver $r" >> /etc/resolv.conf; done ;;
esac
case $what in *c*) exec date -u -s "@$now" >/dev/null ;; esac
]]

local function setup_guest(v, fresh_restore, gnet)
  local what = (fresh_restore and "ce" or "") .. (gnet and "n" or "")
  if what == "" then return true end
  local argv = { "sh", "-c", SETUP_SCRIPT, "setup", what, ("%d"):format(math.floor(claw.loop.time())),
                 gnet and gnet.iface or "", gnet and gnet.address or "", "", "", "" }
  if fresh_restore then
    -- a restored guest shares its CRNG state with every VM of its template: mix 256 fresh
    -- bytes (as hex) from the host in
    argv[11] = random_hex(256)
  end
  if gnet then
    if gnet.gateway then
      if not valid_ip4(gnet.gateway) then error("bad field 'guest.gateway' of net:vm_options()", 3) end
      argv[9] = gnet.gateway
    end
    if gnet.mtu then argv[10] = ("%d"):format(gnet.mtu) end
    if not gnet.iface:match("^[%w_.-]+$") then error("bad field 'guest.iface' of net:vm_options()", 3) end
    for i, r in ipairs(gnet.resolvers) do
      if not valid_ip4(r) then error(("bad field 'guest.resolvers[%d]' of net:vm_options()"):format(i), 3) end
      argv[#argv + 1] = r
    end
  end
  argv.timeout = 30
  local r, err = v:exec(argv)
  if not r then return nil, "guest setup: " .. err end
  if r.code ~= 0 then
    return nil, ("guest setup: %s"):format((r.stderr ~= "" and r.stderr or "exit " .. tostring(r.code or r.signal))
      :gsub("%s+$", ""))
  end
  return true
end

-- ---------------------------------------------------------------------------------------------
-- Templates: one snapshot per VM spec and image, in <dir>/<spec hash>-<image hash>

local function template_root()
  return config.template_dir or (cache_home() .. "/clawlua/vm-templates")
end

--- The template directory for a spec (whether or not it exists), and the slot prefix shared by
--- every template of the same spec (older images' templates are removed when a new one lands).
local function template_path(spec)
  local paths = { spec.kernel }
  if spec.initrd then paths[#paths + 1] = spec.initrd end
  if spec.rootfs then paths[#paths + 1] = spec.rootfs end
  local id, err = identity(paths)
  if not id then return nil, err end
  local slot = hash(spec_key(spec))
  return template_root() .. "/" .. slot .. "-" .. hash(id), slot
end

local building = {} -- template paths being made by this process
local restored = setmetatable({}, { __mode = "k" }) -- VMs restored from a template

--- Snapshots a pristine VM (just READY, nothing of a sandbox in it) as the spec's template.
--- rec, when given ({record = fn(kind, name), forget = fn(kind, name)}), writes the snapshot in
--- the making down (a runtime killed meanwhile leaves it to `clawlua cleanup`).
local function make_template(v, spec, id, rec)
  local path, slot = template_path(spec)
  if not path or building[path] or exists(path .. "/vm.json") then return end
  building[path] = true
  local root = template_root()
  local tmp = ("%s/.tmp-%s-%d"):format(root, slot, math.random(1 << 30))
  local t0 = claw.now()
  if rec then rec.record("dir", tmp) end
  local ok, err = pcall(function()
    assert(run { "mkdir", "-p", root })
    local s, e = v:snapshot { dir = tmp }
    if not s then error(e, 0) end
    -- replace the templates of older images of this spec, then publish atomically
    assert(run { "sh", "-c", 'for d in "$1"/"$2"-*; do [ "$d" = "$3" ] || rm -rf -- "$d"; done', "sh",
                 root, slot, path })
    local moved, merr = os.rename(tmp, path)
    if not moved then error(merr, 0) end
    emit("sandbox.vm.template", id, { dir = path, bytes = s.bytes, seconds = claw.now() - t0, vm = v.id })
  end)
  building[path] = nil
  if not ok then run { "rm", "-rf", tmp } end
  if rec then rec.forget("dir", tmp) end
  if not ok then
    emit("sandbox.vm.template_error", id, { error = tostring(err) })
    if err == claw.cancelled then error(err, 0) end
  end
end

--- A pristine running VM for a spec: restored from its template when one is cached, else booted
--- cold (and, unless the spec says cold, snapshotted at READY as the template). run_dir(), when
--- given, names each VM's run directory (and writes it down) before the VM makes it; rec: see
--- make_template.
---@return userdata|nil v
---@return string from "snapshot"|"cold", or the error
local function pristine(spec, id, attach, run_dir, rec)
  if spec.start ~= "cold" then
    local path = template_path(spec)
    if path and exists(path .. "/vm.json") then
      local t0 = claw.now()
      local v, err = vm.restore { dir = path, id = id, net = spec.nic, seccomp = spec.seccomp, accel = spec.accel,
                                  run_dir = run_dir and run_dir() }
      if v then
        restored[v] = true
        return v, "snapshot"
      end
      -- an unusable template (another QEMU, a changed image): drop it and boot cold
      emit("sandbox.vm.restore_error", id, { dir = path, error = err, seconds = claw.now() - t0 })
      run { "rm", "-rf", path }
    end
  end
  local v, err = vm.create(create_opts(spec, id, nil, run_dir and run_dir()))
  if not v then return nil, err end
  if attach then
    local ok, aerr = attach(v)
    if not ok then
      v:close()
      return nil, aerr
    end
  end
  local started, serr = start_or_close(v)
  if not started then return nil, serr end
  if spec.start ~= "cold" then
    local ok, terr = pcall(make_template, v, spec, id, rec)
    if not ok then
      v:close()
      error(terr, 0)
    end
  end
  return v, "cold"
end

-- ---------------------------------------------------------------------------------------------
-- Pools

local pools = {} -- spec key -> {spec, want, ready = {vm...}, task}

-- A started VM's VMM with its start time, for `clawlua cleanup` (record: a function(kind, name)).
local function record_vmm(v, record)
  local pid = v:info().pid
  local start = pid and state_mod.start_time(pid)
  if start then record("pid", ("%d:%d"):format(pid, start)) end
end

-- A pool VM belongs to no sandbox yet, so it has a state record of its own (sandboxes/<pool id>):
-- the runtime's cgroup prefixes, its run dir and a template snapshot in the making are written
-- down before they are made, its VMM once started; `clawlua cleanup` reclaims what a killed
-- runtime's pool left. A sandbox that takes the VM writes them down in its own record first, and
-- then this one goes (pool_release).
local pool_records = {} -- vm -> state record
local function pool_record(id)
  local st, err = state_mod.open(id)
  if not st then return nil, err end
  st:write_meta { backend = "vm", policy = "(pool)", created = claw.loop.time() }
  for _, c in ipairs(state_mod.cgroup_prefixes()) do st:record("cgroup", c) end
  return st
end

-- When the Lua state closes with VMs still pooled, their records go with them (a finaliser
-- cannot wait for a process: busybox through os.execute, as state.lua's spares). It was made
-- before any VM, so the VMs' own finalisers have run by then.
B._pool_sentinel = setmetatable({}, { __gc = function()
  local quote = state_mod.shell_quote
  for v, st in pairs(pool_records) do
    pcall(v.close, v)
    os.execute("/bin/busybox rm -rf " .. quote(st.dir))
  end
end })

-- The pool's record of v goes (v itself is closed too unless a sandbox took it).
local function pool_release(v, close)
  if close then v:close() end
  local st = pool_records[v]
  pool_records[v] = nil
  if st then st:release_all() end
end

-- A refill after a take waits this long first, so that it does not compete for the CPU with the
-- start of the sandbox that took the VM.
local REFILL_DELAY = 0.5

local function fill(p, delay)
  if p.task and not p.task:done() then return end
  p.task = claw.spawn(function()
    if delay then claw.sleep(delay) end
    while #p.ready < p.want do
      -- the runtime's pid in the name: whose pool VM a run dir or VMM is, for people and tests
      local id = ("pool-%d-%s"):format(state_mod.self(), random_hex(4))
      local st, serr = pool_record(id)
      if not st then
        emit("sandbox.vm.pool_error", id, { error = serr })
        return
      end
      local rec = { record = function(kind, name) st:record(kind, name) end,
                    forget = function(kind, name) st:forget(kind, name) end }
      local made, v, from = pcall(pristine, p.spec, id, nil, function() return name_run_dir(id, rec.record) end, rec)
      if not (made and v) then
        st:release_all()
        if not made then error(v, 0) end
        emit("sandbox.vm.pool_error", id, { error = from })
        return
      end
      pool_records[v] = st
      record_vmm(v, rec.record)
      if restored[v] then
        -- a pool VM is unique from here on: its clock and entropy are set now, not at take
        local done, ok, err = pcall(setup_guest, v, true, nil)
        restored[v] = nil
        if not (done and ok) then
          pool_release(v, true)
          if not done then error(ok, 0) end
          emit("sandbox.vm.pool_error", id, { error = err })
          return
        end
      end
      if #p.ready >= p.want then -- shrunk meanwhile
        pool_release(v, true)
        return
      end
      p.ready[#p.ready + 1] = v
      emit("sandbox.vm.pool_fill", id, { from = from, ready = #p.ready, want = p.want })
    end
  end)
  p.task:set_daemon()
end

local function pool_for(spec)
  local key = spec_key(spec) .. (spec.seccomp and (" seccomp=" .. tostring(spec.seccomp)) or "")
  local p = pools[key]
  if not p then
    p = { spec = spec, want = 0, ready = {}, key = key }
    pools[key] = p
  end
  return p
end

local function take(spec)
  local p = pool_for(spec)
  while #p.ready > 0 do
    local v = table.remove(p.ready, 1)
    fill(p, REFILL_DELAY)
    if v:state() == "running" then return v end
    pool_release(v, true)
  end
  return nil
end

--- Keeps n booted VMs for this policy's VM-relevant fields (image, vcpus, memory, seccomp
--- filter, whether it has a NIC), refilled in the background; n = 0 closes them.
---@param policy table
---@param n integer
---@param opts? table {net = boolean}: pool VMs with a NIC, for sandboxes given a net handle
---                    (default: when policy.network is set)
function B.prewarm(policy, n, opts)
  if math.type(n) ~= "integer" or n < 0 or n > 64 then
    error("bad argument #2 to 'prewarm' (integer 0..64 expected)", 2)
  end
  local ro = policy.files and policy.files.readonly
  if ro and #ro > 0 and n > 0 then
    return nil, "vm backend: a policy with files.readonly boots cold (the disk is the sandbox's own): no pool"
  end
  local nic = policy.network ~= nil
  if opts and opts.net ~= nil then nic = opts.net end
  local spec, err = vm_spec(policy, nic)
  if not spec then return nil, err end
  local p = pool_for(spec)
  p.want = n
  while #p.ready > n do pool_release(table.remove(p.ready), true) end
  if n == 0 and p.task and not p.task:done() then p.task:cancel() end
  fill(p)
  return true
end

--- Pool figures: array of {key, want, ready, filling}.
function B.pools()
  local out = {}
  for key, p in pairs(pools) do
    out[#out + 1] = { key = key, want = p.want, ready = #p.ready, filling = p.task ~= nil and not p.task:done() }
  end
  return out
end

--- Closes every pooled VM and stops refilling.
function B.drain()
  for _, p in pairs(pools) do
    p.want = 0
    if p.task and not p.task:done() then p.task:cancel() end
    for _, v in ipairs(p.ready) do pool_release(v, true) end
    p.ready = {}
  end
end

--- Module settings: {template_dir = path, image_dir = path} (nil restores the default).
function B.configure(opts)
  config.template_dir = opts.template_dir
  config.image_dir = opts.image_dir
  image_memo = nil
end

-- ---------------------------------------------------------------------------------------------
-- The handle

local H = {}
H.__index = H

local function check_open(self)
  if self._closed then error("attempt to use a closed sandbox", 3) end
  return self._v
end

local function audited(self, kind, ok, err, detail)
  detail = detail or {}
  detail.ok = ok and true or false
  if not ok then detail.error = err end
  emit(kind, self.id, detail)
end

--- Runs a command in the guest. env merges into the guest's defaults and the policy's env.
function H:exec(opts)
  local v = check_open(self)
  if type(opts) ~= "table" then error("bad argument #1 to 'exec' (table expected, got " .. type(opts) .. ")", 2) end
  local req = {}
  local argv = opts.argv or opts
  for i = 1, #argv do req[i] = argv[i] end
  if self._env then
    local env = {}
    for k, val in pairs(self._env) do env[k] = val end
    for k, val in pairs(opts.env or {}) do env[k] = val end
    req.env = env
  else
    req.env = opts.env
  end
  req.stdin, req.cwd, req.timeout = opts.stdin, opts.cwd, opts.timeout
  req.on_stdout, req.on_stderr = opts.on_stdout, opts.on_stderr
  local cap = self._max_output
  req.max_output = opts.max_output and math.min(opts.max_output, cap) or cap
  local r, err, code = v:exec(req)
  if not r then
    emit("sandbox.vm.exec", self.id, { argv0 = req[1], error = err })
    return nil, err, code
  end
  local out = { code = r.code, signal = r.signal, stdout = r.stdout or "", stderr = r.stderr or "",
                timed_out = r.timed_out, truncated = r.truncated, duration = r.duration }
  emit("sandbox.vm.exec", self.id, { argv0 = req[1], code = r.code, signal = r.signal, timed_out = r.timed_out,
                                     duration = r.duration })
  return out
end

function H:write_file(path, data, opts)
  local v = check_open(self)
  local ok, err, code = v:write_file(path, data, opts)
  audited(self, "sandbox.vm.write_file", ok, err, { path = path, bytes = #data })
  if not ok then return nil, err, code end
  return true
end

function H:read_file(path, opts)
  local v = check_open(self)
  local data, err, code = v:read_file(path, opts)
  audited(self, "sandbox.vm.read_file", data, err, { path = path, bytes = data and #data or nil })
  if not data then return nil, err, code end
  return data
end

-- Lists a directory in the guest: the names NUL-separated as find prints them (any bytes but
-- NUL and "/"), an empty name as the end of the list, then one `stat` line per name in the same
-- order ("<raw mode hex> <size> <name>\n"; a name that vanished in between has no line).
local LIST_SCRIPT = [[
cd -- "$1" || exit 2
t=$(mktemp) || exit 3
find . -mindepth 1 -maxdepth 1 -print0 > "$t"
cat "$t"
printf '\0'
xargs -0 -r stat -c '%f %s %n' -- < "$t" 2>/dev/null
rm -f "$t"
exit 0
]]

local TYPES = { [0x8000] = "file", [0x4000] = "dir", [0xA000] = "link" }

function H:list_dir(path)
  check_open(self)
  if type(path) ~= "string" then error("bad argument #1 to 'list_dir' (string expected)", 2) end
  local r, err = self:exec { "sh", "-c", LIST_SCRIPT, "list_dir", path, env = { LC_ALL = "C" }, timeout = 60 }
  if not r then return nil, "list_dir " .. path .. ": " .. err end
  if r.code ~= 0 then
    return nil, ("list_dir %s: %s"):format(path, r.code == 2 and "cannot enter the directory" or r.stderr)
  end
  if r.truncated then return nil, "list_dir " .. path .. ": the listing is larger than max_output" end
  local s = r.stdout
  local names, pos = {}, 1
  while true do
    local z = s:find("\0", pos, true)
    if not z then return nil, "list_dir " .. path .. ": malformed listing" end
    if z == pos then
      pos = z + 1
      break
    end
    names[#names + 1] = s:sub(pos, z - 1)
    pos = z + 1
  end
  local out = {}
  for _, name in ipairs(names) do
    local mode, size, np = s:match("^(%x+) (%d+) ()", pos)
    if mode and s:sub(np, np + #name) == name .. "\n" then
      local m = tonumber(mode, 16) & 0xF000
      out[#out + 1] = { name = name:sub(3), type = TYPES[m] or "other", size = tonumber(size) }
      pos = np + #name + 1
    end
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

function H:pause()
  local v = check_open(self)
  local ok, err = v:pause()
  audited(self, "sandbox.vm.pause", ok, err)
  if not ok then return nil, err end
  return true
end

function H:resume()
  local v = check_open(self)
  local ok, err = v:resume()
  audited(self, "sandbox.vm.resume", ok, err)
  if not ok then return nil, err end
  return true
end

function H:snapshot(opts)
  local v = check_open(self)
  local s, err = v:snapshot(opts)
  audited(self, "sandbox.vm.snapshot", s, err, { dir = opts and opts.dir, bytes = s and s.bytes })
  if not s then return nil, err end
  return s
end

function H:info()
  local out = { backend = "vm", from = self._from, boot_seconds = self._boot_seconds }
  if self._closed then
    out.state = "closed"
    return out
  end
  local i = self._v:info()
  out.state = i.state
  out.vm = { id = self._v.id, backend = i.backend, accel = i.accel, why = i.why, tap = i.tap, mac = i.mac,
             pid = i.pid, rundir = i.rundir, boot_seconds = i.boot_seconds, vmm_rss_kb = i.vmm_rss_kb,
             uname = i.agent and i.agent.uname, kernel = i.kernel, acpi = i.acpi }
  return out
end

--- Kills the VMM and removes everything it owned (idempotent).
function H:close()
  if self._closed then return true end
  self._closed = true
  local v = self._v
  if self._timer and not self._expiring and not self._timer:done() then self._timer:cancel() end
  v:close()
  if self._files then
    -- only the disk is left in it (no process needed: close runs from __gc too)
    os.remove(self._files .. "/files.ext4")
    os.remove(self._files)
  end
  if self._state then
    -- what start recorded (a VMM that died has no pid in v:info() any more), newest first
    local rec = self._recorded
    for i = #rec, 1, -1 do self._state:forget(rec[i][1], rec[i][2]) end
  end
  emit("sandbox.vm.close", self.id, { vm = v.id })
  return true
end

H.destroy = H.close
H.__close = H.close
H.__gc = function(self) pcall(H.close, self) end

-- ---------------------------------------------------------------------------------------------
-- start

--- Starts a VM sandbox.
---@param opts table {id=, policy=, net=<net handle>|nil, state=<state record>|nil}
---@return table|nil handle
---@return string|nil err
function B.start(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'start' (table expected)", 2) end
  local id, policy, net, state = opts.id, opts.policy, opts.net, opts.state
  if type(id) ~= "string" then error("bad field 'id' (string expected)", 2) end
  if type(policy) ~= "table" then error("bad field 'policy' (table expected)", 2) end
  local t0 = claw.now()
  local spec, err = vm_spec(policy, net ~= nil)
  if not spec then
    emit("sandbox.vm.error", id, { error = err })
    return nil, err
  end
  -- Written down before each is made, for `clawlua cleanup` after a kill -9: the cgroups of the
  -- VMM's jail, each VM's run dir as soon as it exists, the files disk's directory. Crossed off
  -- again when start fails (everything is removed then) or at close.
  local recorded = {}
  local function record(kind, name)
    if not state then return end
    state:record(kind, name)
    recorded[#recorded + 1] = { kind, name }
  end
  local function forget(kind, name)
    if not state then return end
    state:forget(kind, name)
    for i = #recorded, 1, -1 do
      if recorded[i][1] == kind and recorded[i][2] == name then table.remove(recorded, i) end
    end
  end
  local function unrecord()
    if not state then return end
    for i = #recorded, 1, -1 do state:forget(recorded[i][1], recorded[i][2]) end
    recorded = {}
  end
  for _, c in ipairs(state_mod.cgroup_prefixes()) do record("cgroup", c) end
  local vm_id = id:match("^[%w_.-]+$") and #id <= 40 and id or ("sb-" .. hash(id):sub(1, 12))
  -- each VM's run dir: named here and written down, then made by vm.create / vm.restore
  local function run_dir()
    if not state then return nil end
    return name_run_dir(vm_id, record)
  end
  -- policy.files.readonly: {src=, dst=} entries (clawlua.policy's form) or host paths bound
  -- at the same place in the guest
  local ro, ro_src = {}, {}
  for i, e in ipairs(policy.files and policy.files.readonly or {}) do
    ro_src[i] = type(e) == "table" and e.src or e
    ro[i] = type(e) == "table" and (e.dst or e.src) or e
  end
  local files_dir
  if #ro > 0 then
    if spec.rootfs then error("bad field 'files.readonly' (the VM's one disk is policy.vm.rootfs already)", 2) end
    -- a disk of this sandbox's own: no template or pool VM has it
    local disk
    files_dir, disk = readonly_disk(ro_src, id, function(dir) record("run_dir", dir) end)
    if not files_dir then
      unrecord()
      emit("sandbox.vm.error", id, { error = disk })
      return nil, disk
    end
    spec.rootfs, spec.start = disk, "cold"
  end
  local function fail(msg, detail)
    if files_dir then run { "rm", "-rf", files_dir } end
    unrecord()
    detail = detail or {}
    detail.error = msg
    emit("sandbox.vm.error", id, detail)
    return nil, msg
  end
  local gnet, boot_args
  if net then
    local vo = net:vm_options() or {}
    gnet = guest_net(vo)
    -- a guest that can only be configured at boot: a cold boot with the net's boot arguments
    if not gnet then boot_args = vo.boot_args end
  end
  local attached = false
  local function attach(v)
    if not net then return true end
    local done, ok, aerr = pcall(net.attach, net, v.tap)
    if not done then
      v:close()
      error(ok, 0)
    end
    if not ok then return nil, "net attach: " .. tostring(aerr) end
    attached = true
    return true
  end
  local v, from
  local got, gerr = pcall(function()
    if boot_args then
      v, err = vm.create(create_opts(spec, vm_id, boot_args, run_dir()))
      if v then
        local ok, aerr = attach(v)
        if not ok then
          v:close()
          v, err = nil, aerr
        else
          v, err = start_or_close(v)
        end
      end
      from = "cold"
    else
      if spec.start ~= "cold" then v = take(spec) end
      if v then
        from = "pool"
        -- made before this sandbox (in the pool's record): written down in ours, then the pool's goes
        local rd = v:info().rundir
        if rd then record("run_dir", rd) end
        pool_release(v, false)
      else
        v, from = pristine(spec, vm_id, attach, run_dir, { record = record, forget = forget })
        if not v then err = from end
      end
    end
  end)
  if not got then
    if v then v:close() end
    if files_dir then run { "rm", "-rf", files_dir } end
    unrecord()
    error(gerr, 0)
  end
  if not v then return fail(err) end
  -- from here on the VM (and the files disk) go on every path, a raise or a cancel included
  local done, ok, serr = pcall(function()
    if not attached then
      local aok, aerr = attach(v)
      if not aok then return nil, aerr end
    end
    local sok, sserr = setup_guest(v, restored[v], gnet)
    if not sok then return nil, sserr end
    if files_dir then
      local argv = { "sh", "-c", BIND_SCRIPT, "files" }
      for _, p in ipairs(ro) do argv[#argv + 1] = p end
      local r, e = v:exec(argv)
      if not r or r.code ~= 0 then return nil, "files.readonly: " .. (e or r.stderr:gsub("%s+$", "")) end
    end
    return true
  end)
  if not (done and ok) then
    v:close()
    if done then return fail(serr, { from = from }) end
    if files_dir then run { "rm", "-rf", files_dir } end
    unrecord()
    error(ok, 0)
  end
  local info = v:info()
  -- the VMM (it has its cgroups and dies with the runtime: pdeathsig): for `clawlua ps`, and
  -- with its start time for cleanup
  if info.pid then record("vmm_pid", tostring(info.pid)) end
  record_vmm(v, record)
  local res = policy.resources or {}
  local self = setmetatable({
    id = id, backend = "vm", _v = v, _policy = policy, _net = net, _state = state, _from = from, _files = files_dir,
    _recorded = recorded,
    _boot_seconds = claw.now() - t0, _env = policy.env, _max_output = res.max_output or DEFAULT_MAX_OUTPUT,
  }, H)
  if res.lifetime_s and res.lifetime_s > 0 then
    self._timer = claw.spawn(function()
      claw.sleep(res.lifetime_s)
      if self._closed then return end
      self._expiring = true
      emit("sandbox.vm.lifetime", id, { lifetime_s = res.lifetime_s })
      self:close()
    end)
    self._timer:set_daemon()
  end
  emit("sandbox.vm.start", id, { from = from, vm = v.id, seconds = self._boot_seconds, tap = v.tap,
                                 pid = info.pid, accel = info.accel })
  return self
end

return B
