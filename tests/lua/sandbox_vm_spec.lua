-- labels: vm root slow
-- timeout: 1200
-- clawlua.sandbox.vm, the VM backend of clawlua.sandbox, with real QEMU guests booted from the
-- image scripts/build-guest-image builds, found the way a user's sandbox finds it. TCG boots are
-- slow: three cold boots in all (one sandbox for the handle's calls, one that becomes the
-- template, one for the pool's cold refill after the template is gone); the rest are restores.
local claw = require "clawlua"
local H = require "helper"
local T = require "vmtest"

local skip = T.no_qemu() or (not T.is_root() and "taps and /run/clawlua need root") or nil
if not skip then
  local files, err = T.image_files()
  skip = not files and err or nil
end

local B = require "clawlua.sandbox.vm"
local pid = H.sh("echo $PPID"):match("%d+")

local function need()
  if skip then
    pending(skip)
    return false
  end
  return true
end

--- Remembers a sandbox's VM for T.assert_clean.
local function track(sb)
  local vi = sb:info().vm
  T.tracked[#T.tracked + 1] = { id = vi.id, tap = vi.tap, rundir = vi.rundir, pid = vi.pid }
  return sb
end

local function kinds(id, prefix)
  local out = {}
  for ev in claw.audit.query { sandbox = id, kind = prefix or "sandbox.vm" } do out[#out + 1] = ev.kind end
  return " " .. table.concat(out, " ") .. " "
end

--- A state record as sandbox.lua passes one: what is recorded and forgotten, by kind.
local function fake_state()
  local st = { live = {}, log = {} }
  function st:record(kind, name)
    self.live[kind .. "=" .. name] = true
    self.log[#self.log + 1] = kind
  end
  function st:forget(kind, name) self.live[kind .. "=" .. name] = nil end
  return st
end

describe("sandbox vm backend, guest network options", function()
  it("reads a net's guest table, else a kernel-style ip= in its boot_args", function()
    assert.are.same({ address = "10.1.2.3/30", gateway = "10.1.2.1", resolvers = { "10.1.2.1" }, iface = "eth0" },
      B.guest_net { guest = { address = "10.1.2.3/30", gateway = "10.1.2.1", resolvers = { "10.1.2.1" } } })
    assert.are.same({ address = "10.9.0.2/24", gateway = "10.9.0.1", resolvers = { "10.9.0.53" }, iface = "eth0" },
      B.guest_net { boot_args = "quiet ip=10.9.0.2::10.9.0.1:255.255.255.0::eth0:off:10.9.0.53 x=y" })
    assert.is_nil(B.guest_net { boot_args = "clawlua.net=something-else" })
    assert.is_nil(B.guest_net {})
    local ok, err = pcall(B.guest_net, { guest = { address = "10.1.2.300/30" } })
    assert.is_false(ok)
    assert.matches("bad field 'guest%.address'", err)
  end)
end)

describe("sandbox vm backend, one cold sandbox", function()
  local sb, before, dir, state

  setup(function()
    if skip then return end
    before = T.snapshot()
    dir = H.tmpdir()
    B.configure { template_dir = dir .. "/templates" }
    state = fake_state()
    -- host paths the guest sees read-only at the same paths: a directory and a single file
    H.sh(("mkdir -p %s/ro/src/deep && printf data > %s/ro/src/deep/f && printf one > %s/ro/single")
      :format(dir, dir, dir))
    local err
    sb, err = B.start { id = "spec-sbvm-" .. pid, state = state, policy = {
      resources = { vcpus = 1, memory_mib = 128, max_output = 4096 },
      env = { FROM_POLICY = "policy", OVERRIDDEN = "policy" },
      files = { readonly = { dir .. "/ro/src", dir .. "/ro/single" } },
      vm = { start = "cold" },
    } }
    assert(sb, err)
    track(sb)
  end)

  teardown(function()
    if skip then return end
    if sb then sb:close() end
    B.configure {}
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  it("boots cold from the default guest image and says so", function()
    if not need() then return end
    local info = sb:info()
    assert.are.equal("vm", info.backend)
    assert.are.equal("vm", sb.backend)
    assert.are.equal("cold", info.from)
    assert.are.equal("running", info.state)
    assert.matches("^Linux 6%.", info.vm.uname)
    assert.is_nil(info.vm.tap, "no net handle: no NIC")
    assert.is_true(info.boot_seconds > 0)
    assert.is_true(state.live["vmm_pid=" .. info.vm.pid], "the VMM pid is in the state record")
    assert.is_true(state.live["run_dir=" .. info.vm.rundir], "the run dir is in the state record")
    assert.matches(" sandbox%.vm%.start ", kinds(sb.id))
    -- templates are off for start = "cold"
    assert.is_nil(io.open(dir .. "/templates"), "a cold-only policy made a template")
  end)

  it("shows files.readonly host paths at the same paths, read-only, from a disk of its own", function()
    if not need() then return end
    local r = assert(sb:exec { "sh", "-c", "cat $0/src/deep/f $0/single; echo x > $0/src/new 2>/dev/null || echo ro",
                               dir .. "/ro" })
    assert.are.equal("dataone" .. "ro\n", r.stdout)
    local list = assert(sb:list_dir(dir .. "/ro/src"))
    assert.are.same({ { name = "deep", type = "dir", size = list[1].size } }, list)
    assert.is_true(state.live["run_dir=" .. sb._files], "the disk's directory is in the state record")
    assert.is_truthy(io.open(sb._files .. "/files.ext4"))
  end)

  it("runs commands with stdin, env merged over the policy's, cwd, exit codes", function()
    if not need() then return end
    local r = assert(sb:exec { "sh", "-c", 'pwd; echo "$FROM_POLICY $OVERRIDDEN $HOME"; tr a-z A-Z; exit 3',
                               stdin = "hello\n", env = { OVERRIDDEN = "exec" }, cwd = "/tmp" })
    assert.are.equal(3, r.code)
    assert.are.equal("/tmp\npolicy exec /root\nHELLO\n", r.stdout)
    assert.are.equal("", r.stderr)
    assert.is_false(r.timed_out)
    assert.is_false(r.truncated)
    assert.is_true(r.duration > 0 and r.duration < 30)
    r = assert(sb:exec { argv = { "sh", "-c", "kill -KILL $$" } })
    assert.is_nil(r.code)
    assert.are.equal(9, r.signal)
    local _, err = sb:exec { "no-such-program" }
    assert.matches("No such file or directory", err)
    assert.matches(" sandbox%.vm%.exec ", kinds(sb.id))
  end)

  it("kills a command at its timeout and caps output at the policy's max_output", function()
    if not need() then return end
    local t0 = claw.now()
    local r = assert(sb:exec { "sleep", "30", timeout = 1 })
    assert.is_true(r.timed_out)
    assert.is_true(claw.now() - t0 < 10 * H.scale)
    -- the policy caps at 4096 bytes even when the call asks for more; a call may ask for less
    r = assert(sb:exec { "head", "-c", "100000", "/dev/zero", max_output = 1 << 20 })
    assert.are.equal(4096, #r.stdout)
    assert.is_true(r.truncated)
    r = assert(sb:exec { "head", "-c", "100000", "/dev/zero", max_output = 10 })
    assert.are.equal(10, #r.stdout)
  end)

  it("streams output to callbacks", function()
    if not need() then return end
    local seen = {}
    local r = assert(sb:exec { "sh", "-c", "echo one; sleep 0.05; echo two >&2",
                               on_stdout = function(c) seen[#seen + 1] = "o:" .. c end,
                               on_stderr = function(c) seen[#seen + 1] = "e:" .. c end })
    assert.are.equal(0, r.code)
    assert.are.equal("o:one\ne:two\n", table.concat(seen))
  end)

  it("round-trips files with their mode, and read_file honours max", function()
    if not need() then return end
    local parts = {}
    for i = 0, 255 do parts[#parts + 1] = string.char(i):rep(1000) end
    local data = table.concat(parts)
    assert.is_true(sb:write_file("/tmp/blob", data, { mode = "0600" }))
    assert.are.equal(data, assert(sb:read_file("/tmp/blob")))
    assert.are.equal("600\n", assert(sb:exec { "stat", "-c", "%a", "/tmp/blob" }).stdout)
    local none, err = sb:read_file("/tmp/blob", { max = 1000 })
    assert.is_nil(none)
    assert.is_string(err)
    local _, e2 = sb:read_file("/nonexistent")
    assert.matches("No such file", e2)
    assert.matches(" sandbox%.vm%.write_file ", kinds(sb.id))
    assert.matches(" sandbox%.vm%.read_file ", kinds(sb.id))
  end)

  it("lists a directory whose names hold any bytes", function()
    if not need() then return end
    assert(sb:exec { "sh", "-c", [[
      mkdir -p /tmp/ls/sub && cd /tmp/ls && printf 12345 > five && ln -s five link &&
      mkfifo fifo && printf x > "$(printf 'new\nline')" && printf xy > "$(printf 'sp ace\377')"]] })
    local list = assert(sb:list_dir("/tmp/ls"))
    local by = {}
    for _, e in ipairs(list) do by[e.name] = e end
    assert.are.equal(6, #list)
    assert.are.same({ name = "five", type = "file", size = 5 }, by.five)
    assert.are.equal("dir", by.sub.type)
    assert.are.equal("link", by.link.type)
    assert.are.equal("other", by.fifo.type)
    assert.are.same({ name = "new\nline", type = "file", size = 1 }, by["new\nline"])
    assert.are.same({ name = "sp ace\255", type = "file", size = 2 }, by["sp ace\255"])
    assert.are.same({}, assert(sb:list_dir("/tmp/ls/sub")))
    local none, err = sb:list_dir("/no/such/dir")
    assert.is_nil(none)
    assert.matches("list_dir /no/such/dir", err)
  end)

  it("pauses, resumes and snapshots", function()
    if not need() then return end
    assert.is_true(sb:pause())
    assert.are.equal("paused", sb:info().state)
    local t = claw.spawn(function() return sb:exec { "echo", "after" } end)
    claw.sleep(0.3)
    assert.is_false(t:done(), "a paused guest answered")
    assert.is_true(sb:resume())
    assert.are.equal("after\n", t:join().stdout)
    local s = assert(sb:snapshot { dir = dir .. "/snap" })
    assert.is_true(s.bytes > 1 << 20)
    assert.are.equal("running", sb:info().state)
    local k = kinds(sb.id)
    for _, what in ipairs { "pause", "resume", "snapshot" } do
      assert.matches(" sandbox%.vm%." .. what .. " ", k)
    end
  end)

  it("closes idempotently, leaving no VMM, run dir or state", function()
    if not need() then return end
    local vi, files = sb:info().vm, sb._files
    assert.is_true(sb:close())
    assert.is_nil(io.open(files .. "/files.ext4"), "the files disk is gone")
    assert.is_true(sb:close())
    assert.are.equal("closed", sb:info().state)
    assert.is_nil(io.open(vi.rundir), "the run dir is gone")
    assert.is_nil(next(state.live), "the state record still holds something")
    local ok, e = pcall(sb.exec, sb, { "true" })
    assert.is_false(ok)
    assert.matches("attempt to use a closed sandbox", e)
    assert.matches(" sandbox%.vm%.close ", kinds(sb.id))
    sb = nil
  end)
end)

describe("sandbox vm backend, template snapshot, pool and network", function()
  local before, dir, ns

  -- A net handle as clawlua.sandbox.net hands one over: the guest's configuration, and an
  -- attach that moves the tap into a namespace this test made, where the gateway address lives.
  local serial = 0
  local function fake_net()
    serial = serial + 1
    local n = serial
    local net = { attached = {} }
    function net.vm_options()
      return { boot_args = "", guest = { address = ("10.213.%d.2/24"):format(n), gateway = ("10.213.%d.1"):format(n),
                                         resolvers = { ("10.213.%d.53"):format(n) } } }
    end
    function net:attach(tap)
      H.sh(("ip link set %s netns %s && ip -n %s addr add 10.213.%d.1/24 dev %s && ip -n %s link set %s up")
        :format(tap, ns, ns, n, tap, ns, tap))
      self.attached[#self.attached + 1] = tap
      return true
    end
    net.gateway = ("10.213.%d.1"):format(n)
    return net
  end

  local policy = { resources = { vcpus = 1, memory_mib = 128 }, network = { egress = "deny" } }

  setup(function()
    if skip then return end
    before = T.snapshot()
    dir = H.tmpdir()
    B.configure { template_dir = dir .. "/templates" }
    ns = "clsbvm" .. pid
    H.sh("ip netns add " .. ns)
  end)

  teardown(function()
    if skip then return end
    B.drain()
    B.configure {}
    H.sh("ip netns del " .. ns, { may_fail = true })
    H.rm_rf(dir)
    T.assert_clean(before)
  end)

  local function guest_net_ok(sb, net)
    local r = assert(sb:exec { "sh", "-c", "ping -c 1 -W 5 " .. net.gateway .. " >/dev/null && echo up; "
                                .. "cat /etc/resolv.conf; date -u +%s", timeout = 30 })
    local up, resolver, t = r.stdout:match("^(%a+)\nnameserver ([%d.]+)\n(%d+)\n$")
    assert.are.equal("up", up, r.stdout .. r.stderr)
    assert.are.equal(net.vm_options().guest.resolvers[1], resolver)
    assert.is_true(math.abs(tonumber(t) - os.time()) <= 5, "the guest's clock is off: " .. t)
  end

  it("makes a template at the first cold boot and restores the next sandbox from it", function()
    if not need() then return end
    local net1, net2 = fake_net(), fake_net()
    local a = track(assert(B.start { id = "spec-sbvm-a" .. pid, policy = policy, net = net1 }))
    local b
    local ok, err = pcall(function()
      assert.are.equal("cold", a:info().from)
      assert.matches(" sandbox%.vm%.template ", kinds(a.id))
      assert.are.same({ a:info().vm.tap }, net1.attached)
      guest_net_ok(a, net1)
      b = track(assert(B.start { id = "spec-sbvm-b" .. pid, policy = policy, net = net2 }))
      assert.are.equal("snapshot", b:info().from)
      assert.are_not.equal(a:info().vm.tap, b:info().vm.tap)
      guest_net_ok(b, net2)
      -- the two guests have their own memory
      assert(a:exec { "sh", "-c", "echo a-only > /tmp/mine" })
      assert.are.equal(1, assert(b:exec { "cat", "/tmp/mine" }).code)
    end)
    a:close()
    if b then b:close() end
    assert(ok, err)
  end)

  it("takes a sandbox from the pool and refills it, and enforces the lifetime", function()
    if not need() then return end
    assert(B.prewarm(policy, 1, { net = true }))
    local function ready()
      for _, p in ipairs(B.pools()) do
        if p.want == 1 and p.ready == 1 then return true end
      end
    end
    assert(H.eventually(ready, 120 * H.scale), "the pool did not fill")
    local net = fake_net()
    local state = fake_state()
    local short = { resources = { vcpus = 1, memory_mib = 128, lifetime_s = 2 }, network = policy.network }
    local t0 = claw.now()
    local sb = track(assert(B.start { id = "spec-sbvm-p" .. pid, policy = short, net = net, state = state }))
    local r = assert(sb:exec { "echo", "hi" })
    local first = claw.now() - t0
    local ok, err = pcall(function()
      assert.are.equal("hi\n", r.stdout)
      assert.are.equal("pool", sb:info().from)
      assert.is_true(first < 5 * H.scale, ("pool start to first exec took %.2f s"):format(first))
      guest_net_ok(sb, net)
      assert(H.eventually(ready, 120 * H.scale), "the pool was not refilled")
      -- the lifetime timer closes it
      assert(H.eventually(function() return sb:info().state == "closed" end, 10 * H.scale), "still alive")
      assert.matches(" sandbox%.vm%.lifetime sandbox%.vm%.close ", kinds(sb.id))
      assert.is_nil(next(state.live))
    end)
    sb:close()
    B.prewarm(policy, 0, { net = true })
    assert(ok, err)
  end)

  it("drops a template that cannot be restored and boots cold", function()
    if not need() then return end
    -- corrupt the memory stream of the one template
    local tdir = H.sh("ls -d " .. dir .. "/templates/*-*"):gsub("%s+$", "")
    assert.are_not.equal("", tdir)
    H.write_file(tdir .. "/memory.qemu", "garbage")
    local sb = track(assert(B.start { id = "spec-sbvm-c" .. pid, policy = policy, net = fake_net() }))
    local ok, err = pcall(function()
      assert.are.equal("cold", sb:info().from)
      assert.matches(" sandbox%.vm%.restore_error ", kinds(sb.id))
      assert(H.eventually(function() return io.open(tdir .. "/vm.json") ~= nil end, 5), "no new template")
    end)
    sb:close()
    assert(ok, err)
  end)

  it("leaves nothing behind when the net attach fails or the start is cancelled", function()
    if not need() then return end
    local bad = fake_net()
    function bad.attach() return nil, "no such bridge" end
    local none, err = B.start { id = "spec-sbvm-d" .. pid, policy = policy, net = bad }
    assert.is_nil(none)
    assert.are.equal("net attach: no such bridge", err)
    assert.matches(" sandbox%.vm%.error ", kinds("spec-sbvm-d" .. pid))
    -- a cold boot (with a files disk) cancelled half-way
    H.sh("mkdir -p " .. dir .. "/ro2 && echo x > " .. dir .. "/ro2/f")
    local t = claw.spawn(function()
      return B.start { id = "spec-sbvm-e" .. pid, policy = { resources = policy.resources,
                       files = { readonly = { dir .. "/ro2" } } } }
    end)
    -- cancelled while the guest boots: right after the VMM is spawned (a fixed sleep raced a
    -- guest that booted in under a second)
    assert(H.eventually(function()
      return #claw.audit.events { sandbox = "spec-sbvm-e" .. pid, kind = "vm.spawn" } > 0
    end, 60 * H.scale), "the VMM was not spawned")
    t:cancel()
    local r, why = t:join()
    assert.is_nil(r)
    assert.are.equal("cancelled", why)
    assert.are.equal("  ", kinds("spec-sbvm-e" .. pid, "sandbox.vm.start"), "a cancelled start started")
    -- this sandbox's files disk is gone (the other run of this spec may have one of its own)
    assert.are.equal("", H.sh("ls /run/clawlua | grep '^files\\.spec-sbvm-e" .. pid .. "\\.' || true"))
  end)

  it("boots cold with the net's boot arguments when it gives no guest configuration", function()
    if not need() then return end
    local net = fake_net()
    local order = {}
    function net.vm_options() return { boot_args = "clawlua.spec=" .. pid } end
    local attach = net.attach
    function net:attach(tap)
      -- before the VMM is spawned
      order[#order + 1] = "attach, spawns: " .. #claw.audit.events { sandbox = "spec-sbvm-f" .. pid, kind = "vm.spawn" }
      return attach(self, tap)
    end
    local sb = track(assert(B.start { id = "spec-sbvm-f" .. pid, policy = policy, net = net }))
    local ok, err = pcall(function()
      assert.are.equal("cold", sb:info().from)
      assert.are.same({ "attach, spawns: 0" }, order)
      assert.matches(" clawlua%.spec=" .. pid, assert(sb:exec { "cat", "/proc/cmdline" }).stdout)
      -- the guest was left alone: its interface is down and has no address
      assert.is_nil(assert(sb:exec { "ip", "-4", "addr", "show", "eth0" }).stdout:match("inet "))
    end)
    sb:close()
    assert(ok, err)
  end)

  it("refuses what it cannot do, naming the field", function()
    if not need() then return end
    local none, err = B.start { id = "x", policy = { files = { readonly = { "/no/such/path" } } } }
    assert.is_nil(none)
    assert.matches("files%.readonly%[1%]: /no/such/path: No such file", err)
    local ok0, e0 = pcall(B.start, { id = "x", policy = { files = { readonly = { "/a/../etc" } } } })
    assert.is_false(ok0)
    assert.matches("bad field 'files%.readonly%[1%]'", e0)
    local ok, e2 = pcall(B.start, { id = "x", policy = { vm = { start = "warm" } } })
    assert.is_false(ok)
    assert.matches("bad field 'vm%.start'", e2)
    assert.has_error(function() B.prewarm(policy, -1) end)
    local np, perr = B.prewarm({ files = { readonly = { "/etc" } } }, 1)
    assert.is_nil(np)
    assert.matches("files%.readonly boots cold", perr)
  end)
end)
