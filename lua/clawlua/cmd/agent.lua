-- `clawlua agent`: runs an agent on a task against an OpenAI-compatible or Anthropic endpoint.
-- Its tools are the sandbox tools (clawlua.mcp.tools, every call in a sandbox under the policy)
-- plus the tools of the MCP servers given with --mcp. The answer goes to stdout, progress to
-- stderr.
local claw = require "clawlua"
local llm = require "clawlua.llm"
local loop = require "clawlua.agent.loop"

local M = {}

M.usage = [[clawlua agent --provider openai|anthropic --model M [options] TASK...

  --provider P      openai (chat completions; OpenAI, Ollama, vLLM, llama.cpp) or anthropic
  --base-url URL    the API's base URL (default: the provider's public endpoint)
  --model M         the model name
  --policy FILE     the sandbox policy (default: the built-in default policy)
  --mcp "CMD ..."   also offer the tools of this MCP server (stdio); repeatable
  --mcp-only        no sandbox tools: only the --mcp servers' tools (the policy's hook still
                    sees every call when --policy is given)
  --max-steps N     model calls at most (20)
  --max-tokens N    input + output tokens at most
  --max-time S      wall-clock seconds at most
  --transcript FILE record the run as JSON lines; with --resume, continue from it
  --resume          continue the run recorded in --transcript
  --system TEXT     a system prompt
  --stream          stream the model's answers (text is echoed to stderr as it arrives)
  -q, --quiet       no progress on stderr

The API key comes from $OPENAI_API_KEY or $ANTHROPIC_API_KEY. TASK "-" reads the task from
stdin. Exit status: 0 answered; 1 model or tool set failure; 2 usage; 3 a budget ran out.]]

local SPEC = {
  ["--provider"] = "value", ["--base-url"] = "value", ["--model"] = "value", ["--policy"] = "value",
  ["--mcp"] = "list", ["--mcp-only"] = "flag", ["--max-steps"] = "value", ["--max-tokens"] = "value",
  ["--max-time"] = "value", ["--transcript"] = "value", ["--resume"] = "flag", ["--system"] = "value",
  ["--stream"] = "flag", ["--quiet"] = "flag", ["-q"] = "flag",
}

local function usage_error(msg)
  io.stderr:write("clawlua agent: ", msg, "\n", M.usage, "\n")
  return 2
end

local function fail(msg, code)
  io.stderr:write("clawlua agent: ", msg, "\n")
  return code or 1
end

local function parse(args)
  return require("clawlua.cli.options").parse(args, SPEC)
end

local function number_opt(opts, name, integer)
  local v = opts[name]
  if v == nil then return true, nil end
  local n = tonumber(v)
  if not n or n <= 0 or (integer and math.tointeger(n) == nil) then
    return false, ("option '%s' needs a positive %s"):format(name, integer and "integer" or "number")
  end
  return true, integer and math.tointeger(n) or n
end

-- The first line of a require failure (the rest lists every path searched).
local function first_line(e) return (tostring(e):match("^[^\n]*")) end

local function load_policy(path)
  local ok, policy = pcall(require, "clawlua.policy")
  if not ok then return nil, "the policy module (clawlua.policy) is not available: " .. first_line(policy) end
  if path then return policy.load(path) end
  return policy.default()
end

local function progress(quiet)
  if quiet then return nil end
  return function(kind, d)
    local line
    if kind == "step" then
      line = ("[step %d] %d tool call(s), %d+%d tokens, %.2fs"):format(d.step, d.tool_calls, d.input_tokens,
        d.output_tokens, d.model_time)
    elseif kind == "tool_call" then
      line = ("  %s %s (%.3fs)%s"):format(d.tool, d.is_error and "error" or "ok", d.duration,
        d.denied and " denied by policy" or "")
    elseif kind == "done" then
      line = ("[done] %s after %d step(s), %d tool call(s)"):format(d.reason, d.steps, d.tool_calls)
    end
    if line then io.stderr:write(line, "\n") end
  end
end

function M.run(args)
  if args[1] == "--help" or args[1] == "-h" then
    io.stdout:write("usage: ", M.usage, "\n")
    return 0
  end
  local opts, rest = parse(args)
  if not opts then return usage_error(rest) end
  local provider, model = opts["--provider"], opts["--model"]
  if not provider then return usage_error("--provider is required") end
  if not llm.PROVIDERS[provider] then return usage_error(("unknown provider '%s'"):format(provider)) end
  if not model then return usage_error("--model is required") end
  local numbers = {}
  for name, integer in pairs { ["--max-steps"] = true, ["--max-tokens"] = true, ["--max-time"] = false } do
    local ok, v = number_opt(opts, name, integer)
    if not ok then return usage_error(v) end
    numbers[name] = v
  end
  if opts["--resume"] and not opts["--transcript"] then return usage_error("--resume needs --transcript") end
  local task = table.concat(rest, " ")
  if task == "-" then task = io.stdin:read("a") end
  if task == "" and not opts["--resume"] then return usage_error("no TASK given") end
  if opts["--mcp-only"] and #opts["--mcp"] == 0 then return usage_error("--mcp-only needs at least one --mcp") end

  local policy, perr
  if opts["--policy"] or not opts["--mcp-only"] then
    policy, perr = load_policy(opts["--policy"])
    if not policy then return fail(perr) end
  end
  local sets = {}
  local function close_all()
    for i = #sets, 1, -1 do
      if sets[i].close then pcall(sets[i].close, sets[i]) end
    end
  end
  if not opts["--mcp-only"] then
    local ok, tools = pcall(require, "clawlua.mcp.tools")
    if not ok then
      return fail("the sandbox tool set (clawlua.mcp.tools) is not available: " .. first_line(tools) ..
                  "; --mcp-only runs with the --mcp servers' tools alone")
    end
    local ts, terr = tools.new { policy = policy }
    if not ts then return fail(terr) end
    sets[#sets + 1] = ts
  end
  local mcp = require "clawlua.mcp.client"
  for _, line in ipairs(opts["--mcp"]) do
    local c, err = mcp.connect { command = line }
    if not c then
      close_all()
      return fail(err)
    end
    sets[#sets + 1] = c
  end
  local quiet = opts["--quiet"] or opts["-q"]
  local client = llm.new { provider = provider, model = model, base_url = opts["--base-url"] }
  local a = loop.new {
    llm = client, tools = sets, policy = policy, name = "clawlua-agent", system = opts["--system"],
    max_steps = numbers["--max-steps"], max_tokens = numbers["--max-tokens"], max_time = numbers["--max-time"],
    transcript = opts["--transcript"], stream = opts["--stream"], on_event = progress(quiet),
    on_delta = (opts["--stream"] and not quiet) and function(d)
      if d.type == "text" then io.stderr:write(d.text) end
    end or nil,
  }
  local ok, res, err, info = pcall(function()
    if opts["--resume"] then return a:resume() end
    return a:run(task)
  end)
  close_all()
  if not ok then
    if claw.is_cancelled(res) then error(res, 0) end
    return fail(tostring(res))
  end
  if not res then return fail(err, info and info.reason == "budget" and 3 or 1) end
  io.stdout:write(res.answer, res.answer:sub(-1) == "\n" and "" or "\n")
  io.stdout:flush()
  return 0
end

return M
