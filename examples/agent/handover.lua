-- Workflow: two cooperating agents. An explorer investigates a data directory in a sandbox and
-- leaves its findings in a file plus a one-line hand-over note; a writer picks up from the note,
-- reads the file and writes a report. Both work in the same sandbox, each under its own name (the
-- policy's hook and the audit see which agent made which call).
--
--   clawlua examples/agent/handover.lua --provider openai --model M [--base-url URL] [--policy FILE]
--
-- As a module (loadfile(path)("--module")): run{llm=, tools=, policy=, progress=} ->
-- {note, answer, findings, report, sandbox}.
local C = dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".") .. "/common.lua")
local agent = require "clawlua.agent.loop"

local M = {}

-- The data the explorer looks at: files of known sizes.
M.DATA = { ["alpha.log"] = 1200, ["beta.csv"] = 4800, ["gamma.bin"] = 300, ["delta.txt"] = 9000,
           ["epsilon.json"] = 2500 }

function M.run(opts)
  local ts = opts.tools
  return C.with_sandbox(ts, function(id)
    for name, size in pairs(M.DATA) do
      C.call(ts, "sandbox_write_file", { id = id, path = "/work/data/" .. name, content = ("x"):rep(size) })
    end
    local function new(name, system)
      return agent.new { llm = opts.llm, tools = ts, policy = opts.policy, name = name, system = system,
                         max_steps = opts.max_steps or 8, on_event = opts.progress and C.progress(name) or nil }
    end
    local explorer = new("explorer", "You investigate files in a sandbox and hand your findings over.")
    local r1, e1 = explorer:run(("In sandbox %s, find the three largest files under /work/data, write their "
      .. "names and sizes to /work/handover.txt, and answer with a one-line hand-over note."):format(id))
    if not r1 then error("explorer: " .. e1, 0) end
    local writer = new("writer", "You write short reports from other agents' findings.")
    local r2, e2 = writer:run(("Hand-over from the explorer: %s\nIn sandbox %s, read /work/handover.txt and "
      .. "write a short markdown report to /work/report.md; answer with where it is."):format(r1.answer, id))
    if not r2 then error("writer: " .. e2, 0) end
    return { note = r1.answer, answer = r2.answer, sandbox = id,
             findings = C.call(ts, "sandbox_read_file", { id = id, path = "/work/handover.txt" }).content,
             report = C.call(ts, "sandbox_read_file", { id = id, path = "/work/report.md" }).content }
  end)
end

if ... == "--module" then return M end
C.script(M, "examples/agent/handover.lua", { ... })
