-- clawlua.agent.loop: task -> model -> tool calls -> results -> model ... until the model answers
-- without calling a tool or a budget (steps, tokens, wall time) runs out. Tools come from tool
-- sets (duck typed: ts:list(), ts:call(name, args, ctx)): the sandbox tool set
-- (clawlua.mcp.tools), MCP client connections, or a workflow's own. The calls of one step run
-- concurrently, each as a loop task; the policy's hooks.on_tool_call is asked about every call
-- (a refusal goes back to the model as a tool error); every step is an audit event and a record
-- in a JSON-lines transcript from which a later run resumes.
local claw = require "clawlua"
local json = require "clawlua.json"
local llm = require "clawlua.llm"

local M = {}

local DEFAULT_MAX_STEPS = 20
local DEFAULT_MAX_RESULT = 64 << 10
local DEFAULT_PARALLEL = 8
local MAX_TRANSCRIPT_LINE = 64 << 20

---@class clawlua.agent
---@field name string
---@field messages table[] the conversation so far (neutral messages)
---@field steps integer model calls made
---@field usage {input_tokens: integer, output_tokens: integer}
local Agent = {}
Agent.__index = Agent

local function check(opts, name, want)
  local v = opts[name]
  if v ~= nil and type(v) ~= want then
    error(("bad field '%s' (%s expected, got %s)"):format(name, want, type(v)), 3)
  end
  return v
end

--- Creates an agent.
---@class clawlua.agent.options
---@field llm clawlua.llm.client the model
---@field tools table|table[] a tool set or an array of tool sets
---@field policy table|nil a clawlua.policy (its hooks.on_tool_call is asked about each call)
---@field name string|nil the agent's name (the hook's client, audit events, ctx.client)
---@field system string|nil
---@field max_steps integer|nil model calls (20)
---@field max_tokens integer|nil input + output tokens over the whole run
---@field max_time number|nil seconds of wall time for the whole run
---@field max_result integer|nil bytes of a tool result given to the model (64 KiB)
---@field max_parallel integer|nil tool calls of one step run at once (8)
---@field tool_timeout number|nil seconds per tool call
---@field stream boolean|nil stream the model's answers (on_delta sees them)
---@field on_delta fun(d: table)|nil
---@field on_event fun(kind: string, detail: table)|nil progress (step, tool_call, tool_result, done)
---@field transcript string|nil JSON-lines file (appended; resumed from by agent:resume())
---@field chat_options table|nil extra fields for client:chat (max_tokens, temperature, json)
---@param opts clawlua.agent.options
---@return clawlua.agent
function M.new(opts)
  if type(opts) ~= "table" then error("agent.new{llm=, tools=, ...} expected", 2) end
  if type(opts.llm) ~= "table" or type(opts.llm.chat) ~= "function" then
    error("bad field 'llm' (an llm client expected, got " .. type(opts.llm) .. ")", 2)
  end
  local sets = opts.tools or {}
  if type(sets) ~= "table" then error("bad field 'tools' (tool set or array expected, got " .. type(sets) .. ")", 2) end
  if sets.list then sets = { sets } end
  for i, ts in ipairs(sets) do
    if type(ts) ~= "table" or type(ts.list) ~= "function" or type(ts.call) ~= "function" then
      error(("bad field 'tools[%d]' (tool set with list and call expected)"):format(i), 2)
    end
  end
  for _, f in ipairs { { "max_steps", "number" }, { "max_tokens", "number" }, { "max_time", "number" },
                       { "max_result", "number" }, { "max_parallel", "number" }, { "tool_timeout", "number" },
                       { "system", "string" }, { "name", "string" }, { "transcript", "string" },
                       { "on_event", "function" }, { "on_delta", "function" }, { "policy", "table" },
                       { "chat_options", "table" } } do
    check(opts, f[1], f[2])
  end
  local self = setmetatable({
    client = opts.llm,
    sets = sets,
    policy = opts.policy,
    name = opts.name or "agent",
    system = opts.system,
    max_steps = opts.max_steps or DEFAULT_MAX_STEPS,
    max_tokens = opts.max_tokens,
    max_time = opts.max_time,
    max_result = opts.max_result or DEFAULT_MAX_RESULT,
    max_parallel = opts.max_parallel or DEFAULT_PARALLEL,
    tool_timeout = opts.tool_timeout,
    stream = opts.stream,
    on_delta = opts.on_delta,
    on_event = opts.on_event,
    transcript_path = opts.transcript,
    chat_options = opts.chat_options or {},
    messages = {},
    steps = 0,
    tool_calls = 0,
    usage = { input_tokens = 0, output_tokens = 0 },
  }, Agent)
  return self
