-- Policy code matches patterns with clawlua.policy.pattern (Lua 5.4's matcher written in Lua),
-- so the instruction budget counts every step: a backtracking pattern on a client's argument
-- ends at the budget instead of holding the runtime for hours. The Lua matcher must agree
-- with the C one on everything else.
local policy = require "clawlua.policy"
local P = require "clawlua.policy.pattern"
local claw = require "clawlua"
local H = require "helper"
local c_find, c_match, c_gmatch, c_gsub = string.find, string.match, string.gmatch, string.gsub

local function pack(...)
  local t = table.pack(...)
  for i = 1, t.n do t[i] = tostring(t[i]) end
  return table.concat(t, "\1", 1, t.n) .. "#" .. t.n
end

describe("policy patterns", function()
  it("agree with the C library on fixed and random patterns", function()
    local fixed = {
      { "hello world", "(o)(r)" }, { "hello world", "^h(.-)o" }, { "hello", "l*" }, { "abc", "()b()" },
      { "THE (quick) fox", "%((%a+)%)" }, { "THE (quick) fox", "%f[%a]%a+" }, { "a,b,,c", "([^,]*)" },
      { "key = value", "^(%w+)%s*=%s*(%w+)$" }, { "[[x]]", "%b[]" }, { "abcabc", "(abc)%1" },
      { "a]b", "[]]" }, { "a-b", "[a-]" }, { "", "^$" }, { "pypi.org", "^[%w%-%.]+$" },
      { "h\195\169llo", "[\128-\255]+" }, { "  x  ", "^%s*(.-)%s*$" }, { "x)y", ")" },
    }
    for _, c in ipairs(fixed) do
      local s, p = c[1], c[2]
      for _, init in ipairs { 1, 3, -2, 0, 99 } do
        for _, fname in ipairs { "find", "match" } do
          local ok1, r1 = pcall(function() return pack(string[fname](s, p, init)) end)
          local ok2, r2 = pcall(function() return pack(P[fname](s, p, init)) end)
          assert.are.equal(ok1, ok2, fname .. " " .. p)
          if ok1 then assert.are.equal(r1, r2, fname .. " " .. p) end
        end
      end
      local f = function(x) return type(x) == "string" and x:upper() or nil end
      local function all(lib)
        local g = {}
        for x in lib.gmatch(s, p) do g[#g + 1] = tostring(x) end
        return pack(lib.gsub(s, p, "<%0>")) .. pack(lib.gsub(s, p, f, 2)) .. table.concat(g, ",")
      end
      local ok1, r1 = pcall(all, string)
      local ok2, r2 = pcall(all, P)
      assert.are.equal(ok1, ok2, "gsub/gmatch " .. p)
      if ok1 then assert.are.equal(r1, r2, "gsub/gmatch " .. p) end
    end
    for c = 0, 255 do
      for cl in ("acdglpsuwxACDGLPSUWX"):gmatch(".") do
        assert.are.equal(string.find(string.char(c), "%" .. cl) ~= nil, P.find(string.char(c), "%" .. cl) ~= nil)
      end
    end
    for _, p in ipairs { "%", "[a", "(a", "a)", "%b", "%f", "%1", "(()" } do
      local ok1, e1 = pcall(string.find, "abc", p)
      local ok2, e2 = pcall(P.find, "abc", p)
      assert.are.equal(ok1, ok2, p)
      if not ok1 then assert.are.equal(tostring(e1):gsub("^.-: ", ""), tostring(e2):gsub("^.-: ", ""), p) end
    end
    local atoms = { "a", "b", ".", "%a", "%d", "[ab]", "[^a]", "%s", "(", ")", "%1", "%bab", "%f[a]", "^", "$" }
    local quants = { "", "", "*", "+", "-", "?" }
    local rng = 12345
    local function rand(n)
      rng = (rng * 1103515245 + 12345) % 2147483648
      return rng % n + 1
    end
    -- (fewer under the gc stage: a full step at every call makes each round ~100x dearer)
    for _ = 1, os.getenv("CLAWLUA_GC_STRESS") and 500 or 5000 do
      local p, s = {}, {}
      for _ = 1, rand(5) do p[#p + 1] = atoms[rand(#atoms)] .. quants[rand(#quants)] end
      for _ = 1, rand(9) - 1 do s[#s + 1] = ({ "a", "b", " ", "1", "c" })[rand(5)] end
      p, s = table.concat(p), table.concat(s)
      local ok1, r1 = pcall(function() return pack(string.find(s, p)) .. pack(string.gsub(s, p, "<%0>")) end)
      local ok2, r2 = pcall(function() return pack(P.find(s, p)) .. pack(P.gsub(s, p, "<%0>")) end)
      assert.are.equal(ok1, ok2, s .. " / " .. p)
      if ok1 then assert.are.equal(r1, r2, s .. " / " .. p) end
    end
  end)

  it("a backtracking pattern in a policy file or hook ends at the budget", function()
    local dir = H.tmpdir()
    local path = dir .. "/redos.lua"
    H.write_file(path, [[
local subject = ("a"):rep(40)
local hit = subject:match(("a*"):rep(20) .. "b")
return { name = "redos" }
]])
    local t0 = claw.now()
    local p, err = policy.load(path)
    assert.is_nil(p)
    assert.matches("redos%.lua", err)
    assert.matches("instruction budget exceeded", err)
    assert.is_true(claw.now() - t0 < 30)
    -- a hook on a client's argument: denied at the budget, the runtime goes on
    H.write_file(path, [[
return { name = "hook", hooks = { on_tool_call = function(name, args)
  return not args.text:match(("a*"):rep(20) .. "b")
end } }
]])
    p = assert(policy.load(path))
    t0 = claw.now()
    local ok, why = policy.call_hook(p, "on_tool_call", "echo", { text = ("a"):rep(40) }, "client")
    assert.is_false(ok)
    assert.matches("budget", why)
    assert.is_true(claw.now() - t0 < 30)
    -- the usual patterns work, and the real string library is back afterwards
    assert.is_true((policy.call_hook(p, "on_tool_call", "echo", { text = "xyz" }, "client")))
    assert.are.equal(c_find, string.find)
    assert.are.equal(c_match, string.match)
    assert.are.equal(c_gmatch, string.gmatch)
    assert.are.equal(c_gsub, string.gsub)
    H.rm_rf(dir)
  end)
end)
