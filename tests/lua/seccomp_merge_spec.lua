-- clawlua.seccomp: what libseccomp builds from several argument rules for one syscall decides as
-- the rules say. The filter's BPF is run here by a small classic-BPF interpreter over seccomp_data
-- for many argument values, and compared with the rules read directly. libseccomp 2.5.4 merges a
-- second rule for a syscall wrongly into a rule whose test other than == / masked == comes
-- before a later argument's (the filter allows calls no rule allows, or the build never ends:
-- found by fuzz_lua_seccomp_profiles); such pairs are refused, everything else must decide right.
local claw = require "clawlua"
local seccomp = claw.seccomp

local AUDIT_ARCH = { x86_64 = 0xC000003E, aarch64 = 0xC00000B7 }
local ALLOW, DENY = 0x7fff0000, 0x00050000 | 1 -- SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM

-- Runs a seccomp BPF program (f:bpf(): struct sock_filter, host byte order) on one call.
local function run_bpf(prog, nr, arch, args)
  local data = string.pack("<i4I4I8", nr, arch, 0)
  for i = 1, 6 do data = data .. string.pack("<I8", args[i] or 0) end
  local A, X, pc = 0, 0, 0
  local n = #prog // 8
  for _ = 1, 4096 do
    assert(pc < n, "ran off the end of the program")
    local code, jt, jf, k = string.unpack("<I2BBI4", prog, pc * 8 + 1)
    pc = pc + 1
    if code == 0x20 then -- ld [k]
      A = string.unpack("<I4", data, k + 1)
    elseif code == 0x06 then -- ret k
      return k
    elseif code == 0x05 then -- ja k
      pc = pc + k
    elseif code == 0x15 or code == 0x25 or code == 0x35 or code == 0x45 then
      local yes
      if code == 0x15 then yes = A == k
      elseif code == 0x25 then yes = A > k
      elseif code == 0x35 then yes = A >= k
      else yes = A & k ~= 0 end
      pc = pc + (yes and jt or jf)
    elseif code == 0x54 then -- and k
      A = A & k
    elseif code == 0x07 then -- tax
      X = A
    elseif code == 0x87 then -- txa
      A = X
    else
      error(("BPF opcode 0x%02x is not known to this interpreter"):format(code))
    end
  end
  error("the program did not return")
end

local CMP = {
  ["=="] = function(a, v) return a == v end,
  ["!="] = function(a, v) return a ~= v end,
  ["<"] = function(a, v) return math.ult(a, v) end,
  ["<="] = function(a, v) return a == v or math.ult(a, v) end,
  [">"] = function(a, v) return math.ult(v, a) end,
  [">="] = function(a, v) return a == v or math.ult(v, a) end,
}

local function matches(rule, args)
  for _, t in ipairs(rule.args) do
    if not CMP[t.op](args[t.index + 1], t.value) then return false end
  end
  return true
end

-- A test other than == that comes before a test of a later argument (the shape libseccomp
-- cannot merge another rule into).
local function branching(rule)
  local last = -1
  for _, t in ipairs(rule.args) do last = math.max(last, t.index) end
  for _, t in ipairs(rule.args) do
    if t.op ~= "==" and t.index < last then return t end
  end
end

local function same(a, b)
  if #a.args ~= #b.args then return false end
  for i, t in ipairs(a.args) do
    local u = b.args[i]
    if t.index ~= u.index or t.op ~= u.op or t.value ~= u.value then return false end
  end
  return true
end