end

-- The tools the model is offered: every set's list, in order; a name two sets share keeps the
-- first set's tool and offers the later one as "<set name>__<tool>".
function Agent:catalogue()
  local tools, route = {}, {}
  for i, ts in ipairs(self.sets) do
    for _, t in ipairs(ts:list()) do
      local name = t.name
      if route[name] then name = (tostring(ts.name or ("set" .. i)):gsub("[^%w_-]", "_")) .. "__" .. t.name end
      route[name] = { set = ts, tool = t.name }
      tools[#tools + 1] = { name = name, description = t.description or t.title or "",
                            input_schema = t.inputSchema or t.input_schema or { type = "object" } }
    end
  end
  self.tools, self.route = tools, route
  return tools
end

function Agent:emit(kind, detail)
  detail.agent = self.name
  claw.audit.emit("agent." .. kind, detail)
  if self.on_event then self.on_event(kind, detail) end
end

function Agent:record(rec)
  if not self.transcript_path then return end
  if not self.transcript then
    local f, err = io.open(self.transcript_path, "a")
    if not f then error("agent: transcript: " .. err, 0) end
    f:setvbuf("line")
    self.transcript = f
  end
  rec.time = claw.loop.time()
  local line = assert(json.encode(rec))
  self.transcript:write(line, "\n")
end

