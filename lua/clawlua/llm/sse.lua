-- Server-sent events (the WHATWG event-stream format), parsed incrementally: feed it the chunks
-- that clawlua.http's on_chunk hands over, in whatever pieces they arrive; it calls on_event
-- once per complete event. Lines end in CRLF, LF or CR (a CR at the end of one chunk and an LF
-- at the start of the next are one line end). Lines and events are bounded.
local M = {}

local find, sub, byte = string.find, string.sub, string.byte
local concat = table.concat

local CR, LF, COLON, SPACE = 13, 10, 58, 32
local BOM = "\239\187\191"

---@class clawlua.sse.event
---@field event string   the event type ("message" when the stream names none)
---@field data string    the data lines joined with "\n"
---@field id string|nil  the last event id seen on the stream
---@field retry integer|nil a reconnection time the server asked for (ms)

---@class clawlua.sse.parser
local Parser = {}
Parser.__index = Parser

--- A new parser. on_event(ev) is called for each complete event; returning false from it
--- stops the parser (feed then returns nil, "stopped"). The ev table is reused from one event
--- to the next (no allocation per event): copy the fields to keep them.
---@param opts {on_event: fun(ev: clawlua.sse.event): boolean|nil, max_line: integer|nil, max_event: integer|nil}
---@return clawlua.sse.parser
function M.new(opts)
  assert(type(opts) == "table", "sse.new{on_event=} expected")
  if type(opts.on_event) ~= "function" then
    error("bad field 'on_event' (function expected, got " .. type(opts.on_event) .. ")", 2)
  end
  return setmetatable({
    on_event = opts.on_event,
    max_line = opts.max_line or (1 << 20),
    max_event = opts.max_event or (16 << 20),
    buf = "",          -- the unfinished line
    skip_lf = false,   -- the last chunk ended in CR: a leading LF belongs to it
    data = {},         -- data lines of the event being read
    data_n = 0,
    data_bytes = 0,
    event = nil,
    last_id = nil,
    retry = nil,
    pending = false,   -- a field of an unfinished event has been seen
    events = 0,
    failed = nil,
    ev = {},           -- the event table handed to on_event, reused
  }, Parser)
end

local function dispatch(self)
  local n = self.data_n
  local ev_type = self.event
  self.event = nil
  self.pending = false
  if n == 0 then return true end -- no data: nothing to dispatch (per the spec)
  local data = n == 1 and self.data[1] or concat(self.data, "\n", 1, n)
  self.data_n, self.data_bytes = 0, 0
  self.events = self.events + 1
  local t = self.ev
  -- an empty or absent event type is "message"
  t.event, t.data, t.id, t.retry = ev_type ~= "" and ev_type or "message", data, self.last_id, self.retry
  local ok = self.on_event(t)
  if ok == false then
    self.failed = "stopped"
    return nil
  end
  return true
end

-- Handles one line (without its end) given as buf[i..j].
local function line(self, buf, i, j)
  if j < i then return dispatch(self) end
  local c = byte(buf, i)
  if c == COLON then return true end -- a comment
  local colon = find(buf, ":", i, true)
  local field, value
  if colon and colon <= j then
    field = sub(buf, i, colon - 1)
    local v = colon + 1
    if byte(buf, v) == SPACE then v = v + 1 end
    value = sub(buf, v, j)
  else
    field, value = sub(buf, i, j), ""
  end
  if field == "data" then
    local n = self.data_n + 1
    self.data_bytes = self.data_bytes + #value + 1
    if self.data_bytes > self.max_event then
      self.failed = ("sse: event larger than %d bytes"):format(self.max_event)
      return nil
    end
    self.data[n] = value
    self.data_n = n
    self.pending = true
  elseif field == "event" then
    self.event = value
    self.pending = true
  elseif field == "id" then
    if not find(value, "\0", 1, true) then self.last_id = value end
    self.pending = true
  elseif field == "retry" then
    if find(value, "^%d+$") then self.retry = tonumber(value) end
    self.pending = true
  end -- other fields are ignored, as the format says
  return true
end

-- "data: " and "event: " are recognised byte by byte on the fast path.
local D, A, T, SP, E, V, N = 100, 97, 116, 32, 101, 118, 110

