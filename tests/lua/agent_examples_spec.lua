-- The example workflows (examples/agent/*.lua) against the scripted model server, with both wire
-- formats, using the test sandbox tools (real commands, no isolation); agent_sandbox_spec runs
-- them with the real sandbox tool set.
local json = require "clawlua.json"
local llm = require "clawlua.llm"
local U = require "agent_util"
local H = require "helper"

describe("agent examples", function()
  local fx = U.fixture("agentex")
  setup(fx.start)
  teardown(fx.stop)

  for _, provider in ipairs { "openai", "anthropic" } do
    local function model()
      return llm.new { provider = provider, base_url = fx.srv.base, model = "scripted", api_key = "k" }
    end

    it(provider .. ": fix_failing_test fixes the repository's bug, and the workflow's own test run agrees", function()
      fx.srv.script { turns = U.example_turns.fix_failing_test() }
      local ts = U.test_sandbox_tools(fx.dir)
      local res = U.example("fix_failing_test").run { llm = model(), tools = ts }
      assert.is_true(res.fixed)
      assert.are.equal("ok   add 2 3\nok   mul 4 5\n", res.test_output)
      assert.matches("^Fixed: add%(%) subtracted", res.answer)
      local reqs = fx.srv.requests()
      assert.are.equal(5, #reqs)
      local first = U.tool_results(reqs[2])[1].content
      assert.matches("FAIL add 2 3: expected 5, got %-1", first) -- the real test's output, fed back
      assert.matches('"exit_code":1', first)
      local all = U.tool_results(reqs[5])
      assert.are.equal(4, #all)
      assert.matches('"exit_code":0', all[4].content)
      assert.is_nil(ts.boxes[res.sandbox]) -- the workflow destroyed its sandbox
    end)

    it(provider .. ": untrusted_script runs the script and summarises it in JSON mode", function()
      fx.srv.script { turns = U.example_turns.untrusted_script() }
      local res = U.example("untrusted_script").run { llm = model(), tools = U.test_sandbox_tools(fx.dir) }
      assert.are.equal(3, res.exit_code)
      assert.is_true(res.ran)
      assert.is_true(res.agrees)
      assert.matches("exited with status 3", res.summary)
      local reqs = fx.srv.requests()
      local out = json.decode(U.tool_results(reqs[2])[1].content)
      assert.are.equal(3, out.exit_code)
      assert.matches("collecting facts\nkernel: Linux\nentries here: 1\n", out.stdout)
      assert.are.equal("warning: cannot reach the update server\n", out.stderr)
      if provider == "openai" then
        assert.are.same({ type = "json_object" }, reqs[1].body.response_format)
      else
        assert.matches("JSON object", reqs[1].body.system)
      end
    end)

    it(provider .. ": handover passes the explorer's findings to the writer", function()
      fx.srv.script { turns = U.example_turns.handover() }
      local ts = U.test_sandbox_tools(fx.dir)
      local res = U.example("handover").run { llm = model(), tools = ts }
      local names = {}
      for size, name in res.findings:gmatch("(%d+) data/(%S+)") do names[#names + 1] = name .. "=" .. size end
      assert.are.same({ "delta.txt=9000", "beta.csv=4800", "epsilon.json=2500" }, names)
      assert.matches("^# Largest files", res.report)
      assert.are.equal("The report is at /work/report.md.", res.answer)
      local reqs = fx.srv.requests()
      local writer_task = reqs[3].body.messages[provider == "openai" and 2 or 1]
      local text = type(writer_task.content) == "string" and writer_task.content or writer_task.content[1].text
      assert.matches("Hand%-over from the explorer: Hand%-over: the three largest", text)
      local who = {}
      for _, c in ipairs(ts.calls) do who[c.client] = (who[c.client] or 0) + 1 end
      assert.are.equal(1, who.explorer)
      assert.are.equal(2, who.writer)
    end)
  end

  it("runs as a script and says what it needs when the sandbox tool set is absent", function()
    if pcall(require, "clawlua.mcp.tools") then
      pending("clawlua.mcp.tools is present: agent_sandbox_spec runs the examples for real")
      return
    end
    local r = H.clawlua { H.src .. "/examples/agent/handover.lua", "--provider", "openai", "--model", "m" }
    assert.are.equal(1, r.code)
    assert.are.equal("this example needs the sandbox tool set (clawlua.policy, clawlua.mcp.tools)\n", r.stderr)
    r = H.clawlua { H.src .. "/examples/agent/handover.lua", "--provider" }
    assert.are.equal(2, r.code)
    assert.matches("^usage: clawlua examples/agent/handover.lua", r.stderr)
  end)
end)
