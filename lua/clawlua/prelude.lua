-- The parts of the clawlua namespace written in Lua. Run once by luaopen_clawlua with the
-- namespace table; everything here builds on the C primitives.
local claw = ...

local proc = claw.proc

local DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024

local RUN_FIELDS = { input = true, timeout = true, max_output = true }

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

--- Runs a command to completion and collects its output.
--- Takes every proc.spawn option, plus `input` (string fed to stdin), `timeout` (seconds; the
--- process group is killed when it passes) and `max_output` (bytes kept per stream).
---@param opts table
---@return table|nil result {code|signal, signal_name, stdout, stderr, truncated, timed_out, elapsed, pid}
---@return string|nil err
---@return integer|nil errcode
function proc.run(opts)
  if type(opts) ~= "table" then
    error("bad argument #1 to 'run' (table expected, got " .. type(opts) .. ")", 2)
  end
  local spawn_opts = {}
  for k, v in pairs(opts) do
    if not RUN_FIELDS[k] then spawn_opts[k] = v end
  end
  local input, timeout = opts.input, opts.timeout
  local cap = opts.max_output or DEFAULT_MAX_OUTPUT
  if input ~= nil and type(input) ~= "string" then
    error("bad field 'input' (string expected, got " .. type(input) .. ")", 2)
  end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then
    error("bad field 'timeout' (non-negative number expected)", 2)
  end
  if math.type(cap) ~= "integer" or cap < 0 then
    error("bad field 'max_output' (non-negative integer expected)", 2)
  end
  if input then spawn_opts.stdin = "pipe" elseif spawn_opts.stdin == nil then spawn_opts.stdin = "null" end
  if spawn_opts.stdout == nil then spawn_opts.stdout = "pipe" end
  if spawn_opts.stderr == nil then spawn_opts.stderr = "pipe" end

  local p <close>, err, code = proc.spawn(spawn_opts)
  if not p then return nil, err, code end
  local deadline = timeout and (claw.now() + timeout)

  local tasks = {}
  if input then
    tasks[#tasks + 1] = claw.spawn(function()
      p.stdin:write(input) -- a child that exits early closes the pipe: EPIPE is fine here
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
    local data, truncated = t:join(left)
    if data == nil then
      t:cancel()
      return "", true
    end
    return data, truncated
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

local seccomp = claw.seccomp

--- Loads an OCI/Docker seccomp profile (a path or JSON text) as a filter. See
--- clawlua.seccomp_profiles.oci for the options.
function seccomp.load_oci(src, opts) return require("clawlua.seccomp_profiles").oci(src, opts) end

--- Loads Firecracker seccompiler JSON: {thread = filter}.
function seccomp.load_firecracker(src, opts)
  return require("clawlua.seccomp_profiles").firecracker(src, opts)
end

local audit = claw.audit

--- Calls fn(event) on the loop for every event emitted from now on that matches filter
--- ({kind=, sandbox=, pid=}). Returns a handle: handle:close() stops it; handle.missed counts
--- events evicted from the ring before this subscriber saw them (it fell too far behind).
---@param fn fun(event: table)
---@param filter table|nil
function audit.subscribe(fn, filter)
  if type(fn) ~= "function" then
    error("bad argument #1 to 'subscribe' (function expected, got " .. type(fn) .. ")", 2)
  end
  local f = {}
  for k, v in pairs(filter or {}) do f[k] = v end
  audit.events(f) -- validates the filter now, in the caller
  local handle = { missed = 0 }
  local last = audit.stats().last_seq
  handle.task = claw.spawn(function()
    while true do
      audit.wait(last)
      local st = audit.stats()
      if st.first_seq > last + 1 then handle.missed = handle.missed + (st.first_seq - last - 1) end
      f.after_seq = last
      last = st.last_seq
      for _, ev in ipairs(audit.events(f)) do
        if ev.seq <= last then
          local ok, err = pcall(fn, ev)
          if not ok then
            if claw.is_cancelled(err) then error(err, 0) end
            io.stderr:write("clawlua: audit subscriber failed: ", tostring(err), "\n")
          end
        end
      end
    end
  end)
  handle.task:set_daemon()
  function handle.close()
    if not handle.task:done() then handle.task:cancel() end
    return true
  end
  return setmetatable(handle, { __close = handle.close })
end

return claw
