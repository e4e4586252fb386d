-- clawlua.json: decoding, encoding, limits and errors.
local json = require "clawlua.json"

describe("json.decode", function()
  it("decodes every JSON type", function()
    local v = assert(json.decode('{"s":"x","i":42,"f":2.5,"t":true,"n":null,"a":[1,"b"],"o":{}}'))
    assert.are.equal("x", v.s)
    assert.are.equal(42, v.i)
    assert.are.equal("integer", math.type(v.i))
    assert.are.equal(2.5, v.f)
    assert.is_true(v.t)
    assert.are.equal(json.null, v.n)
    assert.are.same({ 1, "b" }, v.a)
    assert.are.same({}, v.o)
  end)

  it("keeps integers exact up to int64 and turns larger ones into floats", function()
    local v = assert(json.decode("[9007199254740993, -9223372036854775808, 9223372036854775807, 12345678901234567890]"))
    assert.are.equal(9007199254740993, v[1])
    assert.are.equal("integer", math.type(v[1]))
    assert.are.equal(math.mininteger, v[2])
    assert.are.equal(math.maxinteger, v[3])
    assert.are.equal("float", math.type(v[4]))
    assert.are.equal(1.2345678901234567e19, v[4])
  end)

  it("refuses numbers beyond the double range (they could not be encoded back)", function()
    local v, err = json.decode("[1, 1e400]")
    assert.is_nil(v)
    assert.are.equal("json: number out of range at byte 5", err)
    assert.is_nil(json.decode("-1e309"))
    assert.is_nil(json.decode(("9"):rep(400)))
    assert.are.equal(0.0, json.decode("1e-400")) -- underflow keeps the nearest value
  end)

  it("keeps floats floats, including integral ones", function()
    local v = assert(json.decode("[1.0, 1e3, -0.5, 1E-2]"))
    assert.are.equal("float", math.type(v[1]))
    assert.are.equal(1000.0, v[2])
    assert.are.equal("float", math.type(v[2]))
    assert.are.equal(-0.5, v[3])
    assert.are.equal(0.01, v[4])
  end)

  it("decodes escapes and surrogate pairs to UTF-8", function()
    local v = assert(json.decode([["a\"b\\c\/d\b\f\n\r\t\u00e9\u20ac\ud83d\ude00"]]))
    assert.are.equal('a"b\\c/d\b\f\n\r\té€😀', v)
  end)

  it("accepts raw UTF-8 and whitespace around values", function()
    assert.are.equal("héllo — ✓", json.decode(' \n\t"héllo — ✓" \r\n'))
  end)

  local bad = {
    { "", "unexpected end of input at byte 1" },
    { "{", "unexpected end of input in object at byte 2" },
    { '{"a":1,}', "trailing comma in object at byte 8" },
    { "[1,2", "unexpected end of input in array at byte 5" },
    { "[1 2]", "unexpected character '2' at byte 4" },
    { '{"a" 1}', "':' expected after object key at byte 6" },
    { "{1:2}", "object key must be a string at byte 2" },
    { '"abc', "unterminated string at byte 1" },
    { '"a\1b"', "control character in string at byte 3" },
    { '"\\x"', "invalid escape in string at byte 2" },
    { '"\\u12"', "invalid \\u escape at byte 2" },
    { '"\\ud800"', "invalid UTF-16 surrogate pair in \\u escape at byte 2" },
    { '"\\udc00"', "lone UTF-16 surrogate in \\u escape at byte 2" },
    { "01", "leading zero in number at byte 2" },
    { "1.", "digit expected after '.' at byte 3" },
    { "1e", "digit expected in exponent at byte 3" },
    { "-", "unexpected end of input at byte 2" },
    { "tru", "unexpected character 't' at byte 1" },
    { "nul", "unexpected character 'n' at byte 1" },
    { "[] x", "trailing characters after the value at byte 4" },
    { "NaN", "unexpected character 'N' at byte 1" },
  }
  for _, case in ipairs(bad) do
    it("rejects " .. ("%q"):format(case[1]) .. " with a located reason", function()
      local v, err = json.decode(case[1])
      assert.is_nil(v)
      assert.are.equal("json: " .. case[2], err)
    end)
  end

  it("rejects invalid UTF-8: bad bytes, overlong forms, surrogates, truncation", function()
    for _, s in ipairs { '"\xff"', '"\xc0\xaf"', '"\xe0\x80\xaf"', '"\xed\xa0\x80"', '"\xe2\x82"',
                         '"\xf4\x90\x80\x80"', '"ok\x80"' } do
      local v, err = json.decode(s)
      assert.is_nil(v)
      assert.matches("invalid UTF%-8 in string at byte %d+", err)
    end
  end)

  it("enforces the depth limit without crashing", function()
    local deep = string.rep("[", 100000) .. string.rep("]", 100000)
    local v, err = json.decode(deep)
    assert.is_nil(v)
    assert.are.equal("json: nesting deeper than 128 at byte 129", err)
    assert.is_truthy(json.decode(string.rep("[", 128) .. string.rep("]", 128)))
    assert.is_nil((json.decode(string.rep("[", 11) .. string.rep("]", 11), { max_depth = 10 })))
  end)

  it("enforces the size limit", function()
    local v, err = json.decode('"' .. string.rep("a", 100) .. '"', { max_size = 50 })
    assert.is_nil(v)
    assert.are.equal("json: input of 102 bytes is larger than the limit of 50 bytes", err)
  end)

  it("marks arrays so that empty ones re-encode as arrays", function()
    local v = assert(json.decode('{"a":[],"o":{}}'))
    assert.is_true(json.is_array(v.a))
    assert.are.equal('{"a":[],"o":{}}', json.encode(v, { sort_keys = true }))
  end)

  it("sorts keys bytewise in small and large objects alike", function()
    local small, large, want = { b = 1, a = 2, ab = 3 }, {}, {}
    for i = 1, 100 do
      large[("k%03d"):format(101 - i)] = i
      want[#want + 1] = ('"k%03d":%d'):format(i, 101 - i)
    end
    assert.are.equal('{"a":2,"ab":3,"b":1}', json.encode(small, { sort_keys = true }))
    assert.are.equal("{" .. table.concat(want, ",") .. "}", json.encode(large, { sort_keys = true }))
    local v, err = json.encode({ a = { b = { [true] = 1 } } }, { sort_keys = true })
    assert.is_nil(v)
    assert.are.equal("json: cannot sort a boolean key (sort_keys needs string keys) at $.a.b[0]", err)
  end)

  it("raises on misuse: bad option fields", function()
    assert.has_error(function() json.decode("1", { depth = 3 }) end, "bad field 'depth' (unknown field)")
    assert.has_error(function() json.decode("1", { max_depth = "x" }) end,
      "bad field 'max_depth' (integer expected, got string)")
  end)
end)

describe("json.encode", function()
  it("encodes scalars", function()
    assert.are.equal("null", json.encode(nil))
    assert.are.equal("null", json.encode(json.null))
    assert.are.equal("true", json.encode(true))
    assert.are.equal("-42", json.encode(-42))
    assert.are.equal("9223372036854775807", json.encode(math.maxinteger))
    assert.are.equal("-9223372036854775808", json.encode(math.mininteger))
    assert.are.equal("1.5", json.encode(1.5))
    assert.are.equal("1.0", json.encode(1.0))
    assert.are.equal("0.1", json.encode(0.1))
    assert.are.equal('"a\\"\\\\\\n\\u0001é"', json.encode('a"\\\n\1é'))
  end)

  it("round-trips floats exactly", function()
    for _, f in ipairs { 0.1, 1 / 3, math.pi, 1e300, -2.5e-300, 2 ^ 53 + 0.0, 123456.789 } do
      local back = json.decode(json.encode(f))
      assert.are.equal(f, back)
      assert.are.equal("float", math.type(back))
    end
  end)

  it("chooses arrays and objects from the keys", function()
    assert.are.equal("[1,2,3]", json.encode { 1, 2, 3 })
    assert.are.equal("{}", json.encode {})
    assert.are.equal("[]", json.encode(json.array {}))
    assert.are.equal("{}", json.encode(json.object {}))
    assert.are.equal('{"1":"a"}', json.encode(json.object { "a" }))
    assert.are.equal('{"a":1}', json.encode { a = 1 })
  end)

  it("sorts keys and pretty-prints on request", function()
    local s = json.encode({ b = 1, a = { 1, 2 }, c = {} }, { sort_keys = true, pretty = true })
    assert.are.equal('{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1,\n  "c": {}\n}', s)
  end)

  it("uses __tojson", function()
    local obj = setmetatable({}, { __tojson = function() return { kind = "handle" } end })
    assert.are.equal('{"kind":"handle"}', json.encode(obj))
  end)

  local bad = {
    { function() end, "cannot encode a function value at $" },
    { { f = print }, "cannot encode a function value at $.f" },
    { { a = { 1, { x = coroutine.create(print) } } }, "cannot encode a thread value at $.a[2].x" },
    { { [1] = 1, [3] = 3 }, "cannot encode an array with holes or keys below 1 at $" },
    { { 1, a = 2 }, "cannot encode a table with both integer and string keys at $" },
    { { [true] = 1 }, "cannot encode a boolean key at $" },
    { 0 / 0, "cannot encode NaN or infinity at $" },
    { math.huge, "cannot encode NaN or infinity at $" },
    { "\xff", "invalid UTF-8 in string at $" },
  }
  for i, case in ipairs(bad) do
    it("reports what cannot be encoded, case " .. i, function()
      local s, err = json.encode(case[1])
      assert.is_nil(s)
      assert.are.equal("json: " .. case[2], err)
    end)
  end

  it("detects cycles through the depth limit", function()
    local t = {}
    t.self = t
    local s, err = json.encode(t)
    assert.is_nil(s)
    assert.matches("^json: nesting deeper than 128 %(a cycle%?%) at %$%.self%.self", err)
  end)

  it("enforces the output size limit", function()
    local s, err = json.encode(string.rep("a", 1000), { max_size = 100 })
    assert.is_nil(s)
    assert.are.equal("json: output larger than the limit of 100 bytes", err)
  end)

  it("round-trips a realistic MCP message", function()
    local msg = {
      jsonrpc = "2.0", id = 7, method = "tools/call",
      params = { name = "exec", arguments = { argv = json.array { "sh", "-c", "echo ✓" }, timeout = 2.5 },
                 _meta = { progressToken = json.null } },
    }
    local s = assert(json.encode(msg, { sort_keys = true }))
    local back = assert(json.decode(s))
    assert.are.equal(s, json.encode(back, { sort_keys = true }))
  end)
end)
