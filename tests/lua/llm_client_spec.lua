-- clawlua.llm against the scripted model server (tests/integration/model_server.py): both wire
-- formats, streamed and whole, tool calls, retries, and bad answers.
local claw = require "clawlua"
local llm = require "clawlua.llm"
local U = require "agent_util"
local H = require "helper"

local KEY = "sk-test-SECRET-4f9a2c71"

describe("llm client", function()
  local srv
  setup(function() srv = U.model_server() end)
  teardown(function() srv.close() end)

  local function client(provider, extra)
    local o = { provider = provider, base_url = srv.base, model = "scripted-1", api_key = KEY,
                retry_base = 0.05, timeout = 20 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return llm.new(o)
  end

  local TOOLS = { { name = "exec", description = "run", input_schema = { type = "object",
                  properties = { argv = { type = "array" } } } },
                  { name = "read_file", description = "read", inputSchema = { type = "object" } } }

  for _, provider in ipairs { "openai", "anthropic" } do
    for _, stream in ipairs { false, true } do
      local label = provider .. (stream and " streamed" or " whole")

      it(label .. ": a text answer with usage, and the key sent only as the header", function()
        srv.script { turns = { { text = "Hello there, operator.", usage = { input = 12, output = 4 } } } }
        local deltas = {}
        local c = client(provider)
        local r = assert(c:chat { system = "be brief", messages = { { role = "user", content = "hi" } },
                                  stream = stream, on_delta = function(d) deltas[#deltas + 1] = d.text end })
        assert.are.equal("Hello there, operator.", llm.text(r.message))
        assert.are.equal("end", r.stop_reason)
        assert.are.same({ input_tokens = 12, output_tokens = 4 }, r.usage)
        assert.are.same({ input_tokens = 12, output_tokens = 4 }, c.usage)
        if stream then
          assert.is_true(#deltas > 1)
          assert.are.equal("Hello there, operator.", table.concat(deltas))
        end
        local req = srv.requests()[1]
        if provider == "openai" then
          assert.are.equal("/v1/chat/completions", req.path)
          assert.are.equal("Bearer " .. KEY, req.headers.authorization)
          assert.are.same({ role = "system", content = "be brief" }, req.body.messages[1])
        else
          assert.are.equal("/v1/messages", req.path)
          assert.are.equal(KEY, req.headers["x-api-key"])
          assert.are.equal("2023-06-01", req.headers["anthropic-version"])
          assert.are.equal("be brief", req.body.system)
        end
        assert.are.equal("scripted-1", req.body.model)
        assert.are.equal(stream or nil, req.body.stream)
        assert.is_nil(tostring(c):find(KEY, 1, true))
      end)

      it(label .. ": parallel tool calls reassembled, results fed back with their ids", function()
        srv.script { turns = {
          { text = "Let me look.", chunk = 3, tool_calls = {
            { id = "call_a", name = "exec", arguments = { argv = { "echo", "one two three" } } },
            { id = "call_b", name = "read_file", arguments = { path = "notes/today.txt" } } } },
          { text = "Done." } } }
        local c = client(provider)
        local msgs = { { role = "user", content = "do it" } }
        local r = assert(c:chat { messages = msgs, tools = TOOLS, stream = stream })
        assert.are.equal("tool_calls", r.stop_reason)
        local calls = llm.tool_calls(r.message)
        assert.are.equal(2, #calls)
        assert.are.same({ type = "tool_call", id = "call_a", name = "exec",
                          arguments = { argv = { "echo", "one two three" } } }, calls[1])
        assert.are.same({ type = "tool_call", id = "call_b", name = "read_file",
                          arguments = { path = "notes/today.txt" } }, calls[2])
        assert.are.equal("Let me look.", llm.text(r.message))
        msgs[#msgs + 1] = r.message
        msgs[#msgs + 1] = { role = "tool", content = {
          { type = "tool_result", id = "call_a", content = "one two three" },
          { type = "tool_result", id = "call_b", content = "no such file", is_error = true } } }
        r = assert(c:chat { messages = msgs, tools = TOOLS, stream = stream })
        assert.are.equal("Done.", llm.text(r.message))
        local reqs = srv.requests()
        assert.are.same({ "exec", "read_file" }, U.tool_names(reqs[1]))
        local results = U.tool_results(reqs[2])
        assert.are.equal(2, #results)
        assert.are.equal("call_a", results[1].id)
        assert.are.equal("one two three", results[1].content)
        assert.are.equal("call_b", results[2].id)
        if provider == "anthropic" then
          assert.is_true(results[2].is_error)
          -- the assistant turn went back with its tool_use blocks
          local asst = reqs[2].body.messages[2]
          assert.are.equal("assistant", asst.role)
          assert.are.equal("tool_use", asst.content[2].type)
          assert.are.equal("call_a", asst.content[2].id)
        else
          local asst = reqs[2].body.messages[2]
          assert.are.equal("call_b", asst.tool_calls[2].id)
          assert.are.equal('{"path":"notes/today.txt"}', asst.tool_calls[2]["function"].arguments)
        end
      end)

      it(label .. ": retries a 429 after Retry-After, then succeeds", function()
        srv.script { turns = { { status = 429, headers = { ["Retry-After"] = "1" } },
                               { status = 503, error = "busy" }, { text = "finally" } } }
        local retries = {}
        local t0 = claw.now()
        local r = assert(client(provider):chat { messages = { { role = "user", content = "x" } }, stream = stream,
          on_retry = function(n, wait, err) retries[#retries + 1] = { n, wait, err } end })
        assert.are.equal("finally", llm.text(r.message))
        assert.are.equal(3, r.attempts)
        assert.are.equal(1, retries[1][2]) -- Retry-After honoured exactly
        assert.matches("HTTP 429", retries[1][3])
        assert.matches("HTTP 503: .*busy", retries[2][3])
        assert.is_true(retries[2][2] >= 0.05 and retries[2][2] <= 0.1 + 1e-9, "backoff with jitter")
        assert.is_true(claw.now() - t0 >= 1)
        assert.are.equal(3, #srv.requests())
      end)

      it(label .. ": gives up after max_retries with the last error", function()
        srv.script { turns = { { status = 529, error = "overloaded" } }, repeat_last = true }
        local r, err = client(provider, { max_retries = 2 }):chat {
          messages = { { role = "user", content = "x" } }, stream = stream }
        assert.is_nil(r)
        assert.are.equal(("llm %s: HTTP 529: %s (after 3 attempts)"):format(provider,
          provider == "openai" and "rate_limit_exceeded: overloaded" or "overloaded_error: overloaded"), err)
        assert.are.equal(3, #srv.requests())
      end)

      it(label .. ": a malformed answer is a clear error, not a crash", function()
        srv.script { turns = { { raw = '{"choices": [oops' } } }
        local r, err = client(provider):chat { messages = { { role = "user", content = "x" } }, stream = stream }
        assert.is_nil(r)
        if stream then
          assert.matches("^llm " .. provider .. ": malformed stream event", err)
        else
          assert.matches("^llm " .. provider .. ": malformed response: json: ", err)
        end
        assert.are.equal(1, #srv.requests()) -- not retried: the same request would get the same
      end)

      it(label .. ": tool-call arguments that are not JSON are kept with the reason", function()
        srv.script { turns = { { tool_calls = { { id = "c1", name = "exec", arguments = "{argv: [ls" } } } } }
        local r = assert(client(provider):chat { messages = { { role = "user", content = "x" } },
                                                 tools = TOOLS, stream = stream })
        local call = llm.tool_calls(r.message)[1]
        assert.are.equal("c1", call.id)
        assert.is_nil(call.arguments)
        assert.is_string(call.arguments_error)
      end)

      it(label .. ": errors never show the key", function()
        srv.script { turns = { { status = 401, error = "invalid key " .. KEY, error_type = "authentication_error" } } }
        local r, err = client(provider):chat { messages = { { role = "user", content = "x" } }, stream = stream }
        assert.is_nil(r)
        assert.matches("HTTP 401: authentication_error: invalid key %[redacted%]", err)
        assert.is_nil(err:find(KEY, 1, true))
      end)
    end

    it(provider .. ": a stream cut mid-event is an error naming the cut", function()
      srv.script { turns = { { text = ("word "):rep(40), cut = true } } }
      local seen = {}
      local r, err = client(provider):chat { messages = { { role = "user", content = "x" } }, stream = true,
                                             on_delta = function(d) seen[#seen + 1] = d end }
      assert.is_nil(r)
      assert.are.equal("llm " .. provider ..
        ": sse: stream ended in the middle of an event (the answer was cut off)", err)
      assert.is_true(#seen > 0)
    end)

    it(provider .. ": JSON mode asks for a JSON object", function()
      srv.script { turns = { { text = '{"ok":true}' } } }
      assert(client(provider):chat { messages = { { role = "user", content = "x" } }, json = true })
      local body = srv.requests()[1].body
      if provider == "openai" then
        assert.are.same({ type = "json_object" }, body.response_format)
      else
        assert.matches("JSON object", body.system)
      end
    end)

    it(provider .. ": a connection refused is retried, then reported", function()
      local c = llm.new { provider = provider, base_url = "http://127.0.0.1:1/v1", model = "m", api_key = KEY,
                          max_retries = 1, retry_base = 0.01 }
      local r, err = c:chat { messages = { { role = "user", content = "x" } } }
      assert.is_nil(r)
      assert.matches("^llm " .. provider .. ": http: .*127%.0%.0%.1.*%(after 2 attempts%)$", err)
    end)
  end

  it("anthropic: unknown stream events are skipped and counted; an error event fails the answer", function()
    srv.script { turns = { { text = "fine", unknown_event = true }, { text = "x", error_event = "overloaded_error" } } }
    local c = client("anthropic")
    local r = assert(c:chat { messages = { { role = "user", content = "x" } }, stream = true })
    assert.are.equal("fine", llm.text(r.message))
    assert.are.equal(1, r.ignored_events)
    local r2, err = c:chat { messages = { { role = "user", content = "x" } }, stream = true }
    assert.is_nil(r2)
    assert.are.equal("llm anthropic: stream error: overloaded_error: Overloaded", err)
  end)

  it("openai: an unknown chunk object in a stream does not change the answer", function()
    srv.script { turns = { { text = "fine", unknown_event = true } } }
    local r = assert(client("openai"):chat { messages = { { role = "user", content = "x" } }, stream = true })
    assert.are.equal("fine", llm.text(r.message))
  end)

  it("rejects bad options naming the field", function()
    assert.has_error(function() llm.new { provider = "gemini", model = "m" } end,
      'bad field \'provider\' ("openai" or "anthropic" expected, got "gemini")')
    assert.has_error(function() llm.new { provider = "openai" } end, "bad field 'model' (string expected, got nil)")
    assert.has_error(function() llm.new { provider = "openai", model = "m", timeout = "5" } end,
      "bad field 'timeout' (number expected, got string)")
    local c = client("openai")
    assert.has_error(function() c:chat { messages = { { content = "x" } } } end,
      "bad field 'messages[1]' (message with a role expected)")
    assert.has_error(function() c:chat { messages = {}, tools = { { description = "x" } } } end,
      "bad field 'tools[1].name' (string expected, got nil)")
  end)

  it("takes the key from the environment when the script gives none", function()
    local r = H.lua({ "-e", ([[
      local llm = require "clawlua.llm"
      local c = llm.new { provider = "anthropic", model = "m", base_url = %q }
      io.write(c.secret())]]):format(srv.base) }, { env = { ANTHROPIC_API_KEY = "env-key-123" } })
    assert.are.equal("env-key-123", r.stdout, r.stderr)
  end)
end)
