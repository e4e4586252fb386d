-- A JSON Schema 2020-12 validator for MCP tool arguments and results.
--
-- Keywords: type, enum, const, properties, patternProperties, additionalProperties, required,
-- propertyNames, minProperties, maxProperties, dependentRequired, dependentSchemas, items,
-- prefixItems, contains, minContains, maxContains, minItems, maxItems, uniqueItems, minLength,
-- maxLength (code points), pattern, minimum, maximum, exclusiveMinimum, exclusiveMaximum,
-- multipleOf, allOf, anyOf, oneOf, not, if/then/else, $ref / $defs (and definitions) within the
-- document ("#", "#/json/pointer", "#anchor" through $anchor), boolean schemas. For schemas
-- written for older drafts: the array form of `items` with `additionalItems`, and
-- `dependencies`, are read as 2020-12's prefixItems/items and dependentRequired/Schemas.
-- Not supported (ignored): unevaluatedProperties/unevaluatedItems, $dynamicRef, remote and
-- $id-relative references (the schema is refused), and `format`, which 2020-12 makes an
-- annotation.
--
-- Schemas can come from the other side (an MCP server's outputSchema), so a schema this file
-- cannot use — a keyword of the wrong type, a $ref that does not resolve or loops without
-- consuming the value, a pattern outside the subset — makes validate() return nil and
-- "schema: <reason>" instead of raising, and one validation is bounded: M.MAX_DEPTH nested
-- subschema checks, M.MAX_STEPS subschema checks in all.
--
-- `pattern` is an ECMA-262 regular expression, which Lua patterns are not; this file has a
-- small backtracking engine for the subset: literals, `.`, classes `[a-z\d]` and `[^...]`,
-- escapes \d \D \w \W \s \S \b \B \t \n \r \f \v \0 \xHH \uHHHH and escaped punctuation,
-- anchors ^ $, groups (...) and (?:...), alternation |, quantifiers * + ? {n} {n,} {n,m} and
-- their lazy forms, lookahead (?=...) (?!...). Matching is on code points, unanchored (search),
-- with a step budget against catastrophic backtracking. Not supported (compile error):
-- backreferences, lookbehind, named groups, \p{...} classes, flags.
local claw = require "clawlua"

local json = claw.json
local is_marked_array = json.is_array

local M = {}

--- Subschemas checked inside one another (a $ref cycle that never descends into the value
--- stops here), and in all, per validation.
M.MAX_DEPTH = 1000
M.MAX_STEPS = 1000000
--- Matching steps of one `pattern` against one string (read at each match).
M.MAX_REGEX_STEPS = 1000000

---------------------------------------------------------------------------------------------
-- JSON values seen from Lua
---------------------------------------------------------------------------------------------

--- The JSON type of a Lua value: decoded arrays are marked; a plain table is an array when it
--- has [1], otherwise an object (so an empty unmarked table is an object).
---@return string "null"|"boolean"|"integer"|"number"|"string"|"array"|"object"|"invalid"
function M.kind(v)
  local t = type(v)
  if t == "string" then return "string" end
  if t == "number" then
    if math.type(v) == "integer" then return "integer" end
    if v == math.floor(v) and v > -math.huge and v < math.huge then return "integer" end
    return "number"
  end
  if t == "boolean" then return "boolean" end
  if v == json.null then return "null" end
  if t == "table" then
    if is_marked_array(v) or rawget(v, 1) ~= nil then return "array" end
    return "object"
  end
  return "invalid"
end
local kind = M.kind

local function is_array(v) return kind(v) == "array" end

--- JSON equality: numbers by value (1 == 1.0), arrays by elements, objects by members.
local function equal(a, b)
  if a == b then return true end
  local ka, kb = kind(a), kind(b)
  if ka == "integer" then ka = "number" end
  if kb == "integer" then kb = "number" end
  if ka ~= kb then return false end
  if ka == "array" then
    if #a ~= #b then return false end
    for i = 1, #a do if not equal(a[i], b[i]) then return false end end
    return true
  elseif ka == "object" then
    for k, v in pairs(a) do if b[k] == nil or not equal(v, b[k]) then return false end end
    for k in pairs(b) do if a[k] == nil then return false end end
    return true
  end
  return false
end
M.equal = equal

local function ulen(s)
  local n = utf8.len(s)
  return n or #s
end

local function codepoints(s)
  local cps, n = {}, 0
  local ok = pcall(function()
    for _, c in utf8.codes(s) do
      n = n + 1
      cps[n] = c
    end
  end)
  if not ok then
    cps, n = {}, #s
    for i = 1, n do cps[i] = s:byte(i) end
  end
  return cps, n
end

---------------------------------------------------------------------------------------------
-- ECMA-262 regular expressions (the subset above)
---------------------------------------------------------------------------------------------

local SPACE = { [9] = true, [10] = true, [11] = true, [12] = true, [13] = true, [32] = true,
  [160] = true, [0x1680] = true, [0x2028] = true, [0x2029] = true, [0x202f] = true,
  [0x205f] = true, [0x3000] = true, [0xfeff] = true }
local function is_space(c) return SPACE[c] or (c >= 0x2000 and c <= 0x200a) end
local function is_digit(c) return c >= 48 and c <= 57 end
local function is_word(c)
  return is_digit(c) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122) or c == 95
