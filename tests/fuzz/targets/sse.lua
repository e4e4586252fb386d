-- fuzz: seeds=sse dict=sse
-- fuzz_lua_sse: lua/clawlua/llm/sse.lua against a plain reference reading of the WHATWG
-- event-stream format (lines end in CRLF, LF or CR; a blank line dispatches; `data` lines join
-- with "\n"; an empty `event` means "message"; an `id` with NUL is ignored; `retry` only when all
-- digits; an unfinished event at the end is dropped). The input is fed once whole and once cut
-- at positions taken from its own bytes: both must give the reference's events and its verdict
-- at the end of the stream, and a parser with tiny caps must fail cleanly, never raise.
local sse = require "clawlua.llm.sse"

local function reference(s)
  local events, data, ev, last_id, retry, pending = {}, nil, "", nil, nil, false
  local pos, len = 1, #s
  if s:sub(1, 3) == "\239\187\191" then pos = 4 end -- a leading UTF-8 BOM is skipped
  while pos <= len do
    local e = s:find("[\r\n]", pos)
    if not e then break end
    local line = s:sub(pos, e - 1)
    if s:byte(e) == 13 and s:byte(e + 1) == 10 then e = e + 1 end
    pos = e + 1
    if line == "" then
      if data then
        events[#events + 1] = { event = ev ~= "" and ev or "message", data = table.concat(data, "\n"),
                                id = last_id, retry = retry }
      end
      data, ev, pending = nil, "", false
    elseif line:byte(1) ~= 58 then
      local field, value = line:match("^([^:]*):(.*)$")
      if not field then field, value = line, "" end
      if value:byte(1) == 32 then value = value:sub(2) end
      if field == "data" then
        data = data or {}
        data[#data + 1] = value
        pending = true
      elseif field == "event" then
        ev, pending = value, true
      elseif field == "id" then
        if not value:find("\0", 1, true) then last_id = value end
        pending = true
      elseif field == "retry" then
        if value:match("^%d+$") then retry = tonumber(value) end
        pending = true
      end
    end
  end
  return events, pos > len and not pending
end

local function run(chunks, opts)
  local got = {}
  opts = opts or {}
  opts.on_event = function(ev)
    got[#got + 1] = { event = ev.event, data = ev.data, id = ev.id, retry = ev.retry }
  end
  local p = sse.new(opts)
  for _, c in ipairs(chunks) do
    local ok, err = p:feed(c)
    if not ok then return got, nil, err end
  end
  local ok, err = p:finish()
  return got, ok == true, err
end

local function show(ev)
  return ("{event=%q data=%q id=%s retry=%s}"):format(ev.event, ev.data,
    ev.id and ("%q"):format(ev.id) or "nil", tostring(ev.retry))
end

local function same(want, got, how)
  for i = 1, math.max(#want, #got) do
    local a, b = want[i], got[i]
    if not a or not b or a.event ~= b.event or a.data ~= b.data or a.id ~= b.id or a.retry ~= b.retry then
      error(("%s: event %d is %s, the reference says %s"):format(how, i, b and show(b) or "missing",
        a and show(a) or "none"))
    end
  end
end

return function(data)
  local want, want_ok = reference(data)
  local got, ok, err = run({ data })
  assert(ok ~= nil, err)
  same(want, got, "whole")
  assert(ok == want_ok, ("whole: finish() says %s, the reference %s"):format(ok, want_ok))
  -- the same stream in pieces of 1..7 bytes (lengths from the input's bytes), with an empty
  -- chunk wherever the byte is a multiple of 7
  local chunks, pos, i = {}, 1, 1
  while pos <= #data do
    local b = data:byte(i)
    if b % 7 == 0 then chunks[#chunks + 1] = "" end
    local n = 1 + b % 7
    chunks[#chunks + 1] = data:sub(pos, pos + n - 1)
    pos, i = pos + n, i % #data + 1
  end
  got, ok, err = run(chunks)
  assert(ok ~= nil, err)
  same(want, got, "in chunks")
  assert(ok == want_ok, ("in chunks: finish() says %s, the reference %s"):format(ok, want_ok))
  -- tiny caps: a clean failure naming the cap, or the same events
  got, ok, err = run(chunks, { max_line = 8, max_event = 8 })
  if ok == nil then
    assert(type(err) == "string" and err:match("^sse: %a+ larger than %d+ bytes$")
      or err:match("^sse: line longer than %d+ bytes$"), err)
  else
    same(want, got, "under tiny caps")
  end
end
