-- Lua 5.4's string patterns (find, match, gmatch, gsub) written in Lua, for code that runs
-- under an instruction budget: policy files and their hooks (clawlua.policy). The C matcher
-- backtracks without executing a Lua instruction, so `s:match(("a*"):rep(20) .. "b")` on a
-- client's argument held the runtime for hours whatever the budget said; here every step of
-- the match is Lua code the budget's hook counts. The semantics are the reference manual's
-- (§6.4.1): classes, sets, the four quantifiers, anchors, captures and position captures,
-- back-references, %b and %f; errors carry the C library's messages.
local byte, sub = string.byte, string.sub
local c_find, c_format, c_type = string.find, string.format, math.type

local M = {}

local MAXCAPTURES = 32
local MAXDEPTH = 200 -- nested calls of the matcher, like the C library's MAXCCALLS
local CAP_UNFINISHED, CAP_POSITION = -1, -2
local PERCENT, LBRACKET, RBRACKET, CARET, DOLLAR = 37, 91, 93, 94, 36
local LPAREN, RPAREN, DOT, STAR, PLUS, MINUS, QUESTION = 40, 41, 46, 42, 43, 45, 63

-- The class letters, as the C library decides them in the C locale.
local class_of = {
  [97] = function(c) return (c >= 65 and c <= 90) or (c >= 97 and c <= 122) end, -- a
  [99] = function(c) return c < 32 or c == 127 end, -- c
  [100] = function(c) return c >= 48 and c <= 57 end, -- d
  [103] = function(c) return c > 32 and c < 127 end, -- g
  [108] = function(c) return c >= 97 and c <= 122 end, -- l
  [112] = function(c) -- p
    return (c >= 33 and c <= 47) or (c >= 58 and c <= 64) or (c >= 91 and c <= 96) or (c >= 123 and c <= 126)
  end,
  [115] = function(c) return c == 32 or (c >= 9 and c <= 13) end, -- s
  [117] = function(c) return c >= 65 and c <= 90 end, -- u
  [119] = function(c) return (c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122) end, -- w
  [120] = function(c) return (c >= 48 and c <= 57) or (c >= 65 and c <= 70) or (c >= 97 and c <= 102) end, -- x
}

local function class_match(c, cl)
  local is = (cl >= 65 and cl <= 90 or cl >= 97 and cl <= 122) and class_of[cl | 0x20]
  if not is then return cl == c end
  if cl >= 97 then return is(c) end
  return not is(c)
end

-- The position just past the single-character class at p.
local function class_end(ms, p)
  local pat = ms.pat
  local c = byte(pat, p)
  p = p + 1
  if c == PERCENT then
    if p > ms.plen then error("malformed pattern (ends with '%')", 0) end
    return p + 1
  elseif c == LBRACKET then
    if byte(pat, p) == CARET then p = p + 1 end
    repeat -- the first character of a set is taken as it is ("[]]")
      if p > ms.plen then error("malformed pattern (missing ']')", 0) end
      local cc = byte(pat, p)
      p = p + 1
      if cc == PERCENT and p <= ms.plen then p = p + 1 end
    until byte(pat, p) == RBRACKET
    return p + 1
  end
  return p
end

-- c in the set [ ... ] that opens at p and whose ']' is at ec.
local function bracket_match(ms, c, p, ec)
  local pat = ms.pat
  local yes = true
  p = p + 1
  if byte(pat, p) == CARET then
    yes = false
    p = p + 1
  end
  while p < ec do
    local pc = byte(pat, p)
    if pc == PERCENT then
      p = p + 1
      if class_match(c, byte(pat, p)) then return yes end
      p = p + 1
    elseif byte(pat, p + 1) == MINUS and p + 2 < ec then
      if pc <= c and c <= byte(pat, p + 2) then return yes end
      p = p + 3
    else
      if pc == c then return yes end
      p = p + 1
    end
  end
  return not yes
end

local function single_match(ms, s, p, ep)
  if s > ms.slen then return false end
  local c = byte(ms.src, s)
  local pc = byte(ms.pat, p)
  if pc == DOT then return true end
  if pc == PERCENT then return class_match(c, byte(ms.pat, p + 1)) end
  if pc == LBRACKET then return bracket_match(ms, c, p, ep - 1) end
  return pc == c
end

local do_match

local function max_expand(ms, s, p, ep)
  local i = 0
  while single_match(ms, s + i, p, ep) do i = i + 1 end
  while i >= 0 do
    local e = do_match(ms, s + i, ep + 1)
    if e then return e end
    i = i - 1
  end
  return nil
end

local function min_expand(ms, s, p, ep)
  while true do
    local e = do_match(ms, s, ep + 1)
    if e then return e end
    if not single_match(ms, s, p, ep) then return nil end
    s = s + 1
  end
end

local function start_capture(ms, s, p, what)
  local level = ms.level + 1
  if level > MAXCAPTURES then error("too many captures", 0) end
  ms.init[level], ms.len[level], ms.level = s, what, level
  local e = do_match(ms, s, p)
  if not e then ms.level = ms.level - 1 end
  return e