-- Builds the rules (all allow dup3, default errno EPERM) and checks the filter on every
-- combination of interesting values of a0..a3: each value, one more, one less, and with the high
-- 32 bits set. Returns true if built, or false and the error.
local function check(rules)
  local list = {}
  for i, r in ipairs(rules) do list[i] = { syscall = "dup3", action = "allow", args = r.args } end
  local ok, f = pcall(seccomp.filter, { default = { errno = 1 }, rules = list })
  if not ok then return false, f end
  local prog, arch = f:bpf(), AUDIT_ARCH[seccomp.native_arch]
  local nr = assert(seccomp.resolve("dup3"))
  -- per argument: 0, 5, and each value it is tested against, one more, one less, and with the
  -- high 32 bits set
  local values = {}
  for a = 1, 4 do
    local seen = { [0] = true, [5] = true }
    for _, r in ipairs(rules) do
      for _, t in ipairs(r.args) do
        if t.index == a - 1 then
          for _, v in ipairs { t.value, t.value + 1, t.value - 1, t.value | (1 << 32) } do seen[v] = true end
        end
      end
    end
    values[a] = {}
    for v in pairs(seen) do values[a][#values[a] + 1] = v end
  end
  local total = #values[1] * #values[2] * #values[3] * #values[4]
  for i = 0, total - 1 do
    local args, x = {}, i
    for a = 1, 4 do
      args[a] = values[a][x % #values[a] + 1]
      x = x // #values[a]
    end
    local want = DENY
    for _, r in ipairs(rules) do
      if matches(r, args) then want = ALLOW end
    end
    local got = run_bpf(prog, nr, arch, args)
    if got ~= want then
      error(("dup3(%s): the filter returns 0x%08x, the rules say 0x%08x"):format(
        table.concat(args, ", "), got, want), 2)
    end
  end
  return true
end

local function T(index, op, value) return { index = index, op = op, value = value } end

describe("seccomp rules merged by libseccomp", function()
  before_each(function()
    if not AUDIT_ARCH[seccomp.native_arch] then
      pending("no audit architecture number here for " .. seccomp.native_arch)
    end
  end)

  it("refuses a test before a later argument's when the syscall has another rule", function()
    -- the pair libseccomp builds into a filter that allows dup3(6, 100, 0, 8), which neither
    -- rule allows
    local ok, err = check { { args = { T(2, "==", 8), T(0, "!=", 7) } }, { args = { T(0, "!=", 6), T(3, "==", 8) } } }
    assert.is_false(ok)
    assert.matches("^seccomp: rules%[1%] %(dup3%): its test 'a0 != 7' comes before a later argument's, "
      .. "and libseccomp merges another rule for the syscall %(rules%[2%]%) into such a test wrongly", err)
    -- the pair libseccomp never finishes merging (the fuzzer's input, reduced)
    ok, err = check { { args = { T(2, "==", 8), T(0, "!=", 7) } }, { args = { T(5, "==", 8), T(0, "!=", 7) } } }
    assert.is_false(ok)
    assert.matches("rules%[1%] %(dup3%): its test 'a0 != 7'", err)
    -- the other rule may come first, and be a plain one; every ordering operator counts
    for _, op in ipairs { "<", "<=", ">", ">=" } do
      ok, err = check { { args = { T(3, "==", 1) } }, { args = { T(0, op, 7), T(1, "==", 2) } } }
      assert.is_false(ok)
      assert.matches("rules%[2%] %(dup3%): its test 'a0 " .. op:gsub("%p", "%%%0") .. " 7'.*%(rules%[1%]%)", err)
    end
    -- a rule entry naming the syscall with others: the entry is named
    ok, err = pcall(seccomp.filter, { default = { errno = 1 }, rules = {
      { syscalls = { "dup", "dup3" }, action = "allow", args = { T(0, "!=", 7), T(1, "==", 2) } },
      { syscall = "dup3", action = "log", args = { T(1, "==", 3) } } } })
    assert.is_false(ok)
    assert.matches("rules%[1%] %(dup3%):.*%(rules%[2%]%)", err)
  end)

  it("builds such a rule alone, in copies, or with the test on its last argument, and decides right", function()
    assert.is_true(check { { args = { T(2, "==", 8), T(0, "!=", 7) } } })
    assert.is_true(check { { args = { T(2, "==", 8), T(0, "!=", 7) } }, { args = { T(2, "==", 8), T(0, "!=", 7) } } })
    assert.is_true(check { { args = { T(1, ">", 5), T(0, "<=", 7), T(3, "==", 6) } } })
    assert.is_true(check { { args = { T(1, "==", 8), T(3, "!=", 7) } }, { args = { T(2, "==", 8), T(3, "!=", 7) } } })
    assert.is_true(check { { args = { T(1, "==", 8), T(3, "<", 7) } }, { args = { T(1, "==", 8), T(3, ">", 9) } } })
    assert.is_true(check { { args = { T(0, "==", 7), T(2, "==", 8) } }, { args = { T(0, "==", 7), T(1, "==", 8) } } })
  end)

  it("decides as the rules say for random rule sets, or refuses exactly the shape above", function()
    local ops = { "==", "!=", "<", "<=", ">", ">=" }
    local seed = tonumber(os.getenv("CLAWLUA_SECCOMP_MERGE_SEED") or "") or 20261207
    math.randomseed(seed)
    local built, refused = 0, 0
    for trial = 1, 120 do
      local rules = {}
      for r = 1, math.random(1, 3) do
        local idx, args = { 0, 1, 2, 3 }, {}
        for t = 1, math.random(1, 3) do
          local j = math.random(t, 4)
          idx[t], idx[j] = idx[j], idx[t]
          args[t] = T(idx[t], ops[math.random(#ops)], math.random(5, 8))
        end
        rules[r] = { args = args }
      end
      local hazard = false
      for i, r in ipairs(rules) do
        if branching(r) then
          for j, o in ipairs(rules) do hazard = hazard or (i ~= j and not same(r, o)) end
        end
      end
      local ok, err = check(rules)
      if hazard then
        assert(not ok and err:match("comes before a later argument's"),
          ("seed %d trial %d: built, or refused for another reason: %s"):format(seed, trial, tostring(err)))
        refused = refused + 1
      else
        assert(ok, ("seed %d trial %d: %s"):format(seed, trial, tostring(err)))
        built = built + 1
      end
    end
    assert.is_true(built > 20 and refused > 20, ("built %d, refused %d"):format(built, refused))
  end)
end)