end
local CLASS_FN = {
  d = is_digit, w = is_word, s = is_space,
  D = function(c) return not is_digit(c) end,
  W = function(c) return not is_word(c) end,
  S = function(c) return not is_space(c) end,
}
local CONTROL = { t = 9, n = 10, r = 13, f = 12, v = 11, ["0"] = 0 }

local Parser = {}
Parser.__index = Parser

function Parser:fail(msg)
  error(("regex /%s/: %s at offset %d"):format(self.src, msg, self.i - 1), 0)
end

function Parser:peek() return self.cps[self.i] end
function Parser:next()
  local c = self.cps[self.i]
  self.i = self.i + 1
  return c
end

local function hex_digits(p, count)
  local v = 0
  for _ = 1, count do
    local c = p:next()
    if not c then p:fail("truncated escape") end
    local ch = utf8.char(c)
    local d = tonumber(ch, 16)
    if not d then p:fail("bad hex digit") end
    v = v * 16 + d
  end
  return v
end

--- An escape after '\': returns a code point, or a predicate function.
function Parser:escape(in_class)
  local c = self:next()
  if not c then self:fail("trailing backslash") end
  local ch = utf8.char(c)
  if CLASS_FN[ch] then return CLASS_FN[ch] end
  if CONTROL[ch] then return CONTROL[ch] end
  if ch == "x" then return hex_digits(self, 2) end
  if ch == "u" then return hex_digits(self, 4) end
  if ch == "b" and in_class then return 8 end
  if ch:match("%d") then self:fail("backreferences are not supported") end
  if ch == "p" or ch == "P" then self:fail("unicode property escapes are not supported") end
  if ch == "k" then self:fail("named backreferences are not supported") end
  if ch == "c" then
    local l = self:next()
    if not l then self:fail("truncated \\c") end
    return l % 32
  end
  return c -- an escaped literal (punctuation, or an identity escape)
end