-- The text of a tool result for the model, capped.
function Agent:result_text(r)
  local parts = {}
  for _, c in ipairs(type(r.content) == "table" and r.content or {}) do
    if c.type == "text" then
      parts[#parts + 1] = tostring(c.text)
    elseif type(c) == "table" then
      parts[#parts + 1] = ("[%s%s]"):format(tostring(c.type), c.mimeType and (" " .. c.mimeType) or "")
    end
  end
  if #parts == 0 and r.structuredContent ~= nil then parts[1] = json.encode(r.structuredContent) or "" end
  local s = table.concat(parts, "\n")
  if #s > self.max_result then
    s = s:sub(1, self.max_result) .. ("...[truncated %d bytes]"):format(#s - self.max_result)
  end
  return M.clean_utf8(s)
end

--- A text made valid UTF-8 (a tool may print anything; JSON carries only UTF-8): each byte
--- that does not belong to a valid sequence becomes U+FFFD.
function M.clean_utf8(s)
  if utf8.len(s) then return s end
  local out, i = {}, 1
  while true do
    local ok, bad = utf8.len(s, i)
    if ok then
      out[#out + 1] = s:sub(i)
      break
    end
    out[#out + 1] = s:sub(i, bad - 1)
    out[#out + 1] = "\u{FFFD}"
    i = bad + 1
  end
  return table.concat(out)
end

local function is_cancelled(e) return claw.is_cancelled(e) end

-- Runs one tool call; returns a tool_result block (never raises, except to pass on cancellation).
function Agent:run_call(call, step)
  local t0 = claw.now()
  local function done(text, is_error, extra)
    local detail = { step = step, tool = call.name, id = call.id, is_error = is_error,
                     duration = claw.now() - t0 }
    for k, v in pairs(extra or {}) do detail[k] = v end
    self:emit("tool_call", detail)
    return { type = "tool_result", id = call.id, content = text, is_error = is_error or nil }
  end
  if not call.arguments then
    return done(("error: %s; call %s again with a JSON object as its arguments"):format(
      call.arguments_error or "arguments missing", call.name), true, { bad_arguments = true })
  end
  local r = self.route[call.name]
  if not r then
    return done(("error: there is no tool named '%s'"):format(call.name), true, { unknown = true })
  end
  local hooks = self.policy and self.policy.hooks
  if hooks and hooks.on_tool_call and r.set.policy ~= self.policy then
    local ok, allowed, reason
    local has_pol, pol = pcall(require, "clawlua.policy")
    if has_pol and pol.is_policy(self.policy) then
      -- under the policy's instruction budget; a hook that fails or runs out denies
      ok, allowed, reason = true, pol.call_hook(self.policy, "on_tool_call", r.tool, call.arguments, self.name)
    else
      ok, allowed, reason = pcall(hooks.on_tool_call, r.tool, call.arguments, self.name)
    end
    if not ok then
      if is_cancelled(allowed) then error(allowed, 0) end
      allowed, reason = false, "the policy hook failed: " .. tostring(allowed)
    end
    if not allowed then
      claw.audit.emit("policy.deny", { agent = self.name, tool = r.tool, reason = reason })
      return done("denied by policy: " .. tostring(reason or "no reason given"), true, { denied = true })
    end
  end
  local ctx = { client = self.name, timeout = self.tool_timeout, progress = function(d, total, msg)
    if self.on_event then self.on_event("progress", { tool = call.name, id = call.id, done = d, total = total,
                                                      message = msg }) end
  end }
  local ok, res, err = pcall(r.set.call, r.set, r.tool, call.arguments, ctx)
  if not ok then
    if is_cancelled(res) then error(res, 0) end
    return done("error: the tool failed: " .. tostring(res), true, { failed = true })
  end
  if not res then
    local msg = type(err) == "table" and err.message or tostring(err)
    return done("error: " .. tostring(msg), true)
  end
  return done(self:result_text(res), res.isError == true)
end

-- Runs the calls of one step concurrently (at most max_parallel at once); results in call order.
function Agent:run_calls(calls, step, deadline)
  local results, tasks = {}, {}
  local running = 0
  local slots = claw.event()
  local ok, err, why = pcall(function()
    for i, call in ipairs(calls) do
      while running >= self.max_parallel do
        slots:clear()
        slots:wait()
      end
      running = running + 1
      tasks[i] = claw.spawn(function()
        local r = self:run_call(call, step)
        running = running - 1
        slots:set()
        return r
      end)
    end
    for i, t in ipairs(tasks) do
      local left = deadline and math.max(0, deadline - claw.now()) or nil
      local r, e = t:join(left)
      if r == nil then
        if e == "timeout" then return nil, "time" end
        r = { type = "tool_result", id = calls[i].id, content = "error: " .. tostring(e), is_error = true }
      end
      results[i] = r
    end
    return true
  end)
  for _, t in ipairs(tasks) do
    if not t:done() then t:cancel() end
  end
  if not ok then error(err, 0) end
  if err == nil then return nil, why end
  return results
end

function Agent:time_spent()
  return ("budget: wall time of %gs used (max_time)"):format(self.max_time)
end

function Agent:budget_left(deadline)
  if self.max_tokens and self.usage.input_tokens + self.usage.output_tokens >= self.max_tokens then
    return nil, ("budget: %d tokens used (max_tokens %d)"):format(
      self.usage.input_tokens + self.usage.output_tokens, self.max_tokens)
  end
  if deadline and claw.now() >= deadline then
    return nil, self:time_spent()
  end
  return true
end

function Agent:push(msg)
  self.messages[#self.messages + 1] = msg
  self:record { type = "message", message = msg }
end

-- The model's next answer, within the deadline.
function Agent:ask(deadline)
  local req = { messages = self.messages, tools = self.tools, system = self.system, stream = self.stream,
                on_delta = self.on_delta }
  for k, v in pairs(self.chat_options) do req[k] = v end
  if not deadline then return self.client:chat(req) end
  local t = claw.spawn(function() return self.client:chat(req) end)
  local ok, res, err = pcall(t.join, t, math.max(0, deadline - claw.now()))
  if not ok then
    t:cancel()
    error(res, 0)
  end
  if res == nil and err == "timeout" and not t:done() then
    t:cancel()
    return nil, "time"
  end
  return res, err
end

function Agent:finish(result)
  self:record { type = "done", reason = result.reason, answer = result.answer, error = result.error,
                steps = self.steps, usage = self.usage }
  self:emit("done", { reason = result.reason, steps = self.steps, tool_calls = self.tool_calls,
                      input_tokens = self.usage.input_tokens, output_tokens = self.usage.output_tokens,
                      error = result.error })
  if self.transcript then
    self.transcript:close()
    self.transcript = nil
  end
  return result
end

-- The loop proper, from the conversation as it stands.
function Agent:drive()
  local deadline = self.max_time and (claw.now() + self.max_time) or nil
  self:catalogue()
  while true do
    local last = self.messages[#self.messages]
    local pending = last and last.role == "assistant" and llm.tool_calls(last) or {}
    if last and last.role == "assistant" and #pending == 0 then
      return self:finish { reason = "done", answer = llm.text(last) }
    end
    if #pending > 0 then -- the model asked for tools: run them (also after a resume)
      local step = self.steps
      self.tool_calls = self.tool_calls + #pending
      local results = self:run_calls(pending, step, deadline)
      if not results then
        return self:finish { reason = "budget", error = self:time_spent() }
      end
      self:push { role = "tool", content = results }
    end
    local ok, why = self:budget_left(deadline)
    if not ok then return self:finish { reason = "budget", error = why } end
    if self.steps >= self.max_steps then
      local msg = "budget: %d steps used (max_steps) and the model still calls tools"
      return self:finish { reason = "budget", error = msg:format(self.steps) }
    end
    self.steps = self.steps + 1
    local t0 = claw.now()
    local res, err = self:ask(deadline)
    if not res then
      if err == "time" then
        return self:finish { reason = "budget", error = self:time_spent() }
      end
      return self:finish { reason = "model", error = err }
    end
    self.usage.input_tokens = self.usage.input_tokens + res.usage.input_tokens
    self.usage.output_tokens = self.usage.output_tokens + res.usage.output_tokens
    local calls = llm.tool_calls(res.message)
    self:push(res.message)
    self:record { type = "step", step = self.steps, stop_reason = res.stop_reason, usage = res.usage }
    self:emit("step", { step = self.steps, tool_calls = #calls, stop_reason = res.stop_reason,
                        input_tokens = res.usage.input_tokens, output_tokens = res.usage.output_tokens,
                        model_time = claw.now() - t0 })
  end
end

local function run_protected(self)
  local ok, res = pcall(self.drive, self)
  if ok then
    res.steps, res.usage, res.messages = self.steps, self.usage, self.messages
    if res.reason == "done" then return res end
    return nil, res.error, res
  end
  if is_cancelled(res) then
    self:finish { reason = "cancelled", error = "cancelled" }
    error(res, 0)
  end
  if self.transcript then
    self.transcript:close()
    self.transcript = nil
  end
  error(res, 0)
end

--- Runs the agent on a task until the model answers without tool calls.
--- Returns {answer=, reason="done", steps=, usage=, messages=}, or nil, reason, the same table
--- with reason = "budget" | "model" (and error =). Cancelling the calling task stops it
--- (the running tool calls are cancelled; the transcript records it).
---@param task string
---@return table|nil, string|nil, table|nil
function Agent:run(task)
  if type(task) ~= "string" then error("bad argument #1 to 'run' (task string expected)", 2) end
  local ok, err = pcall(self.record, self, { type = "start", agent = self.name, task = task, system = self.system,
                                             provider = self.client.provider, model = self.client.model })
  if not ok then return nil, tostring(err), { reason = "transcript" } end
  self:push { role = "user", content = task }
  return run_protected(self)
end

--- Reads a transcript back: the conversation, steps and usage, and whether it had finished.
---@param path string
---@return table|nil, string|nil
function M.read_transcript(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, "agent: transcript: " .. err end
  local st = { messages = {}, steps = 0, usage = { input_tokens = 0, output_tokens = 0 } }
  local lines = {}
  for line in f:lines() do
    if #line > MAX_TRANSCRIPT_LINE then
      f:close()
      return nil, ("agent: %s:%d: record too large"):format(path, #lines + 1)
    end
    lines[#lines + 1] = line
  end
  f:close()
  for n, line in ipairs(lines) do
    local rec, jerr = json.decode(line)
    if type(rec) ~= "table" then
      if n == #lines then break end -- a last line cut short by a crash is dropped
      return nil, ("agent: %s:%d: %s"):format(path, n, jerr or "not a record")
    end
    if rec.type == "start" then
      st.task, st.system, st.agent = rec.task, rec.system, rec.agent
    elseif rec.type == "message" then
      st.messages[#st.messages + 1] = rec.message
      st.done = nil
    elseif rec.type == "step" then
      st.steps = math.max(st.steps, math.tointeger(rec.step) or 0)
      if type(rec.usage) == "table" then
        st.usage.input_tokens = st.usage.input_tokens + (math.tointeger(rec.usage.input_tokens) or 0)
        st.usage.output_tokens = st.usage.output_tokens + (math.tointeger(rec.usage.output_tokens) or 0)
      end
    elseif rec.type == "done" then
      st.done = rec
    end
  end
  return st
end

--- Continues from the agent's transcript (opts.transcript): the conversation is read back, tool
--- calls the model made but that have no results yet are run, and the loop goes on. A
--- transcript that ended with an answer gives that answer again without calling the model.
---@return table|nil, string|nil, table|nil
function Agent:resume()
  if not self.transcript_path then error("agent:resume() needs the 'transcript' option", 2) end
  local st, err = M.read_transcript(self.transcript_path)
  if not st then return nil, err end
  if #st.messages == 0 then return nil, "agent: " .. self.transcript_path .. ": nothing to resume" end
  if st.done and st.done.reason == "done" then
    return { answer = st.done.answer, reason = "done", steps = st.steps, usage = st.usage, messages = st.messages,
             resumed = true }
  end
  self.messages, self.steps, self.usage = st.messages, st.steps, st.usage
  self.system = self.system or st.system
  self:record { type = "resume", steps = st.steps }
  local res, e, info = run_protected(self)
  if res then res.resumed = true end
  return res, e, info
end

return M
