-- `clawlua mcp --audit-log FILE`: every tool call the server audits is in FILE, hash-chained
-- (audit.verify passes), and a FILE that cannot be opened is a clear error, exit 1.
local claw = require "clawlua"
local H = require "helper"

local json = claw.json

describe("clawlua mcp --audit-log", function()
  local dir
  setup(function() dir = H.tmpdir("mcp_audit_log") end)
  teardown(function() H.rm_rf(dir) end)

  it("writes the server's audit events to a verifiable hash-chained log", function()
    claw.run(function()
      local path = dir .. "/audit.jsonl"
      local lines = {
        json.encode { jsonrpc = "2.0", id = 1, method = "initialize", params = {
          protocolVersion = "2025-11-25", capabilities = json.object {},
          clientInfo = { name = "spec", version = "1" } } },
        json.encode { jsonrpc = "2.0", method = "notifications/initialized" },
        json.encode { jsonrpc = "2.0", id = 2, method = "tools/call", params = { name = "policy_show",
                                                                                 arguments = json.object {} } },
      }
      local r = claw.proc.run { H.bin, "mcp", "--audit-log", path, stdin = table.concat(lines, "\n") .. "\n",
                                timeout = 30 * H.scale }
      assert.are.equal(0, r.code, r.stderr)
      local ids = {}
      for line in r.stdout:gmatch("[^\n]+") do ids[#ids + 1] = json.decode(line).id end
      assert.are.same({ 1, 2 }, ids)
      local v = claw.audit.verify { path }
      assert.is_true(v.ok, json.encode(v))
      local calls = 0
      for ev in claw.audit.read_file(path, { kind = "mcp.tool_call" }) do
        assert.are.equal("policy_show", ev.detail.tool)
        assert.are.equal("spec", ev.detail.client)
        calls = calls + 1
      end
      assert.are.equal(1, calls)
    end)
  end)

  it("refuses a log it cannot open, naming the option", function()
    claw.run(function()
      local r = claw.proc.run { H.bin, "mcp", "--audit-log", dir .. "/no/such/dir/a.jsonl", stdin = "",
                                timeout = 30 * H.scale }
      assert.are.equal(1, r.code)
      assert.truthy(r.stderr:find("clawlua mcp: --audit-log: ", 1, true), r.stderr)
      assert.truthy(r.stderr:find("No such file or directory", 1, true), r.stderr)
      r = claw.proc.run { H.bin, "mcp", "--audit-log" }
      assert.are.equal(2, r.code)
      assert.truthy(r.stderr:find("option '--audit-log' needs a value", 1, true), r.stderr)
    end)
  end)
end)
