-- clawlua.agent.loop against the scripted model server, with an in-test tool set whose tools run
-- real commands (clawlua.proc) and with the MCP reference server's tools through the MCP client.
local claw = require "clawlua"
local json = require "clawlua.json"
local llm = require "clawlua.llm"
local agent = require "clawlua.agent.loop"
local mcp = require "clawlua.mcp.client"
local U = require "agent_util"
local H = require "helper"

local KEY = "sk-loop-KEY-93be0d11f2"

describe("agent loop", function()
  local srv, dir
  setup(function()
    srv = U.model_server()
    dir = H.tmpdir("agent")
  end)
  teardown(function()
    srv.close()
    H.rm_rf(dir)
  end)

  local function client(provider, extra)
    local o = { provider = provider or "openai", base_url = srv.base, model = "scripted", api_key = KEY,
                retry_base = 0.01, max_retries = 1 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return llm.new(o)
  end

  local function events_since(seq)
    local out = {}
    for ev in claw.audit.query { kind = "agent", after_seq = seq } do out[#out + 1] = ev end
    return out
  end

  for _, provider in ipairs { "openai", "anthropic" } do
    for _, stream in ipairs { false, true } do
      it(("%s%s: runs a command the model asks for and feeds the output back"):format(provider,
          stream and " streamed" or ""), function()
        srv.script { turns = {
          { text = "I will look.", tool_calls = { { id = "t1", name = "exec", arguments = { argv = { "sh", "-c",
            "echo payload-$((6*7))" } } } } },
          { text = "The command printed payload-42." } } }
        local before = claw.audit.events { kind = "agent" }
        local seq0 = #before > 0 and before[#before].seq or 0
        local ts = U.test_tools(dir)
        local path = dir .. "/t-" .. provider .. tostring(stream) .. ".jsonl"
        local a = agent.new { llm = client(provider), tools = ts, system = "you are a test", transcript = path,
                              stream = stream, name = "tester" }
        local res = assert(a:run("what does the command print?"))
        assert.are.equal("The command printed payload-42.", res.answer)
        assert.are.equal(2, res.steps)
        assert.are.equal(30, res.usage.input_tokens + res.usage.output_tokens)
        local reqs = srv.requests()
        assert.are.equal(2, #reqs)
        assert.are.same({ "exec", "write_file", "read_file", "sleep" }, U.tool_names(reqs[1]))
        local results = U.tool_results(reqs[2])
        assert.are.equal(1, #results)
        assert.are.equal("t1", results[1].id)
        assert.are.equal("exit 0\npayload-42\n", results[1].content)
        assert.are.equal("tester", ts.calls[1].client)
        -- audit: two steps, one tool call, done
        local evs = events_since(seq0)
        local kinds = {}
        for _, ev in ipairs(evs) do kinds[#kinds + 1] = ev.kind end
        assert.are.same({ "agent.step", "agent.tool_call", "agent.step", "agent.done" }, kinds)
        assert.are.equal("exec", evs[2].detail.tool)
        assert.are.equal("tester", evs[2].detail.agent)
        assert.are.equal("done", evs[4].detail.reason)
        -- the transcript: start, messages, steps, done; no key anywhere
        local text = H.read_file(path)
        assert.is_nil(text:find(KEY, 1, true))
        local types = {}
        for line in text:gmatch("[^\n]+") do types[#types + 1] = json.decode(line).type end
        assert.are.same({ "start", "message", "message", "step", "message", "message", "step", "done" }, types)
      end)
    end
  end

  it("runs parallel tool calls concurrently and returns results in order with their ids", function()
    srv.script { turns = {
      { tool_calls = { { id = "p1", name = "sleep", arguments = { seconds = 0.6 } },
                       { id = "p2", name = "exec", arguments = { argv = { "sleep", "0.6" } } },
                       { id = "p3", name = "sleep", arguments = { seconds = 0.6 } } } },
      { text = "all done" } } }
    local t0 = claw.now()
    local res = assert(agent.new { llm = client("anthropic"), tools = U.test_tools(dir) }:run("wait"))
    local took = claw.now() - t0
    assert.are.equal("all done", res.answer)
    assert.is_true(took < 1.5 * H.scale, "three 0.6 s calls took " .. took .. " s")
    local results = U.tool_results(srv.requests()[2])
    assert.are.same({ "p1", "p2", "p3" }, { results[1].id, results[2].id, results[3].id })
    assert.are.equal("slept", results[1].content)
  end)

  it("asks the policy's hook about every call and feeds a refusal back as a tool error", function()
    srv.script { turns = {
      { tool_calls = { { id = "a", name = "exec", arguments = { argv = { "rm", "-rf", "important" } } },
                       { id = "b", name = "exec", arguments = { argv = { "echo", "fine" } } } } },
      { text = "ok, I will not delete it" } } }
    local seen = {}
    local policy = { name = "test", hooks = { on_tool_call = function(name, args, who)
      seen[#seen + 1] = { name, args.argv[1], who }
      if args.argv[1] == "rm" then return false, "no deleting" end
      return true
    end } }
    local ts = U.test_tools(dir)
    local res = assert(agent.new { llm = client(), tools = ts, policy = policy, name = "careful" }:run("clean up"))
    assert.are.equal("ok, I will not delete it", res.answer)
    assert.are.same({ { "exec", "rm", "careful" }, { "exec", "echo", "careful" } }, seen)
    assert.are.equal(1, #ts.calls) -- the refused call never ran
    local results = U.tool_results(srv.requests()[2])
    assert.are.equal("denied by policy: no deleting", results[1].content)
    assert.are.equal("exit 0\nfine\n", results[2].content)
  end)

  it("feeds bad arguments, unknown tools and failing tools back as tool errors", function()
    srv.script { turns = {
      { tool_calls = { { id = "x1", name = "exec", arguments = "{\"argv\": [\"ls\"" },
                       { id = "x2", name = "launch_missiles", arguments = {} },
                       { id = "x3", name = "exec", arguments = { argv = { "sh", "-c", "exit 3" } } },
                       { id = "x4", name = "exec", arguments = { argv = { "printf", "\\377bin\\300" } } } } },
      { text = "recovered" } } }
    local ts = U.test_tools(dir)
    local boom = { list = function() return { { name = "explode", inputSchema = { type = "object" } } } end,
                   call = function() error("kaboom") end }
    local res = assert(agent.new { llm = client("openai"), tools = { ts, boom } }:run("go"))
    assert.are.equal("recovered", res.answer)
    local r = U.tool_results(srv.requests()[2])
    assert.matches("^error: arguments are not valid JSON", r[1].content)
    assert.matches("call exec again with a JSON object", r[1].content)
    assert.are.equal("error: there is no tool named 'launch_missiles'", r[2].content)
    assert.are.equal("exit 3\n", r[3].content)
    assert.are.equal("exit 0\n\u{FFFD}bin\u{FFFD}", r[4].content) -- bytes that are not UTF-8, replaced
    assert.are.same({ "exec", "write_file", "read_file", "sleep", "explode" }, U.tool_names(srv.requests()[1]))
  end)

  it("ends a model that never stops calling tools at max_steps", function()
    srv.script { repeat_last = true,
                 turns = { { tool_calls = { { name = "exec", arguments = { argv = { "true" } } } } } } }
    local res, err, info = agent.new { llm = client(), tools = U.test_tools(dir), max_steps = 3 }:run("loop")
    assert.is_nil(res)
    assert.are.equal("budget: 3 steps used (max_steps) and the model still calls tools", err)
    assert.are.equal("budget", info.reason)
    assert.are.equal(3, #srv.requests())
  end)

  it("ends at the token budget and at the wall-time budget", function()
    srv.script { repeat_last = true, turns = { { usage = { input = 100, output = 60 },
      tool_calls = { { name = "exec", arguments = { argv = { "true" } } } } } } }
    local res, err = agent.new { llm = client(), tools = U.test_tools(dir), max_tokens = 300 }:run("loop")
    assert.is_nil(res)
    assert.are.equal("budget: 320 tokens used (max_tokens 300)", err)
    srv.script { repeat_last = true,
                 turns = { { tool_calls = { { name = "exec", arguments = { argv = { "sleep", "5" } } } } } } }
    local before = H.children()
    local t0 = claw.now()
    res, err = agent.new { llm = client(), tools = U.test_tools(dir), max_time = 0.5 }:run("loop")
    assert.is_nil(res)
    assert.are.equal("budget: wall time of 0.5s used (max_time)", err)
    assert.is_true(claw.now() - t0 < 2 * H.scale)
    assert.is_true(H.eventually(function() return H.children() <= before end, 5), "the sleep was not killed")
  end)

  it("stops with the model's error", function()
    srv.script { turns = { { raw = "{not json" } } }
    local res, err, info = agent.new { llm = client(), tools = U.test_tools(dir) }:run("x")
    assert.is_nil(res)
    assert.matches("^llm openai: malformed response: json: ", err)
    assert.are.equal("model", info.reason)
  end)

  it("is cancelled with its running tool calls, and the transcript says so", function()
    srv.script { turns = { { tool_calls = { { name = "exec", arguments = { argv = { "sleep", "30" } } } } } } }
    local before = H.children()
    local path = dir .. "/cancel.jsonl"
    local t = claw.spawn(function()
      return agent.new { llm = client(), tools = U.test_tools(dir), transcript = path }:run("x")
    end)
    assert.is_true(H.eventually(function() return H.children() > before end, 5))
    t:cancel()
    assert.are.same({ nil, "cancelled" }, { t:join(5) })
    assert.is_true(H.eventually(function() return H.children() <= before end, 5))
    local last
    for line in H.read_file(path):gmatch("[^\n]+") do last = json.decode(line) end
    assert.are.equal("done", last.type)
    assert.are.equal("cancelled", last.reason)
  end)

  it("resumes from its transcript after a model failure, keeping the conversation", function()
    local path = dir .. "/resume.jsonl"
    srv.script { turns = {
      { tool_calls = { { id = "r1", name = "write_file", arguments = { path = "note.txt", data = "kept" } } } },
      { status = 400, error = "model crashed" } } }
    local res, err = agent.new { llm = client(), tools = U.test_tools(dir), transcript = path }:run("write a note")
    assert.is_nil(res)
    assert.matches("HTTP 400: .*model crashed", err)
    srv.script { turns = { { text = "The note says kept." } } }
    local a = agent.new { llm = client(), tools = U.test_tools(dir), transcript = path }
    res = assert(a:resume())
    assert.is_true(res.resumed)
    assert.are.equal("The note says kept.", res.answer)
    assert.are.equal(2, res.steps) -- model answers: the tool call, then this one
    local req = srv.requests()[1]
    assert.are.equal("write a note", req.body.messages[1].content)
    assert.are.equal("r1", U.tool_results(req)[1].id)
    assert.are.equal("wrote 4 bytes", U.tool_results(req)[1].content)
    -- a finished transcript gives its answer without asking the model again
    res = assert(agent.new { llm = client(), tools = U.test_tools(dir), transcript = path }:resume())
    assert.are.equal("The note says kept.", res.answer)
    assert.are.equal(1, #srv.requests())
    -- a damaged transcript is an error with the line
    H.write_file(dir .. "/bad.jsonl", '{"type":"start"}\nnot json\n{"type":"done"}\n')
    local r2, e2 = agent.new { llm = client(), tools = U.test_tools(dir), transcript = dir .. "/bad.jsonl" }:resume()
    assert.is_nil(r2)
    assert.matches("bad.jsonl:2: json: ", e2)
  end)

  it("uses an MCP server's tools through the MCP client", function()
    local cmd, why = U.everything()
    if not cmd then
      pending(why)
      return
    end
    local c <close> = assert(mcp.connect { command = cmd, name = "everything" })
    srv.script { turns = {
      { tool_calls = { { id = "m1", name = "echo", arguments = { message = "via mcp" } },
                       { id = "m2", name = "get-sum", arguments = { a = 20, b = 22 } } } },
      { text = "echoed" } } }
    local res = assert(agent.new { llm = client("anthropic"), tools = { U.test_tools(dir), c } }:run("echo"))
    assert.are.equal("echoed", res.answer)
    local r = U.tool_results(srv.requests()[2])
    assert.are.equal("Echo: via mcp", r[1].content)
    assert.matches("42", r[2].content)
    local offered = U.tool_names(srv.requests()[1])
    assert.are.equal("exec", offered[1])
    assert.is_truthy(table.concat(offered, ","):find("get-sum", 1, true))
  end)

  it("never puts the key into audit events", function()
    local all = claw.audit.events { kind = "agent" }
    assert.is_true(#all > 5)
    for _, ev in ipairs(all) do assert.is_nil(json.encode(ev):find(KEY, 1, true)) end
  end)

  it("reports a transcript it cannot write", function()
    local res, err, info = agent.new { llm = client(), tools = U.test_tools(dir),
                                       transcript = dir .. "/no/such/dir/t.jsonl" }:run("x")
    assert.is_nil(res)
    assert.matches("^agent: transcript: .*No such file or directory", err)
    assert.are.equal("transcript", info.reason)
  end)

  it("rejects bad options naming the field", function()
    assert.has_error(function() agent.new { tools = {} } end, "bad field 'llm' (an llm client expected, got nil)")
    assert.has_error(function() agent.new { llm = client(), tools = { {} } } end,
      "bad field 'tools[1]' (tool set with list and call expected)")
    assert.has_error(function() agent.new { llm = client(), max_steps = "3" } end,
      "bad field 'max_steps' (number expected, got string)")
  end)
end)