-- At an event boundary, an event of the usual shapes ("event: x\ndata: y\n\n" or
-- "data: y\n\n") is matched in one call and dispatched. Returns the position after it, nil
-- when the text there has another shape (or is incomplete), false when on_event stopped.
local function whole_event(self, buf, pos)
  local _, e, ev, data = find(buf, "^event: ([^\n]*)\ndata: ([^\n]*)\n\n", pos)
  if not e then
    _, e, data = find(buf, "^data: ([^\n]*)\n\n", pos)
    ev = nil
  end
  if not e or #data >= self.max_event then return nil end
  self.events = self.events + 1
  local t = self.ev
  t.event, t.data, t.id, t.retry = ev ~= "" and ev or "message", data, self.last_id, self.retry
  if self.on_event(t) == false then
    self.failed = "stopped"
    return false
  end
  return e + 1
end

-- One LF-ended line buf[pos..e-1] on the fast path: data and event lines without the split.
local function lf_line(self, buf, pos, e)
  if e == pos then return dispatch(self) end
  local b1, b2, b3, b4, b5, b6, b7 = byte(buf, pos, pos + 6)
  if b1 == E and b2 == V and b3 == E and b4 == N and b5 == T and b6 == COLON and b7 == SP then
    self.event, self.pending = sub(buf, pos + 7, e - 1), true
  elseif b1 == D and b2 == A and b3 == T and b4 == A and b5 == COLON and b6 == SP then
    local n = self.data_n + 1
    local bytes = self.data_bytes + (e - pos - 5)
    if bytes > self.max_event then
      self.failed = ("sse: event larger than %d bytes"):format(self.max_event)
      return nil
    end
    self.data[n] = sub(buf, pos + 6, e - 1)
    self.data_n, self.data_bytes, self.pending = n, bytes, true
  else
    return line(self, buf, pos, e - 1)
  end
  return true
end

--- Feeds the next chunk of the stream. Returns true, or nil and the reason once the stream is
--- unusable (a line or event over its cap, or on_event asked to stop); later feeds fail the same.
---@param chunk string
---@return true|nil, string|nil
function Parser:feed(chunk)
  if self.failed then return nil, self.failed end
  local buf = self.buf
  if buf ~= "" then buf = buf .. chunk else buf = chunk end
  if not self.bom_done then -- a UTF-8 BOM at the start of the stream is skipped
    if #buf < 3 and sub(BOM, 1, #buf) == buf then
      self.buf = buf
      return true
    end
    self.bom_done = true
    if sub(buf, 1, 3) == BOM then buf = sub(buf, 4) end
  end
  local pos, len = 1, #buf
  if self.skip_lf then
    if byte(buf, 1) == LF then pos = 2 end
    if len > 0 then self.skip_lf = false end
  end
  if not self.cr and find(chunk, "\r", 1, true) then self.cr = true end
  if not self.cr then
    -- Fast path (no CR seen on this stream): lines end in LF.
    while true do
      local whole
      if self.data_n == 0 and not self.pending then
        whole = whole_event(self, buf, pos)
        if whole == false then return nil, self.failed end
      end
      if whole then
        pos = whole
      else
        local e = find(buf, "\n", pos, true)
        if not e then break end
        if not lf_line(self, buf, pos, e) then return nil, self.failed end
        pos = e + 1
      end
    end
  else
    while pos <= len do
      local e = find(buf, "[\r\n]", pos)
      if not e then break end
      if not line(self, buf, pos, e - 1) then return nil, self.failed end
      if byte(buf, e) == CR then
        if e == len then
          self.skip_lf = true
        elseif byte(buf, e + 1) == LF then
          e = e + 1
        end
      end
      pos = e + 1
    end
  end
  if pos > len then
    self.buf = ""
  else
    if len - pos + 1 > self.max_line then
      self.failed = ("sse: line longer than %d bytes"):format(self.max_line)
      self.buf = ""
      return nil, self.failed
    end
    self.buf = sub(buf, pos)
  end
  return true
end

--- Ends the stream. Returns true when it ended between events, or nil and
--- "sse: stream ended in the middle of an event" when an event was cut off.
---@return true|nil, string|nil
function Parser:finish()
  if self.failed then return nil, self.failed end
  if self.buf ~= "" or self.pending then
    self.buf = ""
    return nil, "sse: stream ended in the middle of an event"
  end
  return true
end

return M
