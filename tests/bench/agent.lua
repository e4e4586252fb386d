-- Orchestration overhead of the agent loop per tool-call step: everything but the model's latency
-- and the tool's own work. The loop runs N steps against the scripted model server
-- (tests/integration/model_server.py), each step one tool call to a tool that does nothing; the
-- peer, in the same run, posts the very request bodies the loop sent (recorded by the server)
-- with bare clawlua.http requests, which is the model's latency as the loop sees it. The
-- difference per step is what the loop adds: encoding the conversation, decoding the answer,
-- routing and running the call in a task, the hook, audit events, the transcript. It is given in
-- wall time (best of 5; noisy on a shared machine) and in this process's CPU time (os.clock:
-- the server's work is in another process), which the load of other processes barely moves.
--   build/bin/clawlua tests/bench/agent.lua [steps=100]
package.path = (os.getenv("CLAWLUA_SRC") or ".") .. "/tests/lua/?.lua;" .. package.path
local claw = require "clawlua"
local json = require "clawlua.json"
local llm = require "clawlua.llm"
local agent = require "clawlua.agent.loop"
local U = require "agent_util"

local N = tonumber(arg and arg[1]) or 100

local SCRIPT = { repeat_last = true,
                 turns = { { text = "next", tool_calls = { { name = "noop", arguments = { x = 1 } } } } } }

local noop = { name = "bench tools" }
function noop.list() return { { name = "noop", description = "does nothing",
                                inputSchema = { type = "object", properties = { x = { type = "integer" } } } } } end
function noop.call() return { content = { { type = "text", text = "ok" } } } end

local function run(srv, provider, stream, with)
  srv.script(SCRIPT)
  local policy = with.hook and { hooks = { on_tool_call = function() return true end } } or nil
  local a = agent.new { llm = llm.new { provider = provider, base_url = srv.base, model = "bench", api_key = "k" },
                        tools = noop, max_steps = N, stream = stream, policy = policy,
                        transcript = with.transcript and os.tmpname() or nil }
  local t0, c0 = claw.now(), os.clock()
  local res, err = a:run("go")
  local t_agent, c_agent = claw.now() - t0, os.clock() - c0
  assert(res == nil and err:match("max_steps"), err)
  if a.transcript_path then os.remove(a.transcript_path) end
  -- the peer: the same bodies, posted bare
  local reqs = srv.requests()
  assert(#reqs == N, #reqs)
  local bodies, path = {}, reqs[1].path
  for i, r in ipairs(reqs) do bodies[i] = assert(json.encode(r.body)) end
  srv.script(SCRIPT)
  local url = srv.base:gsub("/v1$", "") .. path
  local headers = { ["Content-Type"] = "application/json" }
  t0, c0 = claw.now(), os.clock()
  for i = 1, N do
    if stream then
      assert(claw.http.request { url = url, method = "POST", body = bodies[i], headers = headers,
                                 on_chunk = function() end })
    else
      assert(claw.http.request { url = url, method = "POST", body = bodies[i], headers = headers })
    end
  end
  return t_agent, claw.now() - t0, c_agent, os.clock() - c0
end

claw.run(function()
  local srv = U.model_server()
  print(("agent loop, %d tool-call steps per run, scripted model server on 127.0.0.1"):format(N))
  for _, provider in ipairs { "openai", "anthropic" } do
    for _, stream in ipairs { false, true } do
      for _, with in ipairs { {}, { hook = true, transcript = true } } do
        local wall, cpu = math.huge, math.huge
        local wa, wh, ca, ch
        for _ = 1, 5 do
          local ta, th, xa, xh = run(srv, provider, stream, with)
          if ta - th < wall then wall, wa, wh = ta - th, ta, th end
          if xa - xh < cpu then cpu, ca, ch = xa - xh, xa, xh end
        end
        local ms = function(x) return x / N * 1000 end
        print(("  %-9s %-6s %-18s wall: loop %5.2f, bare http (peer) %5.2f, overhead %6.3f ms/step;"
               .. " CPU: loop %5.3f, peer %5.3f, overhead %5.3f ms/step%s")
          :format(provider, stream and "stream" or "whole", with.hook and "+hook +transcript" or "",
                  ms(wa), ms(wh), ms(wall), ms(ca), ms(ch), ms(cpu),
                  ms(cpu) <= 1 and "" or "  (over the 1 ms target)"))
      end
    end
  end
  srv.close()
end)
