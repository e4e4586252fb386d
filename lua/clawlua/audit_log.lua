-- The parts of clawlua.audit written in Lua: subscribe, log_files, read_file and verify. The C
-- module exports each of them and loads this file on first use (they need the loop's tasks).
local claw = require "clawlua"

local audit = claw.audit
local M = {}

--- Calls fn(event) on the loop for every event emitted from now on that matches filter
--- ({kind=, sandbox=, pid=}). Returns a handle: handle:close() stops it; handle.missed counts
--- events evicted from the ring before this subscriber saw them (it fell too far behind).
---@param fn fun(event: table)
---@param filter table|nil
function M.subscribe(fn, filter)
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

-- Work done in one go between two turns of the loop when reading or verifying files: the C
-- side stops after this much and the loop runs before it goes on.
local READ_BUDGET = 1 << 20
local VERIFY_LINES = 20000

--- The files of a rotated log, oldest first: path.N, ..., path.1, path (those that exist).
---@param path string
---@return string[]
function M.log_files(path)
  local files = {}
  local function exists(p)
    local f = io.open(p, "r")
    if f then f:close() return true end
    return false
  end
  local n = 0
  while n < 1000 and exists(path .. "." .. (n + 1)) do n = n + 1 end
  for i = n, 1, -1 do files[#files + 1] = path .. "." .. i end
  if exists(path) then files[#files + 1] = path end
  return files
end

--- Iterates the events of a JSONL audit file that match filter (the filter of audit.events),
--- streaming: memory stays bounded whatever the file's size. With filter.limit, yields the
--- newest `limit` matches (kept in a buffer of that many lines). Malformed lines and a torn
--- last line are skipped; the iterator's second value is the line number.
---@param path string
---@param filter table|nil
---@return function|nil iterator
---@return string|nil err
function M.read_file(path, filter)
  local f, limit = {}, nil
  for k, v in pairs(filter or {}) do
    if k == "limit" then limit = v else f[k] = v end
  end
  if limit ~= nil and (math.type(limit) ~= "integer" or limit < 0) then
    error("bad field 'limit' (non-negative integer expected)", 2)
  end
  if limit == 0 then limit = nil end
  local r, err, code = audit.reader(path, { filter = f, raw = limit ~= nil })
  if not r then return nil, err, code end
  local function pull()
    while true do
      local ev, line = r:next(READ_BUDGET)
      if ev then return ev, line end
      if ev == nil then
        if line then error(line, 0) end
        return nil
      end
      claw.yield() -- a long stretch without a match: let the loop run
    end
  end
  if not limit then
    return function()
      local ev, line = pull()
      if ev == nil then r:close() end
      return ev, line
    end
  end
  -- The newest `limit` matches: a ring of raw lines, decoded at the end.
  local ring, lines, n = {}, {}, 0
  while true do
    local raw, line = pull()
    if not raw then break end
    n = n + 1
    ring[(n - 1) % limit + 1] = raw
    lines[(n - 1) % limit + 1] = line
  end
  r:close()
  local first = n > limit and n - limit + 1 or 1
  local i = first - 1
  return function()
    while i < n do
      i = i + 1
      local k = (i - 1) % limit + 1
      local ev = claw.json.decode(ring[k])
      ring[k] = nil
      if ev then return ev, lines[k] end
    end
    return nil
  end
end

--- Verifies the hash chain of audit log files. The files of a rotated set may be given in any
--- order: they are checked oldest first, each file's anchor against the end of the one before.
--- Returns {ok=, files={{path=, ok=, lines=, records=, issues={{line=, seq=, kind=, message=}},
--- torn=, first_seq=, last_seq=, last_hash=, anchor=}}}. A file that cannot be read is not ok
--- and has .error.
---@param paths string|string[]
---@return table report
function M.verify(paths)
  if type(paths) == "string" then paths = { paths } end
  if type(paths) ~= "table" then
    error("bad argument #1 to 'verify' (file path or list of paths expected)", 2)
  end
  local files = {}
  for i, p in ipairs(paths) do
    local head, err = audit._file_head(p)
    files[#files + 1] = { path = p, head = head, err = err, index = i }
  end
  -- Oldest first: by the seq of the first record; unreadable and empty files keep their place
  -- at the end.
  table.sort(files, function(a, b)
    local sa = a.head and a.head.seq or math.maxinteger
    local sb = b.head and b.head.seq or math.maxinteger
    if sa ~= sb then return sa < sb end
    return a.index < b.index
  end)
  local report = { ok = true, files = {} }
  local prev_hash
  for _, f in ipairs(files) do
    local res
    local v, err = audit._verifier(f.path, { prev = prev_hash })
    if not v then
      res = { path = f.path, ok = false, error = err, issues = {} }
    else
      while true do
        local done, serr = v:step(VERIFY_LINES)
        if done then break end
        if done == nil then
          res = { path = f.path, ok = false, error = serr, issues = {} }
          break
        end
        claw.yield()
      end
      res = res or v:result()
      v:close()
      res.path = f.path
    end
    if res.last_hash then prev_hash = res.last_hash end
    if not res.ok then report.ok = false end
    report.files[#report.files + 1] = res
  end
  return report
end

return M
