-- proc.run: a command run to completion with its output collected. The C module clawlua.proc
-- exports `run`, which loads this file on first use (it needs tasks of the loop).
local claw = require "clawlua"

local M = {}

local DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024

local RUN_FIELDS = { stdin = true, timeout = true, max_output = true }

--- Reads a stream to EOF, keeping at most `cap` bytes.
---@return string data, boolean truncated
local function collect(stream, cap)
  local parts, n, truncated = {}, 0, false
  while true do
    local chunk = stream:read(65536)
    if not chunk then break end
    if n < cap then
      local room = cap - n
      if #chunk > room then
        chunk = chunk:sub(1, room)
        truncated = true
      end
      parts[#parts + 1] = chunk
      n = n + #chunk
    else
      truncated = true
    end
  end
  return table.concat(parts), truncated
end

--- Checks run's own options; returns spawn's options, the stdin data, timeout and cap.
local function split_options(opts)
  local spawn_opts = {}
  for k, v in pairs(opts) do
    if not RUN_FIELDS[k] then spawn_opts[k] = v end
  end
  local data, timeout = nil, opts.timeout
  local cap = opts.max_output or DEFAULT_MAX_OUTPUT
  if type(opts.stdin) == "string" then data = opts.stdin else spawn_opts.stdin = opts.stdin end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("bad field 'timeout' (non-negative number of seconds expected)", 3)
  end
  if math.type(cap) ~= "integer" or cap < 0 then
    error("bad field 'max_output' (non-negative integer expected)", 3)
  end
  if data then spawn_opts.stdin = "pipe" elseif spawn_opts.stdin == nil then spawn_opts.stdin = "null" end
  if spawn_opts.stdout == nil then spawn_opts.stdout = "pipe" end
  if spawn_opts.stderr == nil then spawn_opts.stderr = "pipe" end
  return spawn_opts, data, timeout, cap
end

--- Runs a command to completion and collects its output.
--- Takes every proc.spawn option, with `stdin` a string of data fed to the command (any other
--- stdin value is proc.spawn's slot), plus `timeout` (seconds, nil: none, 0: kill it unless it
--- has exited at once; the process group is killed when it passes) and `max_output` (bytes kept
--- per stream). A command killed by its timeout is a result with `timed_out = true`.
---@param opts table
---@return table|nil result {code|signal, signal_name, stdout, stderr, truncated, timed_out, duration, pid}
---@return string|nil err
---@return integer|nil errcode
function M.run(opts)
  if type(opts) ~= "table" then
    error("bad argument #1 to 'run' (table expected, got " .. type(opts) .. ")", 2)
  end
  local spawn_opts, data, timeout, cap = split_options(opts)
  local p <close>, err, code = claw.proc.spawn(spawn_opts)
  if not p then return nil, err, code end
  local deadline = timeout and (claw.now() + timeout)

  local tasks = {}
  if data then
    tasks[#tasks + 1] = claw.spawn(function()
      p.stdin:write(data) -- a child that exits early closes the pipe: EPIPE is fine here
      p.stdin:close()
    end)
  end
  local out_task = p.stdout and claw.spawn(collect, p.stdout, cap)
  local err_task = p.stderr and claw.spawn(collect, p.stderr, cap)

  local status = p:wait(timeout)
  local timed_out = false
  if not status then
    timed_out = true
    p:kill("KILL", "group")
    status = assert(p:wait())
  end
  -- Output may still be in flight after the exit (or held open by a grandchild): give readers
  -- until the deadline, then take what they have.
  local function finish(t)
    if not t then return "", false end
    local left = deadline and math.max(deadline - claw.now(), 0.05) or nil
    local out, truncated = t:join(left)
    if out == nil then
      t:cancel()
      return "", true
    end
    return out, truncated
  end
  local stdout, tr1 = finish(out_task)
  local stderr, tr2 = finish(err_task)
  for _, t in ipairs(tasks) do
    if not t:done() then t:cancel() end
  end
  status.stdout = stdout
  status.stderr = stderr
  status.truncated = tr1 or tr2
  status.timed_out = timed_out
  return status
end

return M