end

local function end_capture(ms, s, p)
  local l
  for i = ms.level, 1, -1 do
    if ms.len[i] == CAP_UNFINISHED then
      l = i
      break
    end
  end
  if not l then error("invalid pattern capture", 0) end
  ms.len[l] = s - ms.init[l]
  local e = do_match(ms, s, p)
  if not e then ms.len[l] = CAP_UNFINISHED end
  return e
end

local function match_balance(ms, s, p)
  if p + 1 > ms.plen then error("malformed pattern (missing arguments to '%b')", 0) end
  local src = ms.src
  local b, e = byte(ms.pat, p), byte(ms.pat, p + 1)
  if s > ms.slen or byte(src, s) ~= b then return nil end
  local depth = 1
  s = s + 1
  while s <= ms.slen do
    local c = byte(src, s)
    if c == e then
      depth = depth - 1
      if depth == 0 then return s + 1 end
    elseif c == b then
      depth = depth + 1
    end
    s = s + 1
  end
  return nil
end

local function capture_index(ms, d)
  local l = d - 48
  if l < 1 or l > ms.level or ms.len[l] == CAP_UNFINISHED then
    error(c_format("invalid capture index %%%d", l), 0)
  end
  return l
end

local function match_capture(ms, s, d)
  local l = capture_index(ms, d)
  local len = ms.len[l]
  if ms.slen - s + 1 >= len and sub(ms.src, ms.init[l], ms.init[l] + len - 1) == sub(ms.src, s, s + len - 1) then
    return s + len
  end
  return nil
end

-- The end (one past) of a match of the pattern from p on at s, or nil.
function do_match(ms, s, p)
  ms.depth = ms.depth + 1
  if ms.depth > MAXDEPTH then error("pattern too complex", 0) end
  local pat, plen = ms.pat, ms.plen
  local result
  while true do
    if p > plen then
      result = s
      break
    end
    local pc = byte(pat, p)
    if pc == LPAREN then
      if byte(pat, p + 1) == RPAREN then
        result = start_capture(ms, s, p + 2, CAP_POSITION)
      else
        result = start_capture(ms, s, p + 1, CAP_UNFINISHED)
      end
      break
    elseif pc == RPAREN then
      result = end_capture(ms, s, p + 1)
      break
    elseif pc == DOLLAR and p == plen then
      result = s == ms.slen + 1 and s or nil
      break
    elseif pc == PERCENT and byte(pat, p + 1) == 98 then -- %bxy
      s = match_balance(ms, s, p + 2)
      if not s then break end
      p = p + 4
      goto continue
    elseif pc == PERCENT and byte(pat, p + 1) == 102 then -- %f[set]
      p = p + 2
      if byte(pat, p) ~= LBRACKET then error("missing '[' after '%f' in pattern", 0) end
      do
        local ep = class_end(ms, p)
        local prev = s == 1 and 0 or byte(ms.src, s - 1)
        local cur = s <= ms.slen and byte(ms.src, s) or 0
        if bracket_match(ms, prev, p, ep - 1) or not bracket_match(ms, cur, p, ep - 1) then break end
        p = ep
      end
      goto continue
    elseif pc == PERCENT and (byte(pat, p + 1) or 0) >= 48 and (byte(pat, p + 1) or 0) <= 57 then
      s = match_capture(ms, s, byte(pat, p + 1))
      if not s then break end
      p = p + 2
      goto continue
    end
    do
      local ep = class_end(ms, p)
      local epc = byte(pat, ep)
      if not single_match(ms, s, p, ep) then
        if epc == STAR or epc == QUESTION or epc == MINUS then
          p = ep + 1 -- the item may match nothing
          goto continue
        end
        break
      end
      if epc == QUESTION then
        local e = do_match(ms, s + 1, ep + 1)
        if e then
          result = e
          break
        end
        p = ep + 1
      elseif epc == PLUS then
        result = max_expand(ms, s + 1, p, ep)
        break
      elseif epc == STAR then
        result = max_expand(ms, s, p, ep)
        break
      elseif epc == MINUS then
        result = min_expand(ms, s, p, ep)
        break
      else
        s, p = s + 1, ep
      end
    end
    ::continue::
  end
  ms.depth = ms.depth - 1
  return result
end

local function one_capture(ms, i, s, e)
  if i > ms.level then
    if i ~= 1 then error(c_format("invalid capture index %%%d", i), 0) end
    return sub(ms.src, s, e - 1)
  end
  local len = ms.len[i]
  if len == CAP_UNFINISHED then error("unfinished capture", 0) end
  if len == CAP_POSITION then return ms.init[i] end
  return sub(ms.src, ms.init[i], ms.init[i] + len - 1)
end

-- The captures of a match (the whole match when the pattern has none and `whole`).
local function captures(ms, s, e, whole)
  local n = (ms.level == 0 and whole) and 1 or ms.level
  local out = {}
  for i = 1, n do out[i] = one_capture(ms, i, s, e) end
  return out, n
end

