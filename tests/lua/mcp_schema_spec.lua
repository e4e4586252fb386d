-- labels: nogc
-- The JSON Schema validator of the MCP server (clawlua.mcp.schema) against the official JSON
-- Schema Test Suite as Debian packages it (json-schema-test-suite), and against MCP's own
-- schemas.
--
-- Debian's package (2.0.0) carries drafts 3 to 7, not 2020-12. Draft 7's files are run: every
-- keyword they test means the same in 2020-12, except the ones listed in SKIP_FILES / SKIP_CASES
-- with the reason. Draft 7's array form of `items`/`additionalItems` and `dependencies` are
-- run too: the validator reads them as 2020-12's prefixItems/items and dependentRequired/
-- dependentSchemas, which is what they mean.
local claw = require "clawlua"
local H = require "helper"
local schema = require "clawlua.mcp.schema"

local json = claw.json

local SUITE = "/usr/share/json-schema-test-suite/tests/draft7"

local SKIP_FILES = {
  ["refRemote.json"] = "remote references ($ref to http://localhost:1234/...) are not fetched",
  ["default.json"] = "`default` is an annotation; nothing to validate",
  ["definitions.json"] = "validates schemas against the draft-07 metaschema (a remote $ref)",
}

-- Cases (file -> description prefix -> reason) whose meaning changed in 2020-12 or that need
-- what the validator does not do.
local SKIP_CASES = {
  ["ref.json"] = {
    ["ref overrides any sibling keywords"] = "draft 7 ignores $ref's siblings; 2020-12 applies them",
    ["remote ref, containing refs itself"] = "a remote reference (the draft-07 metaschema)",
    ["Recursive references between schemas"] = "$id-relative references are not supported",
  },
}

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function list_dir(dir)
  local p = io.popen("ls '" .. dir .. "'")
  local t = {}
  for l in p:lines() do
    if l:match("%.json$") then t[#t + 1] = l end
  end
  p:close()
  return t
end

describe("mcp schema: JSON Schema Test Suite (Debian json-schema-test-suite, draft 7 files)", function()
  local have = io.open(SUITE .. "/type.json", "r")
  if not have then
    it("needs the json-schema-test-suite package", function()
      error("json-schema-test-suite is not installed (scripts/deps installs it): " .. SUITE)
    end)
    return
  end
  have:close()

  local totals = { passed = 0, skipped = 0 }
  local skipped_report = {}

  for _, file in ipairs(list_dir(SUITE)) do
    if SKIP_FILES[file] then
      skipped_report[#skipped_report + 1] = ("  %s: %s"):format(file, SKIP_FILES[file])
    else
      local groups = assert(json.decode(read(SUITE .. "/" .. file)))
      it(file, function()
        local failures = {}
        for _, g in ipairs(groups) do
          local reason = SKIP_CASES[file] and SKIP_CASES[file][g.description]
          if reason then
            skipped_report[#skipped_report + 1] = ("  %s / %s: %s"):format(file, g.description, reason)
            totals.skipped = totals.skipped + #g.tests
          else
            local v = schema.new(g.schema)
            for _, t in ipairs(g.tests) do
              local ok, got = pcall(v.validate, v, t.data)
              if not ok then
                failures[#failures + 1] = ("%s / %s: raised %s"):format(g.description, t.description, got)
              elseif got ~= t.valid then
                failures[#failures + 1] = ("%s / %s: expected %s"):format(g.description, t.description,
                  t.valid and "valid" or "invalid")
              else
                totals.passed = totals.passed + 1
              end
            end
          end
        end
        assert(#failures == 0, #failures .. " case(s) failed:\n" .. table.concat(failures, "\n"))
      end)
    end
  end

  teardown(function()
    print(("\njson-schema-test-suite: %d cases passed, %d skipped; skipped:"):format(totals.passed, totals.skipped))
    print(table.concat(skipped_report, "\n"))
    print("  keywords not implemented: unevaluatedProperties, unevaluatedItems, $dynamicRef, " ..
      "$id-relative and remote $ref (not in MCP tool schemas); format is annotation-only (2020-12 default)")
  end)
end)

describe("mcp schema: the validator's own behaviour", function()
  it("names the failing field, 0-based", function()
    local s = { type = "object", required = { "id", "command" }, additionalProperties = false,
                properties = { id = { type = "string" },
                               command = { type = "array", items = { type = "string" }, minItems = 1 } } }
    local ok, errs = schema.validate(s, json.decode '{"id":"a","command":["ls",3],"x":1}')
    assert.is_false(ok)
    table.sort(errs)
    assert.are.same({ "$.command[1]: string expected, got number", "$.x: is not allowed (no such property)" }, errs)
    ok, errs = schema.validate(s, json.decode '{"command":[]}')
    assert.is_false(ok)
    table.sort(errs)
    assert.are.same({ "$.command: must have at least 1 items", "$.id: is required" }, errs)
  end)

  it("checks every tool's arguments with a compiled check that agrees with the full pass", function()
    -- The compiled checks say "valid" on their own; an invalid value is explained by the full
    -- pass. The JSON Schema Test Suite above runs through both; here: every tool schema
    -- compiles (so each call skips the keyword-by-keyword pass), and both answers agree.
    local ts = require("clawlua.mcp.tools").new { bench_echo = true }
    local values = { json.decode '{}', json.decode '{"id":"a"}', json.decode '{"id":""}',
                     json.decode '{"id":"a","command":["ls","-l"]}', json.decode '{"id":"a","command":[]}',
                     json.decode '{"id":"a","command":["ls",3]}', json.decode '{"text":"hi"}',
                     json.decode '{"text":7}', json.decode '{"limit":0}', json.decode '{"limit":5}',
                     json.decode '{"id":"a","network":{"egress":"allow","allow":["x.org"]}}',
                     json.decode '{"id":"a","network":{"egress":"maybe"}}', json.decode '{"zzz":1}' }
    for _, tool in ipairs(ts:list()) do
      local v = schema.new(tool.inputSchema)
      for _, val in ipairs(values) do
        local ok, errs = v:validate(val)
        assert.is_function(v.compiled, tool.name .. "'s input schema did not compile")
        local full = schema.new(tool.inputSchema)
        full.compiled = false -- the keyword-by-keyword pass alone
        local ok2, errs2 = full:validate(val)
        assert.are.equal(ok2, ok, tool.name .. ": " .. json.encode(val))
        assert.are.same(errs2, errs)
      end
    end
    ts:close()
  end)

  it("implements the ECMA regex subset it documents", function()
    local cases = {
      { "^[a-z]+(-[a-z0-9]+)*$", "abc-d3f", true }, { "^[a-z]+(-[a-z0-9]+)*$", "abc-", false },
      { "^\\d{2,3}$", "123", true }, { "^\\d{2,3}$", "1234", false },
      { "colou?r", "my color", true }, { "^(?:a|bc)+$", "abcbca", true }, { "^(?:a|bc)+$", "abcb", false },
      { "^(?!tmp)\\w+$", "tmpfile", false }, { "^(?!tmp)\\w+$", "file", true },
      { "\\bcat\\b", "a cat!", true }, { "\\bcat\\b", "concat", false },
      { "^[^/]+$", "a/b", false }, { "^.{3}$", "héé", true }, { "^a*?b$", "aaab", true },
      { "^[\\u0041-\\u0043]+$", "ABC", true }, { "x{", "x{", true },
    }
    for _, c in ipairs(cases) do
      assert.are.equal(c[3], schema.regex(c[1])(c[2]), c[1] .. " on " .. c[2])
    end
    assert.has_error(function() schema.regex("(a)\\1") end,
      "regex /(a)\\1/: backreferences are not supported at offset 5")
    assert.has_error(function() schema.regex("(?<=a)b") end)
  end)

  -- fuzz_lua_mcp_schema findings: schemas can come from a server (outputSchema)
  it("an unusable schema gives nil and 'schema: ...', never a raise", function()
    local cases = {
      { { ["$ref"] = "#" }, "subschemas nested deeper than 1000" },
      { { allOf = { { ["$ref"] = "#/allOf/1" }, { ["$ref"] = "#/allOf/0" } } }, "nested deeper" },
      { { minimum = "1" }, "unusable schema at $: attempt to compare" },
      { { required = 5 }, "unusable schema at $" },
      { { pattern = "(" }, "schema: " },
      { { ["$ref"] = "http://example.com/s" }, "is not supported" },
      { { ["$ref"] = "#/nope" }, "does not resolve" },
    }
    for _, c in ipairs(cases) do
      local ok, err = schema.new(c[1]):validate(c[1].pattern and "x" or (c[1].required and {} or 3))
      assert.is_nil(ok, json.encode(c[1]))
      assert.equal("string", type(err))
      assert.truthy(err:match("^schema: ") and err:find(c[2], 1, true), err)
    end
    -- a recursive schema that descends into the value is fine up to the depth bound
    local nested = json.decode(("["):rep(100) .. ("]"):rep(100))
    assert.is_true(schema.new({ type = "array", items = { ["$ref"] = "#" } }):validate(nested))
  end)

  it("stops a catastrophic pattern by its step budget instead of hanging", function()
    local re = schema.regex("^(a+)+$")
    local t0 = claw.now()
    local ok, err = pcall(re, ("a"):rep(40) .. "b")
    assert.is_false(ok)
    assert.matches("too many backtracking steps", err)
    assert.is_true(claw.now() - t0 < 20 * H.scale)
    -- the budget is schema.MAX_REGEX_STEPS, read at each match
    local linear = schema.regex("^[a-z]+$")
    local long = ("a"):rep(2000)
    assert.is_true(linear(long))
    local saved = schema.MAX_REGEX_STEPS
    schema.MAX_REGEX_STEPS = 1000
    ok, err = pcall(linear, long)
    schema.MAX_REGEX_STEPS = saved
    assert.is_false(ok)
    assert.matches("too many backtracking steps", err)
    assert.is_true(linear(long))
  end)
end)

describe("mcp schema: MCP's published schemas", function()
  for _, rev in ipairs { "2025-06-18", "2025-11-25", "2026-07-28" } do
    it("validates and rejects messages with schema-" .. rev .. ".json", function()
      local root = assert(json.decode(read(H.spec("mcp/schema-" .. rev .. ".json"))))
      local v = schema.new(root)
      local defs = root["$defs"] and "#/$defs/" or "#/definitions/"
      assert.is_true(v:validate(json.decode '{"jsonrpc":"2.0","id":1,"method":"ping"}', defs .. "JSONRPCRequest"))
      local ok, errs = v:validate(json.decode '{"jsonrpc":"1.0","id":1,"method":"ping"}', defs .. "JSONRPCRequest")
      assert.is_false(ok)
      assert.matches("%$%.jsonrpc: must be \"2%.0\"", table.concat(errs, "\n"))
      assert.is_true(v:validate(json.decode '{"name":"t","inputSchema":{"type":"object"}}', defs .. "Tool"))
      assert.is_false((v:validate(json.decode '{"name":"t","inputSchema":{"type":"array"}}', defs .. "Tool")))
    end)
  end
end)
