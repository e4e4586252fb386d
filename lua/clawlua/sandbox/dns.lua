-- clawlua.sandbox.dns: a sandbox's only resolver. A DNS forwarder on the loop that answers
-- allow-listed names only (NXDOMAIN and a `dns.deny` audit event otherwise), forwards those to
-- the policy's upstream resolvers, and hands the addresses in each answer to a pin callback
-- (the sandbox's firewall set) *before* the answer goes back, so an allowed name is reachable
-- the moment it resolves. Names outside the list never leave the host. Everything is bounded:
-- query size, queries in flight, cache entries, names, labels, records, compression jumps.
local claw = require "clawlua"

local M = {}

M.MAX_QUERY = 512         -- bytes of a query from the sandbox (EDNS clients fit: no big OPTs)
M.MAX_RESPONSE = 4096     -- bytes of an upstream answer we accept
M.MAX_RECORDS = 64        -- per section
M.MAX_JUMPS = 16          -- compression pointers followed per name

local T_A, T_NS, T_CNAME, T_TXT, T_AAAA, T_OPT = 1, 2, 5, 16, 28, 41
M.types = { A = T_A, NS = T_NS, CNAME = T_CNAME, TXT = T_TXT, AAAA = T_AAAA, OPT = T_OPT }

local function fail(msg, off) return nil, ("dns: %s at byte %d"):format(msg, off) end

local function u16(s, off) local a, b = s:byte(off + 1, off + 2); return a * 256 + b end

--- Reads a (possibly compressed) name at byte offset off (0-based). Returns the name in lower
--- case without the final dot ("" for the root) and the offset after it in the message.
---@param msg string
---@param off integer
---@return string|nil name, integer|string next_or_err
function M.read_name(msg, off)
  local labels, total, jumps, after = {}, 0, 0, nil
  local len = #msg
  local floor = off -- pointers must point strictly before where the name being read started
  while true do
    if off >= len then return fail("name runs past the end", off) end
    local n = msg:byte(off + 1)
    if n >= 0xC0 then
      if off + 2 > len then return fail("truncated compression pointer", off) end
      local target = u16(msg, off) & 0x3FFF
      if target >= floor then return fail("compression pointer does not point back", off) end
      -- the header holds no name; a pointer into it would also make a name that changes with
      -- the header (the empty reply to a query copies its question's bytes under a new header)
      if target < 12 then return fail("compression pointer into the header", off) end
      jumps = jumps + 1
      if jumps > M.MAX_JUMPS then return fail("too many compression pointers", off) end
      after = after or off + 2
      off, floor = target, target
    elseif n >= 0x40 then
      return fail("reserved label type", off)
    elseif n == 0 then
      return table.concat(labels, "."), after or off + 1
    else
      if off + 1 + n > len then return fail("label runs past the end", off) end
      total = total + n + 1
      if total > 254 then return fail("name longer than 255 bytes", off) end
      local label = msg:sub(off + 2, off + 1 + n)
      -- a dot inside a label would make the name's text read as another name (the allow-list
      -- and the cache match on the text)
      if label:find(".", 1, true) then return fail("label holds a dot", off) end
      labels[#labels + 1] = label:lower()
      off = off + 1 + n
    end
  end
end

local function ip4(d) return ("%d.%d.%d.%d"):format(d:byte(1, 4)) end

local function ip6(d)
  local w = {}
  for i = 1, 16, 2 do w[#w + 1] = ("%x"):format(d:byte(i) * 256 + d:byte(i + 1)) end
  -- the longest run of zero words (two or more) becomes "::", as inet_ntop writes it
  local best, blen, i = nil, 1, 1
  while i <= 8 do
    if w[i] == "0" then
      local j = i
      while j <= 8 and w[j] == "0" do j = j + 1 end
      if j - i > blen then best, blen = i, j - i end
      i = j
    else
      i = i + 1
    end
  end
  if not best then return table.concat(w, ":") end
  local head = table.concat(w, ":", 1, best - 1)
  local tail = table.concat(w, ":", best + blen, 8)
  return head .. "::" .. tail
end

--- Parses a DNS message with strict bounds. Returns a table
--- `{id, qr, opcode, aa, tc, rd, ra, rcode, questions = {{name, type, class}},
---   answers = {{name, type, class, ttl, ttl_at, data}}, authority = {...}, additional = {...}}`
--- where `data` is the address text for A/AAAA, the target for CNAME, else the raw bytes, and
--- `ttl_at` the 0-based offset of the TTL field; or nil and `"dns: <reason> at byte N"`.
---@param msg string
---@param max? integer largest message accepted (default M.MAX_RESPONSE)
---@return table|nil, string|nil
function M.parse(msg, max)
  if type(msg) ~= "string" then return nil, "dns: message is not a string" end
  max = max or M.MAX_RESPONSE
  if #msg > max then return fail("message longer than " .. max .. " bytes", 0) end
  if #msg < 12 then return fail("message shorter than its header", #msg) end
  local flags = u16(msg, 2)
  local m = { id = u16(msg, 0), qr = flags & 0x8000 ~= 0, opcode = (flags >> 11) & 15,
              aa = flags & 0x400 ~= 0, tc = flags & 0x200 ~= 0, rd = flags & 0x100 ~= 0,
              ra = flags & 0x80 ~= 0, rcode = flags & 15, questions = {}, answers = {},
              authority = {}, additional = {} }
  local qd, an, ns, ar = u16(msg, 4), u16(msg, 6), u16(msg, 8), u16(msg, 10)
  if qd > 1 then return fail("more than one question", 4) end
  for _, c in ipairs { an, ns, ar } do
    if c > M.MAX_RECORDS then return fail("more than " .. M.MAX_RECORDS .. " records in a section", 6) end
  end
  local off = 12
  for _ = 1, qd do
    local name, nxt = M.read_name(msg, off)
    if not name then return nil, nxt end
    if nxt + 4 > #msg then return fail("truncated question", nxt) end
    m.questions[#m.questions + 1] = { name = name, type = u16(msg, nxt), class = u16(msg, nxt + 2) }
    off = nxt + 4
  end
  for _, sec in ipairs { { an, m.answers }, { ns, m.authority }, { ar, m.additional } } do
    for _ = 1, sec[1] do
      local name, nxt = M.read_name(msg, off)
      if not name then return nil, nxt end
      if nxt + 10 > #msg then return fail("truncated record", nxt) end
      local rtype, class = u16(msg, nxt), u16(msg, nxt + 2)
      local ttl = u16(msg, nxt + 4) * 65536 + u16(msg, nxt + 6)
      if ttl >= 0x80000000 then ttl = 0 end -- RFC 2181: a TTL with the top bit set is zero
      local rdlen = u16(msg, nxt + 8)
      local rd = nxt + 10
      if rd + rdlen > #msg then return fail("record data runs past the end", rd) end
      local data = msg:sub(rd + 1, rd + rdlen)
      if rtype == T_A and class == 1 then
        if rdlen ~= 4 then return fail("A record of " .. rdlen .. " bytes", rd) end
        data = ip4(data)
      elseif rtype == T_AAAA and class == 1 then
        if rdlen ~= 16 then return fail("AAAA record of " .. rdlen .. " bytes", rd) end
        data = ip6(data)
      elseif rtype == T_CNAME then
        local target, tend = M.read_name(msg, rd)
        if not target then return nil, tend end
        if tend ~= rd + rdlen then return fail("CNAME target does not fill its record", rd) end
        data = target
      end
      sec[2][#sec[2] + 1] = { name = name, type = rtype, class = class, ttl = ttl,
                              ttl_at = nxt + 4, data = data }
      off = rd + rdlen
    end
  end
  if off ~= #msg then return fail("trailing bytes after the last record", off) end
  return m
end

local function be16(n) return string.char((n >> 8) & 255, n & 255) end

local function encode_name(name)
  local out = {}
  for label in name:gmatch("[^.]+") do out[#out + 1] = string.char(#label) .. label end
  out[#out + 1] = "\0"
  return table.concat(out)
end

--- A query message for name and type (tests, probes).
---@param name string
---@param qtype integer|string
---@param id? integer
---@return string
function M.query(name, qtype, id)
  qtype = M.types[qtype] or qtype
  return be16(id or 0) .. "\1\0" .. be16(1) .. be16(0) .. be16(0) .. be16(0)
    .. encode_name(name) .. be16(qtype) .. be16(1)
end

--- An answer with no records and the given rcode to query q (a parsed query, its raw bytes).
local function reply_empty(raw, q, rcode)
  -- header: same id, QR, opcode copied, RD copied, RA set; the question echoed; no records
  local rd = raw:byte(3) & 1
  local b3 = 0x80 | (q.opcode << 3) | rd
  local qend = 12
  if #q.questions == 1 then
    local _, nxt = M.read_name(raw, 12)
    qend = nxt + 4
  end
  return raw:sub(1, 2) .. string.char(b3, 0x80 | rcode) .. be16(#q.questions) .. be16(0)
    .. be16(0) .. be16(0) .. raw:sub(13, qend)
end
M.reply_empty = reply_empty

--- Whether name matches an allow pattern: "example.com" (that name) or "*.example.com" (any
--- name below it, not the name itself).
---@param name string
---@param pattern string
---@return boolean
function M.match(name, pattern)
  name = name:lower()
  if pattern:sub(1, 2) == "*." then
    local suffix = pattern:sub(2):lower()
    return #name > #suffix and name:sub(-#suffix) == suffix
  end
  return name == pattern:lower()
end

--- Checks a host name or wildcard pattern; returns it in lower case, or nil and a reason.
---@param s string
---@return string|nil, string|nil
function M.check_name(s)
  if type(s) ~= "string" then return nil, "a host name expected" end
  local name = s:lower():gsub("%.$", "")
  local body = name:sub(1, 2) == "*." and name:sub(3) or name
  if #name == 0 or #name > 253 then return nil, "a host name of 1 to 253 bytes expected" end
  for label in (body .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 or not label:match("^[%w_]([%w_-]*)$") or label:sub(-1) == "-" then
      return nil, ("'%s' is not a valid host name"):format(s)
    end
  end
  if body:match("^[%d.]+$") then return nil, ("'%s' is an address, not a host name"):format(s) end
  return name
end

local Forwarder = {}
Forwarder.__index = Forwarder

--- Starts a forwarder. opts:
--- `host`, `port=53` — where the sandbox asks; `upstreams` — resolver addresses (`"9.9.9.9"`,
--- `"[fd00::1]:5353"` or `"1.2.3.4:5353"`); `allowed(name)` → truthy to forward (nil: every
--- name); `pin(name, addrs)` → called with `{{addr=, ttl=}, ...}` of an allowed answer before
--- it is returned (may wait; a failure answers SERVFAIL); `sandbox` (audit id); `timeout=2`
--- per upstream try; `max_pending=64`; `cache_size=256`; `max_ttl=3600` (longest an answer
--- stays cached: never longer than its pins).
---@param opts table
---@return table|nil forwarder, string|nil err
function M.start(opts)
  assert(type(opts) == "table", "dns.start: options table expected")
  local ups = {}
  for i, u in ipairs(opts.upstreams or {}) do
    local h, p = tostring(u):match("^%[(.+)%]:(%d+)$")
    if not h then h, p = tostring(u):match("^([%d.]+):(%d+)$") end
    h, p = h or tostring(u), tonumber(p) or opts.upstream_port or 53
    if not (h:match("^[%d.]+$") or h:find(":")) then
      error(("bad field 'resolvers[%d]' (an address expected, got '%s')"):format(i, tostring(u)), 2)
    end
    ups[#ups + 1] = { host = h, port = p }
  end
  local sock, err = claw.udp.open { host = opts.host, port = opts.port or 53 }
  if not sock then return nil, err end
  local f = setmetatable({
    sock = sock, upstreams = ups, allowed = opts.allowed, pin = opts.pin,
    sandbox = opts.sandbox, timeout = opts.timeout or 2, max_pending = opts.max_pending or 64,
    cache_size = opts.cache_size or 256,
    max_ttl = opts.max_ttl or 3600, pending = 0, cache = {}, cached = 0,
    stats_ = { queries = 0, denied = 0, forwarded = 0, answered = 0, dropped = 0, failed = 0,
               cache_hits = 0 },
  }, Forwarder)
  f.task = claw.spawn(function() f:serve() end)
  f.task:set_daemon(true)
  return f
end

function Forwarder:audit(kind, fields)
  fields.sandbox = self.sandbox
  claw.audit.emit(kind, fields)
end

function Forwarder:serve()
  while not self.closed do
    local msg, host, port = self.sock:recv()
    if not msg then
      if self.closed then return end
      claw.sleep(0.01) -- a socket error (never EAGAIN): do not spin
    elseif self.pending >= self.max_pending then
      self.stats_.dropped = self.stats_.dropped + 1 -- as a congested network would
    else
      self.pending = self.pending + 1
      local t = claw.spawn(function()
        local ok, e = pcall(self.handle, self, msg, host, port)
        self.pending = self.pending - 1
        if not ok and not self.closed then
          self:audit("dns.error", { error = tostring(e) })
        end
      end)
      t:set_daemon(true)
    end
  end
end

function Forwarder:send(data, host, port)
  if not self.closed then self.sock:send(data, host, port) end
end

-- One question from the sandbox: deny, serve from the cache, or forward.
function Forwarder:handle(raw, host, port)
  local st = self.stats_
  st.queries = st.queries + 1
  local q, perr = M.parse(raw, M.MAX_QUERY)
  if not q or q.qr or #q.questions ~= 1 then
    st.dropped = st.dropped + 1
    -- a query we cannot read gets FORMERR when its header is intact, else nothing
    if q and not q.qr then self:send(reply_empty(raw, q, 1), host, port) end
    self:audit("dns.malformed", { client = host, error = perr or "not a single question" })
    return
  end
  local question = q.questions[1]
  if q.opcode ~= 0 or question.class ~= 1 then
    return self:send(reply_empty(raw, q, 4), host, port) -- NOTIMP
  end
  local name = question.name
  if self.allowed and not self.allowed(name) then
    st.denied = st.denied + 1
    self:audit("dns.deny", { name = name, qtype = question.type, client = host })
    return self:send(reply_empty(raw, q, 3), host, port) -- NXDOMAIN
  end
  local key = name .. "/" .. question.type
  local hit = self.cache[key]
  local now = claw.now()
  if hit and hit.expires > now then
    st.cache_hits = st.cache_hits + 1
    return self:send(self:from_cache(hit, raw, now), host, port)
  end
  st.forwarded = st.forwarded + 1
  local answer, a = self:ask(raw, q)
  if not answer then
    st.failed = st.failed + 1
    self:audit("dns.fail", { name = name, qtype = question.type, error = a })
    return self:send(reply_empty(raw, q, 2), host, port) -- SERVFAIL
  end
  -- Addresses of the name and of the CNAME chain it leads along, pinned before the answer
  -- goes back, so the sandbox's first connection already finds them allowed.
  local addrs, min_ttl = {}, nil
  for _, rr in ipairs(a.answers) do
    if rr.type == T_A or rr.type == T_AAAA then
      addrs[#addrs + 1] = { addr = rr.data, ttl = rr.ttl } -- the pin clamps it as it sees fit
    end
    min_ttl = math.min(min_ttl or rr.ttl, rr.ttl)
  end
  if #addrs > 0 and self.pin then
    local ok, e = self.pin(name, addrs)
    if not ok then
      st.failed = st.failed + 1
      self:audit("dns.fail", { name = name, error = "pin: " .. tostring(e) })
      return self:send(reply_empty(raw, q, 2), host, port)
    end
  end
  local addr_list = {}
  for i, x in ipairs(addrs) do addr_list[i] = x.addr end
  self:audit("dns.allow", { name = name, qtype = question.type, rcode = a.rcode,
                            addrs = addr_list, client = host })
  st.answered = st.answered + 1
  self:remember(key, answer, a, min_ttl or 0)
  -- the upstream answer, with the sandbox's own id
  self:send(raw:sub(1, 2) .. answer:sub(3), host, port)
end

-- Sends the query to the upstreams in turn, each from a fresh socket (a random source port)
-- with a random id; returns the raw answer and its parse, or nil and why.
function Forwarder:ask(raw, q)
  local why = "no resolvers"
  local question = q.questions[1]
  for _, up in ipairs(self.upstreams) do
    local s, err = claw.udp.open { host = up.host:find(":") and "::" or "0.0.0.0" }
    if not s then return nil, err end
    local id = math.random(0, 65535)
    local ok, serr = s:send(be16(id) .. raw:sub(3), up.host, up.port)
    if not ok then
      why = serr
    else
      local deadline, bad_answer = claw.now() + self.timeout, nil
      while true do
        local left = deadline - claw.now()
        if left <= 0 or self.closed then why = bad_answer or (up.host .. ": no answer"); break end
        local msg, from, fport = s:recv(left)
        if not msg then why = bad_answer or (up.host .. ": " .. tostring(from)); break end
        -- only an answer from the resolver asked, to this id and this question, counts
        if from == up.host and fport == up.port then
          local a, perr = M.parse(msg)
          if not a then
            bad_answer = up.host .. ": " .. perr
          elseif a.id == id and a.qr and #a.questions == 1 and a.questions[1].name == question.name
              and a.questions[1].type == question.type then
            s:close()
            if a.tc then return nil, up.host .. ": truncated answer" end
            return msg, a
          end
        end
      end
    end
    s:close()
  end
  return nil, why
end

function Forwarder:remember(key, answer, a, ttl)
  if ttl <= 0 or (a.rcode ~= 0 and a.rcode ~= 3) then return end
  if not self.cache[key] then
    if self.cached >= self.cache_size then
      -- full: drop the entry closest to expiry (a cache of a few hundred entries, rarely full)
      local worst
      for k, e in pairs(self.cache) do
        if not worst or e.expires < self.cache[worst].expires then worst = k end
      end
      self.cache[worst] = nil
      self.cached = self.cached - 1
    end
    self.cached = self.cached + 1
  end
  local ttls = {}
  for _, sec in ipairs { a.answers, a.authority, a.additional } do
    for _, rr in ipairs(sec) do
      -- an OPT record's "TTL" holds EDNS flags: never aged
      if rr.type ~= T_OPT then ttls[#ttls + 1] = { at = rr.ttl_at, ttl = rr.ttl } end
    end
  end
  self.cache[key] = { answer = answer, ttls = ttls, stored = claw.now(),
                      expires = claw.now() + math.min(ttl, self.max_ttl) }
end

-- The cached answer with the query's id and the TTLs aged by the time spent in the cache.
function Forwarder.from_cache(_, hit, raw, now)
  local age = math.floor(now - hit.stored)
  local parts, pos = { raw:sub(1, 2) }, 3
  for _, t in ipairs(hit.ttls) do
    if t.ttl ~= 0 then
      local v = math.max(0, t.ttl - age)
      parts[#parts + 1] = hit.answer:sub(pos, t.at)
      parts[#parts + 1] = string.char((v >> 24) & 255, (v >> 16) & 255, (v >> 8) & 255, v & 255)
      pos = t.at + 5
    end
  end
  parts[#parts + 1] = hit.answer:sub(pos)
  return table.concat(parts)
end

--- Counters: queries, denied, forwarded, answered, dropped, failed, cache_hits; pending,
--- cached.
function Forwarder:stats()
  local s = {}
  for k, v in pairs(self.stats_) do s[k] = v end
  s.pending, s.cached = self.pending, self.cached
  return s
end

--- Where the forwarder listens: host, port.
function Forwarder:address() return self.sock:address() end

--- Forgets cached answers (after the allow-list changed).
function Forwarder:flush()
  self.cache, self.cached = {}, 0
end

--- Stops serving and closes the socket. Idempotent.
function Forwarder:close()
  if self.closed then return end
  self.closed = true
  self.sock:close()
  if self.task and not self.task:done() then self.task:cancel() end
end
Forwarder.__close = Forwarder.close
Forwarder.__gc = Forwarder.close

return M
