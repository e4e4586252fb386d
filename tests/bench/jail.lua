-- Jail benchmark: spawn-to-exit of /bin/true in a jail, against bubblewrap (bwrap) and
-- util-linux unshare with equivalent namespaces, all in one run.
--   build/bin/clawlua tests/bench/jail.lua [runs=40]
local claw = require "clawlua"

local RUNS = tonumber(arg and arg[1]) or 40

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

-- A root like bwrap's: /usr read-only, the merged-/usr symlinks, /proc, a minimal /dev.
local jail_opts = {
  "/bin/true", binds = { "/usr" }, symlinks = { ["/bin"] = "usr/bin", ["/lib"] = "usr/lib",
  ["/lib64"] = "usr/lib64", ["/sbin"] = "usr/sbin" }, stdin = "null", stdout = "null", stderr = "null",
}
local bwrap = { "bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
  "--unshare-uts", "--unshare-cgroup", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
  "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
  "--proc", "/proc", "--dev", "/dev", "--die-with-parent", "/bin/true" }
local unshare = { "unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--net", "--ipc",
  "--uts", "--cgroup", "--mount-proc", "/bin/true" }

local function time_jail(extra)
  local opts = {}
  for k, v in pairs(jail_opts) do opts[k] = v end
  for k, v in pairs(extra or {}) do opts[k] = v end
  local t0 = claw.now()
  local p = assert(claw.jail.spawn(opts))
  local st = p:wait()
  local dt = claw.now() - t0
  assert(st.code == 0, "jail run failed")
  p:close()
  return dt
end

local function time_cmd(argv)
  local t0 = claw.now()
  local p = assert(claw.proc.spawn { argv = argv, stdin = "null", stdout = "null", stderr = "null" })
  local st = p:wait()
  local dt = claw.now() - t0
  assert(st.code == 0, argv[1] .. " failed")
  p:close()
  return dt
end

local docker = assert(claw.seccomp.load_oci("tests/fixtures/specs/seccomp/docker-default.json"))
local cases = {
  { "proc.spawn /bin/true (no isolation)", function() return time_cmd { "/bin/true" } end },
  { "jail.spawn (user pid mount net ipc uts cgroup)", function() return time_jail() end },
  { "jail.spawn + cgroup memory/pids limits", function()
    return time_jail { cgroup = { memory = "256M", pids = 64 } } end },
  { "jail.spawn + Docker seccomp profile", function() return time_jail { seccomp = docker } end },
  { "bwrap, same namespaces and root", function() return time_cmd(bwrap) end },
  { "unshare, same namespaces (no new root)", function() return time_cmd(unshare) end },
}

local samples = {}
for i = 1, #cases do samples[i] = {} end
for _ = 1, RUNS do -- interleaved, so drift in the machine's load hits every case alike
  for i, c in ipairs(cases) do table.insert(samples[i], c[2]()) end
end
print(("jail benchmark: spawn to exit of /bin/true, median of %d runs"):format(RUNS))
local jail_ms = median(samples[2]) * 1000
for i, c in ipairs(cases) do
  local ms = median(samples[i]) * 1000
  print(("  %-48s %8.2f ms   (jail / this = %.2f)"):format(c[1], ms, jail_ms / ms))
end
