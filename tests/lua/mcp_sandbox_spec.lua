-- labels: root
-- The MCP tool set on the real sandbox module (clawlua.sandbox, jail backend) under the
-- built-in default policy: the tools do what they say to a real sandbox, cancellation kills
-- the command, and closing the set leaves no sandbox behind.
local claw = require "clawlua"
local H = require "helper"
local tools = require "clawlua.mcp.tools"

local json = claw.json

local have_sandbox, sandbox = pcall(require, "clawlua.sandbox")
local have_policy, policy = pcall(require, "clawlua.policy")

describe("mcp tools on a real sandbox (jail backend, default policy)", function()
  if not (have_sandbox and have_policy) then
    it("(skipped)", function()
      print("SKIP mcp_sandbox_spec: clawlua.sandbox / clawlua.policy cannot be required: " ..
        tostring(have_sandbox and policy or sandbox):match("[^\n]*"))
    end)
    return
  end
  if not H.is_root() then
    it("(skipped)", function() print("SKIP mcp_sandbox_spec: the jail backend needs root") end)
    return
  end

  it("creates, runs, moves files, cancels, lists, audits and destroys", function()
    claw.run(function()
      local before = #sandbox.list()
      local ts = tools.new { policy = assert(policy.default()), max_sandboxes = 2 }
      local r = assert(ts:call("sandbox_create", {}, { client = "mcp_sandbox_spec" }))
      assert(not r.isError, r.content[1].text)
      local id = r.structuredContent.id
      assert.are.equal("jail", r.structuredContent.backend)

      local script = json.array { "sh", "-c", "echo out; echo err >&2; exit 4" }
      r = assert(ts:call("sandbox_exec", { id = id, command = script }))
      assert(not r.isError, r.content[1].text)
      assert.are.same({ 4, "out\n", "err\n", false }, { r.structuredContent.exit_code, r.structuredContent.stdout,
        r.structuredContent.stderr, r.structuredContent.timed_out })

      r = assert(ts:call("sandbox_exec", { id = id, command = json.array { "sleep", "10" }, timeout_s = 0.5 }))
      assert.is_true(r.structuredContent.timed_out)

      local bin = "\0\1\2binary\255"
      r = assert(ts:call("sandbox_write_file", { id = id, path = "/tmp/b.bin", content = tools.base64_encode(bin),
                                                 encoding = "base64" }))
      assert(not r.isError, r.content[1].text)
      r = assert(ts:call("sandbox_exec", { id = id, command = json.array { "sh", "-c", "wc -c </tmp/b.bin" } }))
      assert.are.equal(tostring(#bin), r.structuredContent.stdout:match("%d+"))
      r = assert(ts:call("sandbox_read_file", { id = id, path = "/tmp/b.bin", encoding = "base64" }))
      assert.are.equal(bin, tools.base64_decode(r.structuredContent.content))

      -- cancelling the calling task kills the command
      local t = claw.spawn(function()
        return ts:call("sandbox_exec", { id = id, command = json.array { "sleep", "30" } })
      end)
      claw.sleep(0.5)
      t:cancel()
      local _, err = t:join(5)
      assert.are.equal("cancelled", err)
      local check = json.array { "sh", "-c", "pgrep -x sleep || echo none" }
      r = assert(ts:call("sandbox_exec", { id = id, command = check }))
      assert.are.equal("none\n", r.structuredContent.stdout)

      r = assert(ts:call("sandbox_list", {}))
      assert.are.equal(id, r.structuredContent.sandboxes[1].id)
      r = assert(ts:call("audit_query", { sandbox = id, limit = 100 }))
      assert.is_true(#r.structuredContent.events > 0)

      local second = assert(ts:call("sandbox_create", {})).structuredContent.id
      r = assert(ts:call("sandbox_destroy", { id = id }))
      assert.is_true(r.structuredContent.destroyed)
      assert.is_nil(sandbox.get(id))
      ts:close() -- destroys the second
      assert.is_nil(sandbox.get(second))
      assert.are.equal(before, #sandbox.list())
    end)
  end)
end)
