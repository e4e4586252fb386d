-- `clawlua agent` end to end: the host binary against the scripted model server, with the tools
-- of the MCP reference server (--mcp-only) and, when the sandbox tool set is in the build, the
-- sandbox tools under a policy.
local json = require "clawlua.json"
local U = require "agent_util"
local H = require "helper"

local KEY = "sk-cli-KEY-77aa01c3"

describe("clawlua agent", function()
  local srv, dir, everything, why
  setup(function()
    srv = U.model_server()
    dir = H.tmpdir("agentcli")
    everything, why = U.everything()
  end)
  teardown(function()
    srv.close()
    H.rm_rf(dir)
  end)

  local function agent(args, env)
    local argv = { "agent" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return H.clawlua(argv, { env = env or { OPENAI_API_KEY = KEY, ANTHROPIC_API_KEY = KEY }, timeout = 60 })
  end

  it("prints usage for --help (exit 0) and for bad usage (exit 2)", function()
    local r = agent { "--help" }
    assert.are.equal(0, r.code)
    assert.matches("^usage: clawlua agent %-%-provider openai|anthropic", r.stdout)
    r = agent { "--provider", "gemini", "--model", "m", "task" }
    assert.are.equal(2, r.code)
    assert.matches("unknown provider 'gemini'", r.stderr)
    r = agent { "--provider", "openai", "task" }
    assert.are.equal(2, r.code)
    assert.matches("%-%-model is required", r.stderr)
    r = agent { "--provider", "openai", "--model", "m", "--max-steps", "two", "task" }
    assert.are.equal(2, r.code)
    assert.matches("option '%-%-max%-steps' needs a positive integer", r.stderr)
    r = agent { "--provider", "openai", "--model", "m", "--bogus", "task" }
    assert.are.equal(2, r.code)
    assert.matches("unknown option '%-%-bogus'", r.stderr)
  end)

  it("says clearly when the sandbox tool set is not in this build", function()
    if pcall(require, "clawlua.mcp.tools") and pcall(require, "clawlua.policy") then
      pending("clawlua.mcp.tools and clawlua.policy are present: agent_sandbox_spec covers them")
      return
    end
    local r = agent { "--provider", "openai", "--model", "m", "--base-url", srv.base, "task" }
    assert.are.equal(1, r.code)
    assert.matches("^clawlua agent: the [%w ]+ %(clawlua%.[%w.]+%) is not available: module", r.stderr)
    assert.is_nil(r.stderr:find("\n.", 1)) -- one line, not the whole search path
  end)

  for _, provider in ipairs { "openai", "anthropic" } do
    it(provider .. ": runs the model's tool calls in a sandbox under the operator's policy", function()
      if not (pcall(require, "clawlua.mcp.tools") and H.is_root()) then
        pending("the sandbox tool set needs clawlua.mcp.tools and root")
        return
      end
      srv.script { turns = {
        { tool_calls = { { id = "c1", name = "sandbox_create", arguments = {} } } },
        { tool_calls = { { id = "c2", name = "sandbox_exec", arguments = { id = "{{sandbox}}",
          command = { "sh", "-c", "echo from-sandbox-$((6*7)); cat /etc/hostname; id -u" } } } } },
        { text = "The sandbox said from-sandbox-42." } } }
      local transcript = dir .. "/sb-" .. provider .. ".jsonl"
      local r = agent { "--provider", provider, "--model", "scripted", "--base-url", srv.base,
                        "--policy", H.src .. "/examples/policies/untrusted-code.lua",
                        "--transcript", transcript, "run a script somewhere safe" }
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("The sandbox said from-sandbox-42.\n", r.stdout)
      -- what the model was fed back: the command's output from inside the jail
      local reqs = srv.requests()
      assert.are.equal(3, #reqs)
      local id = U.tool_results(reqs[2])[1].content:match("created sandbox (sb%-%x+)")
      assert.truthy(id, U.tool_results(reqs[2])[1].content)
      local ran = U.tool_results(reqs[3])[2]
      assert.is_falsy(ran.is_error)
      assert.matches("from%-sandbox%-42\n", ran.content)
      -- every tool call is in the transcript, and the key is nowhere
      local t = H.read_file(transcript)
      assert.truthy(t:find('"sandbox_create"', 1, true))
      assert.truthy(t:find('"sandbox_exec"', 1, true))
      assert.is_nil(t:find(KEY, 1, true))
      assert.is_nil((r.stdout .. r.stderr):find(KEY, 1, true))
      -- the tool set destroyed its sandbox when the agent finished
      assert.is_nil(io.open("/run/clawlua/sandboxes/" .. id .. "/owner"))
    end)

    it(provider .. ": answers a task with an MCP server's tools, transcript and progress", function()
      if not everything then
        pending(why)
        return
      end
      srv.script { turns = {
        { tool_calls = { { id = "e1", name = "echo", arguments = { message = "from the agent" } } } },
        { text = "The server echoed: from the agent" } } }
      local tr = dir .. "/" .. provider .. ".jsonl"
      local r = agent { "--provider", provider, "--base-url", srv.base, "--model", "scripted", "--mcp-only",
                        "--mcp", table.concat(everything, " "), "--transcript", tr, "--stream",
                        "echo", "something" }
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("The server echoed: from the agent\n", r.stdout)
      assert.matches("%[step 1%] 1 tool call%(s%)", r.stderr)
      assert.matches("echo ok", r.stderr)
      assert.matches("%[done%] done after 2 step%(s%), 1 tool call%(s%)", r.stderr)
      local reqs = srv.requests()
      local first = reqs[1].body.messages[1]
      assert.are.equal("echo something", provider == "openai" and first.content or first.content[1].text)
      local res = U.tool_results(reqs[2])
      assert.are.equal("e1", res[1].id)
      assert.are.equal("Echo: from the agent", res[1].content)
      for _, text in ipairs { r.stdout, r.stderr, H.read_file(tr) } do
        assert.is_nil(text:find(KEY, 1, true))
      end
      local last
      for line in H.read_file(tr):gmatch("[^\n]+") do last = json.decode(line) end
      assert.are.equal("done", last.reason)
    end)
  end

  it("exits 3 when a budget runs out and 1 on a model error, saying why", function()
    if not everything then
      pending(why)
      return
    end
    srv.script { repeat_last = true, turns = { { tool_calls = { { name = "echo", arguments = { message = "x" } } } } } }
    local r = agent { "--provider", "openai", "--base-url", srv.base, "--model", "s", "--mcp-only", "--mcp",
                      table.concat(everything, " "), "--max-steps", "2", "-q", "loop forever" }
    assert.are.equal(3, r.code)
    assert.are.equal("", r.stdout)
    assert.are.equal("clawlua agent: budget: 2 steps used (max_steps) and the model still calls tools\n", r.stderr)
    srv.script { turns = { { status = 401, error = "bad key " .. KEY, error_type = "authentication_error" } } }
    r = agent { "--provider", "anthropic", "--base-url", srv.base, "--model", "s", "--mcp-only", "--mcp",
                table.concat(everything, " "), "-q", "x" }
    assert.are.equal(1, r.code)
    assert.are.equal("clawlua agent: llm anthropic: HTTP 401: authentication_error: bad key [redacted]\n", r.stderr)
  end)

  it("resumes a run from its transcript", function()
    if not everything then
      pending(why)
      return
    end
    local tr = dir .. "/resume.jsonl"
    srv.script { turns = { { tool_calls = { { id = "k1", name = "get-sum", arguments = { a = 1, b = 2 } } } },
                           { status = 400, error = "interrupted" } } }
    local common = { "--provider", "openai", "--base-url", srv.base, "--model", "s", "--mcp-only", "--mcp",
                     table.concat(everything, " "), "--transcript", tr, "-q" }
    local args = { table.unpack(common) }
    args[#args + 1] = "add one and two"
    assert.are.equal(1, agent(args).code)
    srv.script { turns = { { text = "It is 3." } } }
    args = { table.unpack(common) }
    args[#args + 1] = "--resume"
    local r = agent(args)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("It is 3.\n", r.stdout)
    assert.are.equal("k1", U.tool_results(srv.requests()[1])[1].id)
  end)
end)
