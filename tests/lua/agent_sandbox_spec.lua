-- labels: root
-- The agent loop with the real sandbox tool set (clawlua.mcp.tools over clawlua.sandbox) under
-- policy.default(): every tool call the scripted model makes runs in a sandbox, is audited, is
-- seen by the policy's hook, and lands in the transcript. Skips, saying why, while the sandbox
-- layer is not in the build or the process is not root.
local claw = require "clawlua"
local json = require "clawlua.json"
local llm = require "clawlua.llm"
local agent = require "clawlua.agent.loop"
local U = require "agent_util"
local H = require "helper"

local KEY = "sk-sandbox-KEY-5c2e99"

local function missing()
  for _, m in ipairs { "clawlua.policy", "clawlua.sandbox", "clawlua.mcp.tools" } do
    local ok, err = pcall(require, m)
    if not ok then return ("%s cannot be required: %s"):format(m, tostring(err):match("^[^\n]*")) end
  end
  if not H.is_root() then return "not root: sandboxes need root" end
  return nil
end

describe("agent loop with the sandbox tool set", function()
  local why = missing()
  if why then
    it("skips", function()
      print("agent_sandbox_spec skipped: " .. why)
      pending(why)
    end)
    return
  end
  local policy_mod = require "clawlua.policy"
  local tools = require "clawlua.mcp.tools"
  local fx = U.fixture("agentsb")
  setup(fx.start)
  teardown(fx.stop)

  for _, provider in ipairs { "openai", "anthropic" } do
    it(provider .. ": runs every tool call in a sandbox under the policy, audited and transcribed", function()
      local p = policy_mod.default()
      local asked = {}
      p.hooks = p.hooks or {}
      p.hooks.on_tool_call = function(name, _, client)
        asked[#asked + 1] = { name = name, client = client }
        if name == "sandbox_destroy" then return false, "the agent may not destroy sandboxes" end
        return true
      end
      local ts = tools.new { policy = p }
      local created = assert(ts:call("sandbox_create", {}, { client = "spec" }))
      assert.is_false(created.isError == true, json.encode(created))
      local id = created.structuredContent.id
      fx.srv.script { turns = {
        { tool_calls = {
          { id = "w", name = "sandbox_write_file", arguments = { id = id, path = "/work/job.sh",
            content = "echo sandboxed-$((20+22)); id -u" } } } },
        { tool_calls = {
          { id = "x", name = "sandbox_exec", arguments = { id = id, command = { "sh", "job.sh" }, cwd = "/work" } },
          { id = "d", name = "sandbox_destroy", arguments = { id = id } } } },
        { text = "It printed sandboxed-42." } } }
      local before = claw.audit.events { kind = "agent" }
      local seq0 = #before > 0 and before[#before].seq or 0
      local tr = fx.dir .. "/" .. provider .. ".jsonl"
      local res = assert(agent.new {
        llm = llm.new { provider = provider, base_url = fx.srv.base, model = "scripted", api_key = KEY },
        tools = ts, policy = p, name = "sandboxed", transcript = tr,
      }:run("run the job"))
      assert.are.equal("It printed sandboxed-42.", res.answer)
      local reqs = fx.srv.requests()
      local offered = U.tool_names(reqs[1])
      for _, name in ipairs { "sandbox_create", "sandbox_exec", "sandbox_write_file", "sandbox_read_file",
                              "sandbox_list", "sandbox_destroy", "sandbox_update_policy", "audit_query",
                              "policy_show" } do
        assert.is_truthy(table.concat(offered, ","):find(name, 1, true), name .. " not offered")
      end
      local r2 = U.tool_results(reqs[3])
      assert.are.same({ "w", "x", "d" }, { r2[1].id, r2[2].id, r2[3].id })
      assert.matches("sandboxed%-42", r2[2].content)
      assert.matches("the agent may not destroy sandboxes", r2[3].content)
      -- the hook saw every call the model made, under the agent's name
      local names = {}
      for _, a in ipairs(asked) do
        if a.client == "sandboxed" then names[a.name] = true end
      end
      assert.is_true(names.sandbox_write_file and names.sandbox_exec and names.sandbox_destroy)
      -- the sandbox's own audit trail has the exec; the agent's has each step and call
      local sb_events = claw.audit.events { sandbox = id }
      assert.is_true(#sb_events > 0)
      local kinds = {}
      for ev in claw.audit.query { kind = "agent", after_seq = seq0 } do kinds[#kinds + 1] = ev.kind end
      assert.are.same({ "agent.step", "agent.tool_call", "agent.step", "agent.tool_call", "agent.tool_call",
                        "agent.step", "agent.done" }, kinds)
      local text = H.read_file(tr)
      assert.is_nil(text:find(KEY, 1, true))
      assert.matches("sandbox_exec", text)
      ts:close()
    end)
  end

  -- The example workflows, with the real sandbox tool set (the model's turns are the ones
  -- agent_examples_spec plays against the test sandbox tools).
  for _, provider in ipairs { "openai", "anthropic" } do
    local function run_example(name)
      fx.srv.script { turns = U.example_turns[name]() }
      local ts = tools.new { policy = policy_mod.default() }
      local ok, res = pcall(U.example(name).run, {
        llm = llm.new { provider = provider, base_url = fx.srv.base, model = "scripted", api_key = KEY },
        tools = ts, policy = policy_mod.default() })
      ts:close()
      assert(ok, res)
      return res
    end

    it(provider .. ": example fix_failing_test, in a real sandbox", function()
      local res = run_example("fix_failing_test")
      assert.is_true(res.fixed)
      assert.are.equal("ok   add 2 3\nok   mul 4 5\n", res.test_output)
      assert.matches("FAIL add 2 3: expected 5, got %-1", U.tool_results(fx.srv.requests()[2])[1].content)
    end)

    it(provider .. ": example untrusted_script, in a real sandbox", function()
      local res = run_example("untrusted_script")
      assert.is_true(res.ran)
      assert.are.equal(3, res.exit_code)
      assert.is_true(res.agrees)
    end)

    it(provider .. ": example handover, in a real sandbox", function()
      local res = run_example("handover")
      local names = {}
      for name in res.findings:gmatch("%d+ data/(%S+)") do names[#names + 1] = name end
      assert.are.same({ "delta.txt", "beta.csv", "epsilon.json" }, names)
      assert.matches("^# Largest files", res.report)
    end)
  end
end)
