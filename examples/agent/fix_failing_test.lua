-- Workflow: fix a failing test. A small repository (examples/agent/repo) is copied into a fresh
-- sandbox; an agent runs its test, reads the code, fixes it and runs the test again; then the
-- workflow runs the test itself, so the result does not rest on the model's word.
--
--   clawlua examples/agent/fix_failing_test.lua --provider openai --model M [--base-url URL] [--policy FILE]
--
-- As a module (loadfile(path)("--module")): run{llm=, tools=, policy=, progress=} -> {answer, fixed,
-- test_output, steps, sandbox}. tools is any tool set with the sandbox tools' names and shapes.
local C = dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".") .. "/common.lua")
local agent = require "clawlua.agent.loop"

local M = {}

M.FILES = { "mathlib.sh", "test.sh" }

function M.run(opts)
  local ts = opts.tools
  return C.with_sandbox(ts, function(id)
    for _, name in ipairs(M.FILES) do
      C.call(ts, "sandbox_write_file",
             { id = id, path = "/work/" .. name, content = C.read(C.dir .. "/repo/" .. name) })
    end
    local a = agent.new {
      llm = opts.llm, tools = ts, policy = opts.policy, name = "fixer", max_steps = opts.max_steps or 12,
      transcript = opts.transcript, on_event = opts.progress and C.progress("fixer") or nil,
      system = "You fix bugs in code inside a sandbox. Use the sandbox tools; keep changes minimal.",
    }
    local r, err = a:run(("The repository in /work of sandbox %s has a failing test: `sh test.sh` (cwd /work) "
      .. "exits non-zero. Find the bug, fix the code (not the test), and run the test again."):format(id))
    if not r then error("fixer: " .. err, 0) end
    local check = C.call(ts, "sandbox_exec", { id = id, command = { "sh", "test.sh" }, cwd = "/work" })
    return { answer = r.answer, fixed = check.exit_code == 0, test_output = check.stdout, steps = r.steps,
             sandbox = id }
  end)
end

if ... == "--module" then return M end
C.script(M, "examples/agent/fix_failing_test.lua", { ... })
