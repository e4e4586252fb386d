-- Workflow: run an untrusted script in a sandbox and summarise what it did. The agent runs the
-- script through the sandbox tools and answers in JSON mode with {exit_code, summary}; the
-- workflow checks that answer against the exit code the tool reported.
--
--   clawlua examples/agent/untrusted_script.lua --provider openai --model M [--base-url URL] [--policy FILE]
--
-- As a module (loadfile(path)("--module")): run{llm=, tools=, policy=, script=, progress=} ->
-- {exit_code, summary, agrees, sandbox}.
local C = dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".") .. "/common.lua")
local agent = require "clawlua.agent.loop"
local json = require "clawlua.json"

local M = {}

function M.run(opts)
  local ts = opts.tools
  return C.with_sandbox(ts, function(id)
    C.call(ts, "sandbox_write_file", { id = id, path = "/work/untrusted.sh",
                                       content = opts.script or C.read(C.dir .. "/untrusted.sh") })
    local seen_exit
    local watcher = { name = "watcher", list = function() return ts:list() end,
                      call = function(_, name, args, ctx)
                        local r, e = ts:call(name, args, ctx)
                        if r and name == "sandbox_exec" and r.structuredContent then
                          seen_exit = r.structuredContent.exit_code
                        end
                        return r, e
                      end }
    local a = agent.new {
      llm = opts.llm, tools = watcher, policy = opts.policy, name = "inspector", max_steps = opts.max_steps or 6,
      chat_options = { json = true }, on_event = opts.progress and C.progress("inspector") or nil,
      system = "You inspect untrusted scripts by running them in a sandbox. Never trust their output.",
    }
    local r, err = a:run(("Run /work/untrusted.sh in sandbox %s (command sh untrusted.sh, cwd /work, "
      .. "timeout_s 20) and answer with a JSON object {\"exit_code\": N, \"summary\": \"...\"} saying what it "
      .. "printed and how it ended."):format(id))
    if not r then error("inspector: " .. err, 0) end
    local doc = json.decode(r.answer)
    if type(doc) ~= "table" or type(doc.summary) ~= "string" then
      error("inspector: the answer is not the JSON object asked for: " .. r.answer:sub(1, 200), 0)
    end
    return { exit_code = doc.exit_code, summary = doc.summary, agrees = doc.exit_code == seen_exit,
             ran = seen_exit ~= nil, sandbox = id }
  end)
end

if ... == "--module" then return M end
C.script(M, "examples/agent/untrusted_script.lua", { ... })