function Parser:class()
  local negate = false
  if self:peek() == 94 then -- ^
    negate = true
    self:next()
  end
  local items = {}
  local first = true
  while true do
    local c = self:next()
    if not c then self:fail("unterminated character class") end
    if c == 93 and not first then break end -- ]
    if c == 93 and first then break end     -- [] matches nothing, [^] anything
    first = false
    local lo = c
    if c == 92 then lo = self:escape(true) end
    if type(lo) == "number" and self:peek() == 45 and self.cps[self.i + 1] and self.cps[self.i + 1] ~= 93 then
      self:next() -- '-'
      local hi = self:next()
      if hi == 92 then hi = self:escape(true) end
      if type(hi) ~= "number" or hi < lo then self:fail("bad range in character class") end
      items[#items + 1] = { lo, hi }
    else
      items[#items + 1] = lo
    end
  end
  return { t = "class", items = items, negate = negate }
end

function Parser:atom()
  local c = self:next()
  if c == 40 then -- (
    local look
    if self:peek() == 63 then -- ?
      self:next()
      local k = self:next()
      if k == 61 then look = "pos"
      elseif k == 33 then look = "neg"
      elseif k == 60 then self:fail("lookbehind and named groups are not supported")
      elseif k ~= 58 then self:fail("unsupported group") end -- 58: (?: a plain group
    end
    local alt = self:alternation()
    if self:next() ~= 41 then self:fail("missing )") end
    if look then return { t = "look", alt = alt, negate = look == "neg" }, true end
    return { t = "group", alt = alt }
  elseif c == 91 then return self:class()
  elseif c == 46 then return { t = "any" }
  elseif c == 94 then return { t = "bol" }, true
  elseif c == 36 then return { t = "eol" }, true
  elseif c == 92 then
    local nxt = self:peek()
    if nxt == 98 or nxt == 66 then -- \b \B
      self:next()
      return { t = "wordb", negate = nxt == 66 }, true
    end
    local e = self:escape(false)
    if type(e) == "function" then return { t = "class", items = { e }, negate = false } end
    return { t = "char", c = e }
  elseif c == 42 or c == 43 or c == 63 then self:fail("nothing to repeat")
  end
  return { t = "char", c = c }
end

function Parser:number()
  local n
  while self:peek() and is_digit(self:peek()) do
    n = (n or 0) * 10 + (self:next() - 48)
  end
  return n
end

function Parser:quantifier()
  local c = self:peek()
  local min, max
  if c == 42 then min, max = 0, math.huge
  elseif c == 43 then min, max = 1, math.huge
  elseif c == 63 then min, max = 0, 1
  elseif c == 123 then -- {
    local save = self.i
    self:next()
    min = self:number()
    if min and self:peek() == 125 then max = min
    elseif min and self:peek() == 44 then
      self:next()
      max = self:number() or math.huge
    end
    if not min or self:peek() ~= 125 then
      self.i = save -- not a quantifier: a literal '{'
      return nil
    end
    if max < min then self:fail("numbers out of order in {} quantifier") end
  else
    return nil
  end
  self:next()
  local greedy = true
  if self:peek() == 63 then
    self:next()
    greedy = false
  end
  return min, max, greedy
end

function Parser:sequence()
  local seq = {}
  while true do
    local c = self:peek()
    if c == nil or c == 124 or c == 41 then break end -- end, |, )
    local atom, assertion = self:atom()
    local min, max, greedy = self:quantifier()
    if min and assertion then self:fail("nothing to repeat") end
    seq[#seq + 1] = { atom = atom, min = min or 1, max = max or 1, greedy = greedy ~= false }
  end
  return seq
end

function Parser:alternation()
  local alts = { self:sequence() }
  while self:peek() == 124 do
    self:next()
    alts[#alts + 1] = self:sequence()
  end
  return alts
end

local function class_has(node, c)
  local hit = false
  for _, it in ipairs(node.items) do
    local ty = type(it)
    if (ty == "number" and it == c) or (ty == "table" and c >= it[1] and c <= it[2])
        or (ty == "function" and it(c)) then
      hit = true
      break
    end
  end
  return hit ~= node.negate
end

--- Compiles an ECMA-262 pattern (the subset above) to a function(string) -> boolean.
---@param src string
---@return fun(s: string): boolean
function M.regex(src)
  local cps = codepoints(src)
  local p = setmetatable({ src = src, cps = cps, i = 1 }, Parser)
  local alts = p:alternation()
  if p.i <= #cps then p:fail("unmatched )") end

  return function(subject)
    local s, n = codepoints(subject)
    local steps, max_steps = 0, M.MAX_REGEX_STEPS
    local match_alt

    local function word_at(i) return i >= 1 and i <= n and is_word(s[i]) end

    local function match_atom(a, pos, k)
      steps = steps + 1
      if steps > max_steps then error("regex /" .. src .. "/: too many backtracking steps", 0) end
      local t = a.t
      if t == "char" then
        return s[pos] == a.c and k(pos + 1)
      elseif t == "any" then
        local c = s[pos]
        return c ~= nil and c ~= 10 and c ~= 13 and c ~= 0x2028 and c ~= 0x2029 and k(pos + 1)
      elseif t == "class" then
        local c = s[pos]
        return c ~= nil and class_has(a, c) and k(pos + 1)
      elseif t == "group" then
        return match_alt(a.alt, pos, k)
      elseif t == "bol" then
        return pos == 1 and k(pos)
      elseif t == "eol" then
        return pos == n + 1 and k(pos)
      elseif t == "wordb" then
        local at = word_at(pos - 1) ~= word_at(pos)
        return at ~= a.negate and k(pos)
      elseif t == "look" then
        local found = match_alt(a.alt, pos, function() return true end) and true or false
        return found ~= a.negate and k(pos)
      end
      return false
    end

    local function match_item(it, pos, k)
      local function rep(count, at)
        local function more()
          return count < it.max and match_atom(it.atom, at, function(np)
            if np == at and count >= it.min then return false end -- an empty loop ends here
            return rep(count + 1, np)
          end)
        end
        if it.greedy then
          return more() or (count >= it.min and k(at))
        end
        return (count >= it.min and k(at)) or more()
      end
      return rep(0, pos)
    end

    local function match_seq(seq, idx, pos, k)
      local it = seq[idx]
      if not it then return k(pos) end
      return match_item(it, pos, function(np) return match_seq(seq, idx + 1, np, k) end)
    end

    function match_alt(alternatives, pos, k)
      for _, seq in ipairs(alternatives) do
        if match_seq(seq, 1, pos, k) then return true end
      end
      return false
    end

    local accept = function() return true end
    for start = 1, n + 1 do
      if match_alt(alts, start, accept) then return true end
    end
    return false
  end
end

---------------------------------------------------------------------------------------------
-- Validation
---------------------------------------------------------------------------------------------

local function path_key(path, k)
  if type(k) == "number" then return path .. "[" .. (k - 1) .. "]" end
  if k:match("^[%a_][%w_]*$") then return path .. "." .. k end
  return path .. "[" .. json.encode(k) .. "]"
end

local function unescape_pointer(tok)
  tok = tok:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
  return (tok:gsub("~1", "/"):gsub("~0", "~"))
end

local Validator = {}
Validator.__index = Validator

function Validator:find_anchor(node, name)
  if type(node) ~= "table" then return nil end
  if node["$anchor"] == name then return node end
  for _, v in pairs(node) do
    local f = self:find_anchor(v, name)
    if f then return f end
  end
  return nil
end

function Validator:resolve(ref)
  local cached = self.refs[ref]
  if cached ~= nil then return cached end
  local target
  if ref == "#" then
    target = self.root
  elseif ref:sub(1, 2) == "#/" then
    target = self.root
    for tok in ref:sub(3):gmatch("[^/]*") do
      if type(target) ~= "table" then target = nil break end
      tok = unescape_pointer(tok)
      local key = tok
      if kind(target) == "array" then key = tonumber(tok) and (tonumber(tok) + 1) end
      target = key and target[key]
    end
  elseif ref:sub(1, 1) == "#" then
    target = self:find_anchor(self.root, ref:sub(2))
  else
    error(("schema: $ref '%s' is not supported (only references within the document)"):format(ref), 0)
  end
  if target == nil then error(("schema: $ref '%s' does not resolve"):format(ref), 0) end
  self.refs[ref] = target
  return target
end

function Validator:regex(src)
  local re = self.regexes[src]
  if not re then
    re = M.regex(src)
    self.regexes[src] = re
  end
  return re
end

local check

local function fail(errs, path, msg)
  if errs then errs[#errs + 1] = path .. ": " .. msg end
  return false
end

local function type_matches(want, k)
  if want == k then return true end
  return want == "number" and k == "integer"
end

local function describe(k) return k == "integer" and "number" or k end

local function check_number(_, s, v, path, errs)
  local ok = true
  if s.minimum ~= nil and v < s.minimum then ok = fail(errs, path, ("must be >= %s"):format(s.minimum)) end
  if s.maximum ~= nil and v > s.maximum then ok = fail(errs, path, ("must be <= %s"):format(s.maximum)) end
  local xmin, xmax = s.exclusiveMinimum, s.exclusiveMaximum
  if type(xmin) == "number" and v <= xmin then ok = fail(errs, path, ("must be > %s"):format(xmin)) end
  if type(xmax) == "number" and v >= xmax then ok = fail(errs, path, ("must be < %s"):format(xmax)) end
  local m = s.multipleOf
  if type(m) == "number" and m > 0 then
    local good
    if math.type(v) == "integer" and math.type(m) == "integer" then
      good = v % m == 0
    else
      local q = v / m
      good = q > -math.huge and q < math.huge and math.abs(q - math.floor(q + 0.5)) < 1e-9
    end
    if not good then ok = fail(errs, path, ("must be a multiple of %s"):format(m)) end
  end
  return ok
end

local function check_string(self, s, v, path, errs)
  local ok = true
  if s.minLength or s.maxLength then
    local n = ulen(v)
    if s.minLength and n < s.minLength then
      ok = fail(errs, path, ("must be at least %d characters"):format(s.minLength))
    end
    if s.maxLength and n > s.maxLength then
      ok = fail(errs, path, ("must be at most %d characters"):format(s.maxLength))
    end
  end
  if type(s.pattern) == "string" and not self:regex(s.pattern)(v) then
    ok = fail(errs, path, ("must match /%s/"):format(s.pattern))
  end
  return ok
end

local function check_array(self, s, v, path, errs)
  local ok = true
  local n = #v
  if s.minItems and n < s.minItems then ok = fail(errs, path, ("must have at least %d items"):format(s.minItems)) end
  if s.maxItems and n > s.maxItems then ok = fail(errs, path, ("must have at most %d items"):format(s.maxItems)) end
  local prefix, rest = s.prefixItems, s.items
  if type(rest) == "table" and is_array(rest) and not is_array(prefix) then
    prefix, rest = rest, s.additionalItems -- the pre-2020-12 array form of `items`
  end
  local np = 0
  if type(prefix) == "table" then
    np = #prefix
    for i = 1, math.min(np, n) do
      if not check(self, prefix[i], v[i], errs and path_key(path, i) or path, errs) then
        ok = false
        if not errs then return false end
      end
    end
  end
  if rest ~= nil then
    for i = np + 1, n do
      if not check(self, rest, v[i], errs and path_key(path, i) or path, errs) then
        ok = false
        if not errs then return false end
      end
    end
  end
  if s.contains ~= nil then
    local hits = 0
    for i = 1, n do
      if check(self, s.contains, v[i], path, nil) then hits = hits + 1 end
    end
    local min = s.minContains or 1
    if hits < min then ok = fail(errs, path, ("must contain at least %d matching items"):format(min)) end
    if s.maxContains and hits > s.maxContains then
      ok = fail(errs, path, ("must contain at most %d matching items"):format(s.maxContains))
    end
  end
  if s.uniqueItems == true then
    for i = 1, n do
      for j = i + 1, n do
        if equal(v[i], v[j]) then
          return fail(errs, path, ("items %d and %d are equal"):format(i - 1, j - 1))
        end
      end
    end
  end
  return ok
end

local function check_object(self, s, v, path, errs)
  local ok = true
  local function sub(schema, val, p)
    if not check(self, schema, val, p, errs) then ok = false end
    return ok or errs ~= nil
  end
  if s.required then
    for _, name in ipairs(s.required) do
      if v[name] == nil then ok = fail(errs, path_key(path, name), "is required") end
    end
    if not ok and not errs then return false end
  end
  if s.minProperties or s.maxProperties then
    local n = 0
    for _ in pairs(v) do n = n + 1 end
    if s.minProperties and n < s.minProperties then
      ok = fail(errs, path, ("must have at least %d properties"):format(s.minProperties))
    end
    if s.maxProperties and n > s.maxProperties then
      ok = fail(errs, path, ("must have at most %d properties"):format(s.maxProperties))
    end
  end
  local props, pprops, addl = s.properties, s.patternProperties, s.additionalProperties
  if props or pprops or addl ~= nil or s.propertyNames ~= nil then
    for k, val in pairs(v) do
      if type(k) == "string" then
        local p = errs and path_key(path, k) or path -- names only matter in messages
        local matched = false
        if props and props[k] ~= nil then
          matched = true
          if not sub(props[k], val, p) then return false end
        end
        if pprops then
          for pat, ps in pairs(pprops) do
            if self:regex(pat)(k) then
              matched = true
              if not sub(ps, val, p) then return false end
            end
          end
        end
        if not matched and addl ~= nil then
          if addl == false then
            ok = fail(errs, p, "is not allowed (no such property)")
            if not errs then return false end
          elseif not sub(addl, val, p) then
            return false
          end
        end
        if s.propertyNames ~= nil and not check(self, s.propertyNames, k, p, nil) then
          ok = fail(errs, p, "is not an allowed property name")
          if not errs then return false end
        end
      end
    end
  end
  local dreq, dsch = s.dependentRequired, s.dependentSchemas
  if type(s.dependencies) == "table" then -- pre-2020-12 `dependencies`: arrays or schemas
    dreq, dsch = dreq or {}, dsch or {}
    for k, d in pairs(s.dependencies) do
      if is_array(d) then dreq[k] = d else dsch[k] = d end
    end
  end
  if dreq then
    for k, names in pairs(dreq) do
      if v[k] ~= nil then
        for _, name in ipairs(names) do
          if v[name] == nil then
            ok = fail(errs, path_key(path, name), ("is required when '%s' is present"):format(k))
          end
        end
      end
    end
  end
  if dsch then
    for k, ds in pairs(dsch) do
      if v[k] ~= nil and not sub(ds, v, path) then return false end
    end
  end
  return ok
end

local function check_combinators(self, s, v, path, errs)
  local ok = true
  if s.allOf then
    for _, sub in ipairs(s.allOf) do
      if not check(self, sub, v, path, errs) then ok = false if not errs then return false end end
    end
  end
  if s.anyOf then
    local any = false
    for _, sub in ipairs(s.anyOf) do
      if check(self, sub, v, path, nil) then any = true break end
    end
    if not any then ok = fail(errs, path, "must match at least one schema of anyOf") end
  end
  if s.oneOf then
    local hits = 0
    for _, sub in ipairs(s.oneOf) do
      if check(self, sub, v, path, nil) then hits = hits + 1 end
    end
    if hits ~= 1 then ok = fail(errs, path, ("must match exactly one schema of oneOf (matched %d)"):format(hits)) end
  end
  if s["not"] ~= nil and check(self, s["not"], v, path, nil) then
    ok = fail(errs, path, "must not match the schema of not")
  end
  if s["if"] ~= nil then
    local branch
    if check(self, s["if"], v, path, nil) then branch = s["then"] else branch = s["else"] end
    if branch ~= nil and not check(self, branch, v, path, errs) then ok = false end
  end
  return ok
end

local function check_inner(self, s, v, path, errs)
  if s == true then return true end
  if s == false then return fail(errs, path, "is not allowed (false schema)") end
  if type(s) ~= "table" then error(("schema at %s: a schema is an object or a boolean"):format(path), 0) end
  local ok = true
  if s["$ref"] then
    if not check(self, self:resolve(s["$ref"]), v, path, errs) then
      ok = false
      if not errs then return false end
    end
  end
  local k = kind(v)
  local want = s.type
  if want ~= nil then
    local match = false
    if type(want) == "string" then
      match = type_matches(want, k)
    else
      for _, w in ipairs(want) do if type_matches(w, k) then match = true break end end
    end
    if not match then
      local w = type(want) == "string" and want or table.concat(want, " or ")
      return fail(errs, path, ("%s expected, got %s"):format(w, describe(k)))
    end
  end
  if s.enum ~= nil then
    local found = false
    for _, e in ipairs(s.enum) do if equal(e, v) then found = true break end end
    if not found then
      ok = fail(errs, path, "must be one of " .. (json.encode(s.enum) or "the enum"))
      if not errs then return false end
    end
  end
  if s.const ~= nil and not equal(s.const, v) then
    ok = fail(errs, path, "must be " .. (json.encode(s.const) or "the const value"))
    if not errs then return false end
  end
  local good = true
  if k == "integer" or k == "number" then good = check_number(self, s, v, path, errs)
  elseif k == "string" then good = check_string(self, s, v, path, errs)
  elseif k == "array" then good = check_array(self, s, v, path, errs)
  elseif k == "object" then good = check_object(self, s, v, path, errs)
  end
  if not good then
    ok = false
    if not errs then return false end
  end
  if (s.allOf or s.anyOf or s.oneOf or s["not"] ~= nil or s["if"] ~= nil)
      and not check_combinators(self, s, v, path, errs) then
    ok = false
  end
  return ok
end

---------------------------------------------------------------------------------------------
-- Compiled checks
---------------------------------------------------------------------------------------------
-- A schema made only of the keywords below becomes a tree of closures that says valid or not
-- without looking a keyword up at call time (tool arguments are checked on every call). Any
-- other keyword ($ref, pattern, combinators, ...) leaves the schema to `check`, which also
-- explains every failure: a compiled check only ever answers "valid" on its own.

local ANNOTATION = { description = true, title = true, default = true, examples = true,
                     ["$comment"] = true, deprecated = true, readOnly = true, writeOnly = true,
                     format = true }
local COMPILED = { type = true, enum = true, properties = true, required = true,
                   additionalProperties = true, minLength = true, maxLength = true, minimum = true,
                   maximum = true, exclusiveMinimum = true, exclusiveMaximum = true, items = true,
                   minItems = true, maxItems = true }

local compile

local function compile_object(s)
  local props, addl, req = {}, nil, nil
  if s.properties ~= nil then
    if kind(s.properties) ~= "object" then return nil end
    for k, sub in pairs(s.properties) do
      props[k] = compile(sub)
      if not props[k] then return nil end
    end
  end
  if s.additionalProperties ~= nil and s.additionalProperties ~= false then
    addl = compile(s.additionalProperties)
    if not addl then return nil end
  end
  local no_extra = s.additionalProperties == false
  if s.required ~= nil then
    if kind(s.required) ~= "array" then return nil end
    req = s.required
  end
  local walk = s.properties ~= nil or s.additionalProperties ~= nil
  return function(v)
    if req then
      for i = 1, #req do if v[req[i]] == nil then return false end end
    end
    if walk then
      for k, val in pairs(v) do
        if type(k) == "string" then
          local c = props[k]
          if c then
            if not c(val) then return false end
          elseif no_extra then
            return false
          elseif addl and not addl(val) then
            return false
          end
        end
      end
    end
    return true
  end
end

function compile(s)
  if s == true then return function() return true end end
  if type(s) ~= "table" or kind(s) ~= "object" then return nil end
  for k in pairs(s) do
    if not COMPILED[k] and not ANNOTATION[k] then return nil end
  end
  local want = s.type
  if want ~= nil and type(want) ~= "string" then
    if kind(want) ~= "array" then return nil end
    for _, w in ipairs(want) do if type(w) ~= "string" then return nil end end
  end
  local enum = s.enum
  if enum ~= nil and kind(enum) ~= "array" then return nil end
  local min_len, max_len = s.minLength, s.maxLength
  local minimum, maximum = s.minimum, s.maximum
  local xmin, xmax = s.exclusiveMinimum, s.exclusiveMaximum
  local min_items, max_items = s.minItems, s.maxItems
  for _, n in ipairs { min_len or 0, max_len or 0, minimum or 0, maximum or 0, xmin or 0, xmax or 0,
                       min_items or 0, max_items or 0 } do
    if type(n) ~= "number" then return nil end
  end
  local items
  if s.items ~= nil then
    if kind(s.items) == "array" then return nil end -- the pre-2020-12 form: left to `check`
    items = compile(s.items)
    if not items then return nil end
  end
  local object = compile_object(s)
  if not object then return nil end
  local has_len = min_len ~= nil or max_len ~= nil
  -- The two shapes of nearly every tool argument, without working out the value's kind.
  if want == "string" and not enum then
    if not has_len then return function(v) return type(v) == "string" end end
    return function(v)
      if type(v) ~= "string" then return false end
      local n = ulen(v)
      return not ((min_len and n < min_len) or (max_len and n > max_len))
    end
  end
  if want == "object" and not enum then
    return function(v)
      if type(v) ~= "table" or is_marked_array(v) or rawget(v, 1) ~= nil then return false end
      return object(v)
    end
  end
  return function(v)
    local k = kind(v)
    if want ~= nil then
      if type(want) == "string" then
        if not type_matches(want, k) then return false end
      else
        local match = false
        for i = 1, #want do if type_matches(want[i], k) then match = true break end end
        if not match then return false end
      end
    end
    if enum then
      local found = false
      for i = 1, #enum do if equal(enum[i], v) then found = true break end end
      if not found then return false end
    end
    if k == "string" then
      if has_len then
        local n = ulen(v)
        if (min_len and n < min_len) or (max_len and n > max_len) then return false end
      end
    elseif k == "integer" or k == "number" then
      if (minimum and v < minimum) or (maximum and v > maximum) or (xmin and v <= xmin)
          or (xmax and v >= xmax) then
        return false
      end
    elseif k == "array" then
      local n = #v
      if (min_items and n < min_items) or (max_items and n > max_items) then return false end
      if items then
        for i = 1, n do if not items(v[i]) then return false end end
      end
    elseif k == "object" then
      return object(v)
    end
    return true
  end
end

function check(self, s, v, path, errs)
  local depth, steps = self.depth + 1, self.steps + 1
  if depth > M.MAX_DEPTH then
    error(("schema: subschemas nested deeper than %d at %s (a $ref cycle?)"):format(M.MAX_DEPTH, path), 0)
  end
  if steps > M.MAX_STEPS then
    error(("schema: validation needs more than %d subschema checks"):format(M.MAX_STEPS), 0)
  end
  self.depth, self.steps, self.at = depth, steps, path
  local ok = check_inner(self, s, v, path, errs)
  self.depth = depth - 1
  return ok
end

--- A compiled validator for `schema` (a decoded JSON Schema; its own root for $ref).
---@param schema table|boolean
---@return {validate: fun(self, value: any, ref: string|nil): boolean, string[]|nil}
function M.new(schema)
  if type(schema) ~= "table" and type(schema) ~= "boolean" then
    error("bad argument #1 to 'schema.new' (schema table or boolean expected)", 2)
  end
  return setmetatable({ root = schema, refs = {}, regexes = {}, compiled = nil, depth = 0, steps = 0 },
    Validator)
end

local function run(self, value, ref)
  if not ref then
    local c = self.compiled
    if c == nil then
      c = compile(self.root) or false -- on first use: a tool set starts without compiling
      self.compiled = c
    end
    if c and c(value) then return true end
  end
  local s = ref and self:resolve(ref) or self.root
  -- First the yes/no pass, which builds no paths or messages (most values are valid); then,
  -- for an invalid value or a schema that raises, the pass that names every problem.
  local done, ok = pcall(check, self, s, value, "$", nil)
  if done and ok then return true end
  self.depth, self.steps, self.at = 0, 0, "$" -- the yes/no pass may have stopped half-way
  local errs = {}
  if check(self, s, value, "$", errs) then return true end
  return false, errs
end

--- Validates `value` against the root schema (or the subschema at `ref`, e.g. "#/$defs/Tool").
--- Returns true, or false and the list of problems ("$.command[0]: string expected, got number"),
--- or nil and "schema: <reason>" when the schema cannot be used (see the top of this file).
---@return boolean|nil ok, string[]|string|nil errors
function Validator:validate(value, ref)
  self.depth, self.steps, self.at = 0, 0, "$"
  local ok, res, errs = pcall(run, self, value, ref)
  if ok then return res, errs end
  local msg = tostring(res)
  if msg:match("^schema: ") then return nil, msg end
  -- a keyword of the wrong type met a Lua operation ("attempt to compare number with string")
  return nil, ("schema: unusable schema at %s: %s"):format(self.at, (msg:gsub("^[^:]*:%d+: ", "")))
end

--- One-shot: schema.validate(schema, value) → true | false, errors.
function M.validate(schema, value)
  return M.new(schema):validate(value)
end

return M
