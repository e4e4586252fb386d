-- Seccomp benchmark: the cost a filter adds to a syscall (getpid/getppid, measured inside a static
-- probe under each filter), and the notify round trip with a Lua handler against a bare C
-- supervisor (tests/bench/notify_c.c), all in one run.
--   build/bin/clawlua tests/bench/seccomp.lua [iterations=300000] [rounds=15] [notify]
-- ("notify": only the notify round trip, the part that compares Lua with C)
local claw = require "clawlua"
local seccomp = claw.seccomp

local bin = (os.getenv("CLAWLUA_BUILD") or "build") .. "/bin/"
local PROBE, NOTIFY_C = bin .. "clawlua-probe", bin .. "clawlua-notify-bench"
local DOCKER = "tests/fixtures/specs/seccomp/docker-default.json"
local N = tonumber(arg and arg[1]) or 300000
local ROUNDS = tonumber(arg and arg[2]) or 15
local ONLY_NOTIFY = arg and arg[3] == "notify"

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

-- ns per call of the probe's getpid/getppid loop under filter f (median of ROUNDS runs)
local function cost(call, f, n)
  local s = {}
  for _ = 1, ROUNDS do
    local r = assert(claw.proc.run { PROBE, call, tostring(n or N), seccomp = f, timeout = 600 })
    assert(r.code == 0, r.stderr)
    s[#s + 1] = tonumber(r.stdout)
  end
  return median(s)
end

-- An allow list of 321 syscalls, the shape of a VMM's or a language runtime's filter.
local function allow_list(optimize)
  local names = {}
  for nr = 0, 460 do
    local name = seccomp.resolve(nr)
    if name and #names < 321 then names[#names + 1] = name end
  end
  return seccomp.filter { default = { errno = 1 }, optimize = optimize,
                          rules = { { syscalls = names, action = "allow" } } }, #names
end

print(("seccomp benchmark: %d calls per run, %d rounds, libseccomp %s"):format(
  N, ROUNDS, seccomp.libseccomp_version))
local function filter_costs()
  local docker = assert(seccomp.load_oci(DOCKER))
  local linear, nrules = allow_list(1)
  local tree = allow_list(2)
  local filters = {
    { "no filter", nil },
    { "Docker default profile", docker },
    { ("%d-rule allow list, optimize=1 (linear)"):format(nrules), linear },
    { ("%d-rule allow list, optimize=2 (binary tree)"):format(nrules), tree },
  }
  -- Configurations interleaved round by round, the minimum kept: this machine's syscalls are slow
  -- and noisy (other work shares the CPUs); the minimum is the uncontended cost.
  for _, call in ipairs { "getpid", "getppid" } do
    local best = {}
    for _ = 1, ROUNDS do
      for i, f in ipairs(filters) do
        local r = assert(claw.proc.run { PROBE, call, tostring(N), seccomp = f[2], timeout = 600 })
        local v = tonumber(r.stdout)
        if not best[i] or v < best[i] then best[i] = v end
      end
    end
    print(("\n%s: ns per call, minimum of %d runs (added over no filter)"):format(call, ROUNDS))
    for i, f in ipairs(filters) do
      print(("  %-46s %8.1f ns  (%+7.1f)  [%4d BPF instructions]"):format(f[1], best[i], best[i] - best[1],
        f[2] and f[2]:info().instructions or 0))
    end
    local l, t = best[3] - best[1], best[4] - best[1]
    print(("  binary tree vs linear: %+.1f ns vs %+.1f ns"):format(t, l))
  end

end
if not ONLY_NOTIFY then filter_costs() end

-- Notify round trip: every getppid goes to the supervisor and back.
local M = math.max(2000, N // 200)
local handled = 0
local notify = seccomp.filter { default = "allow", rules = { { syscall = "getppid", action = "notify" } },
                                handler = function() handled = handled + 1 return "allow" end }
local lua_s, c_s = {}, {}
for _ = 1, ROUNDS do
  local r = assert(claw.proc.run { PROBE, "getppid", tostring(M), seccomp = notify, timeout = 600 })
  lua_s[#lua_s + 1] = tonumber(r.stdout)
  local c = assert(claw.proc.run { NOTIFY_C, tostring(M), timeout = 600 })
  c_s[#c_s + 1] = tonumber(c.stdout)
end
local plain = cost("getppid", nil, M)
local lua_rt, c_rt = median(lua_s) - plain, median(c_s) - plain
table.sort(lua_s)
table.sort(c_s)
print(("\nnotify round trip (getppid, %d calls, %d handled by Lua):"):format(M, handled))
print(("  Lua handler on the loop   %9.1f us per call"):format(lua_rt / 1000))
print(("  bare C supervisor         %9.1f us per call"):format(c_rt / 1000))
print(("  ratio Lua / C             %9.2f   (medians; best runs: Lua %.1f us, C %.1f us)"):format(
  lua_rt / c_rt, (lua_s[1] - plain) / 1000, (c_s[1] - plain) / 1000))