local function new_state(src, pat)
  return { src = src, slen = #src, pat = pat, plen = #pat, level = 0, depth = 0, init = {}, len = {} }
end

local function reset(ms)
  ms.level, ms.depth = 0, 0
end

local function check_string(v, n, fname)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  error(c_format("bad argument #%d to '%s' (string expected, got %s)", n, fname, t), 3)
end

local function start_at(init, len)
  init = init == nil and 1 or init
  if c_type(init) ~= "integer" then
    local i = math.tointeger(init)
    if not i then error("bad argument #3 (number has no integer representation)", 3) end
    init = i
  end
  if init > 0 then return init end
  if init == 0 or init < -len then return 1 end
  return len + init + 1
end

local function find_aux(is_find, s, p, init, plain)
  local fname = is_find and "find" or "match"
  s, p = check_string(s, 1, fname), check_string(p, 2, fname)
  init = start_at(init, #s)
  if init > #s + 1 then return nil end
  if is_find and (plain or not c_find(p, "[%^%$%*%+%?%.%(%[%%%-]")) then
    return c_find(s, p, init, true) -- no specials: a plain search, linear in the C library
  end
  local ms = new_state(s, p)
  local anchor = byte(p, 1) == CARET
  local pstart = anchor and 2 or 1
  local s1 = init
  repeat
    reset(ms)
    local e = do_match(ms, s1, pstart)
    if e then
      if is_find then
        local caps, n = captures(ms, s1, e, false)
        return s1, e - 1, table.unpack(caps, 1, n)
      end
      local caps, n = captures(ms, s1, e, true)
      return table.unpack(caps, 1, n)
    end
    s1 = s1 + 1
  until anchor or s1 > ms.slen + 1
  return nil
end

function M.find(s, p, init, plain) return find_aux(true, s, p, init, plain) end

function M.match(s, p, init) return find_aux(false, s, p, init) end

function M.gmatch(s, p, init)
  s, p = check_string(s, 1, "gmatch"), check_string(p, 2, "gmatch")
  local pos = start_at(init, #s)
  if pos > #s + 1 then pos = #s + 2 end
  local lastmatch
  local ms = new_state(s, p)
  return function()
    while pos <= ms.slen + 1 do
      reset(ms)
      local from = pos
      local e = do_match(ms, from, 1)
      if e and e ~= lastmatch then
        pos, lastmatch = e, e
        local caps, n = captures(ms, from, e, true)
        return table.unpack(caps, 1, n)
      end
      pos = from + 1
    end
    return nil
  end
end

local function add_string(ms, out, s, e, repl)
  local i, n = 1, #repl
  while i <= n do
    local j = c_find(repl, "%", i, true)
    if not j then
      out[#out + 1] = sub(repl, i)
      break
    end
    out[#out + 1] = sub(repl, i, j - 1)
    local d = byte(repl, j + 1)
    if d == PERCENT then
      out[#out + 1] = "%"
    elseif d and d >= 48 and d <= 57 then
      if d == 48 then
        out[#out + 1] = sub(ms.src, s, e - 1)
      else
        local v = one_capture(ms, d - 48, s, e)
        out[#out + 1] = tostring(v)
      end
    else
      error("invalid use of '%' in replacement string", 0)
    end
    i = j + 2
  end
end

local function add_value(ms, out, s, e, repl, kind)
  if kind == "string" then return add_string(ms, out, s, e, repl) end
  local v
  if kind == "table" then
    v = repl[one_capture(ms, 1, s, e)]
  else
    local caps, n = captures(ms, s, e, true)
    v = repl(table.unpack(caps, 1, n))
  end
  if not v then
    out[#out + 1] = sub(ms.src, s, e - 1) -- nil or false: the match stays
  elseif type(v) == "string" or type(v) == "number" then
    out[#out + 1] = tostring(v)
  else
    error(c_format("invalid replacement value (a %s)", type(v)), 0)
  end
end

function M.gsub(s, p, repl, max_n)
  s, p = check_string(s, 1, "gsub"), check_string(p, 2, "gsub")
  local kind = type(repl)
  if kind == "number" then
    repl, kind = tostring(repl), "string"
  elseif kind ~= "string" and kind ~= "table" and kind ~= "function" then
    error(c_format("bad argument #3 to 'gsub' (string/function/table expected, got %s)", kind), 2)
  end
  max_n = max_n == nil and math.maxinteger or max_n
  local anchor = byte(p, 1) == CARET
  local pstart = anchor and 2 or 1
  local ms = new_state(s, p)
  local out, n, src, lastmatch = {}, 0, 1, nil
  while n < max_n do
    reset(ms)
    local e = do_match(ms, src, pstart)
    if e and e ~= lastmatch then
      n = n + 1
      add_value(ms, out, src, e, repl, kind)
      src, lastmatch = e, e
    elseif src <= ms.slen then
      out[#out + 1] = sub(s, src, src)
      src = src + 1
    else
      break
    end
    if anchor then break end
  end
  out[#out + 1] = sub(s, src)
  return table.concat(out), n
end

return M
