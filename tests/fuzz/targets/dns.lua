-- fuzz: seeds=dns dict=firewall_dns
-- fuzz_lua_dns: the DNS forwarder's packet parser (lua/clawlua/sandbox/dns.lua). parse() must
-- return a message or nil + "dns: <reason> at byte N" for any bytes, as an answer (4096-byte cap)
-- and as a query (512); a parsed message keeps the header's counts, names of at most 253 bytes
-- whose labels hold no dot (a name's text must mean one name: the allow-list matches on it),
-- A/AAAA data as address text, TTLs below 2^31 at the offset they were read from. A message
-- rebuilt from the parse without compression parses back to the same records, and the
-- forwarder's empty reply to a query parses as an answer to that query.
local dns = require "clawlua.sandbox.dns"

local function be16(n) return string.char((n >> 8) & 255, n & 255) end
local function be32(n) return be16(n >> 16) .. be16(n & 0xFFFF) end

local function wire_name(name)
  if name == "" then return "\0" end
  local out = {}
  for label in (name .. "."):gmatch("([^.]*)%.") do out[#out + 1] = string.char(#label) .. label end
  return table.concat(out) .. "\0"
end

local function ip4_bytes(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  assert(a, "A data is not an IPv4 address: " .. s)
  for _, x in ipairs { a, b, c, d } do assert(tonumber(x) < 256, "A data out of range: " .. s) end
  return string.char(tonumber(a), tonumber(b), tonumber(c), tonumber(d))
end

local function ip6_bytes(s)
  assert(s:match("^[%x:]+$") and #s <= 39, "AAAA data is not an IPv6 address: " .. s)
  local head, tail = s:match("^(.-)::(.*)$")
  local words = {}
  local function add(part)
    local t = {}
    for w in part:gmatch("[^:]+") do
      assert(#w <= 4 and not (#w > 1 and w:sub(1, 1) == "0"), "AAAA word not canonical: " .. s)
      t[#t + 1] = tonumber(w, 16)
    end
    return t
  end
  if head then
    local h, t = add(head), add(tail)
    assert(#h + #t <= 6, "AAAA '::' stands for fewer than two words: " .. s)
    for _, w in ipairs(h) do words[#words + 1] = w end
    for _ = 1, 8 - #h - #t do words[#words + 1] = 0 end
    for _, w in ipairs(t) do words[#words + 1] = w end
  else
    words = add(s)
  end
  assert(#words == 8, "AAAA data of " .. #words .. " words: " .. s)
  local out = {}
  for i, w in ipairs(words) do out[i] = be16(w) end
  return table.concat(out)
end

local function check_name(name)
  assert(type(name) == "string" and #name <= 253, "name over 253 bytes")
  if name == "" then return end
  for label in (name .. "."):gmatch("([^.]*)%.") do
    assert(#label >= 1 and #label <= 63, ("name %q has an empty or long label"):format(name))
    assert(label == label:lower(), "name not in lower case: " .. name)
  end
end

local function rebuild(m)
  local flags = (m.qr and 0x8000 or 0) | (m.opcode << 11) | (m.aa and 0x400 or 0) |
    (m.tc and 0x200 or 0) | (m.rd and 0x100 or 0) | (m.ra and 0x80 or 0) | m.rcode
  local out = { be16(m.id), be16(flags), be16(#m.questions), be16(#m.answers),
                be16(#m.authority), be16(#m.additional) }
  for _, q in ipairs(m.questions) do out[#out + 1] = wire_name(q.name) .. be16(q.type) .. be16(q.class) end
  for _, sec in ipairs { m.answers, m.authority, m.additional } do
    for _, rr in ipairs(sec) do
      local rdata = rr.data
      if rr.type == 1 and rr.class == 1 then rdata = ip4_bytes(rr.data)
      elseif rr.type == 28 and rr.class == 1 then rdata = ip6_bytes(rr.data)
      elseif rr.type == 5 then rdata = wire_name(rr.data)
      end
      out[#out + 1] = wire_name(rr.name) .. be16(rr.type) .. be16(rr.class) .. be32(rr.ttl) ..
        be16(#rdata) .. rdata
    end
  end
  return table.concat(out)
end

local function check(msg, max)
  local m, err = dns.parse(msg, max)
  if not m then
    assert(type(err) == "string" and err:match("^dns: .+ at byte %d+$"), err)
    return nil
  end
  assert(#msg <= max and #msg >= 12, "a message of a size parse should refuse")
  local u16 = function(o) return msg:byte(o + 1) * 256 + msg:byte(o + 2) end
  assert(m.id == u16(0), "id")
  assert(#m.questions == u16(4) and #m.answers == u16(6) and #m.authority == u16(8)
    and #m.additional == u16(10), "record counts differ from the header")
  for _, q in ipairs(m.questions) do check_name(q.name) end
  for _, sec in ipairs { m.answers, m.authority, m.additional } do
    for _, rr in ipairs(sec) do
      check_name(rr.name)
      assert(rr.ttl >= 0 and rr.ttl < 0x80000000, "TTL out of range")
      local raw = u16(rr.ttl_at) * 65536 + u16(rr.ttl_at + 2)
      assert(raw == rr.ttl or (raw >= 0x80000000 and rr.ttl == 0), "ttl_at does not point at the TTL")
      if rr.type == 5 then check_name(rr.data) end
    end
  end
  local again = assert(dns.parse(rebuild(m), 1 << 20), "the rebuilt message does not parse")
  assert(rebuild(again) == rebuild(m), "the rebuilt message parses to other records")
  return m
end

return function(data)
  check(data, dns.MAX_RESPONSE)
  local q = check(data, dns.MAX_QUERY)
  if q and not q.qr then
    for _, rcode in ipairs { 1, 2, 3, 4 } do
      local reply = dns.reply_empty(data, q, rcode)
      local r = assert(dns.parse(reply), "the empty reply does not parse")
      assert(r.qr and r.rcode == rcode and r.id == q.id and #r.answers == 0, "the empty reply is wrong")
      assert(#r.questions == #q.questions, "the empty reply lost the question")
      if q.questions[1] then
        assert(r.questions[1].name == q.questions[1].name and r.questions[1].type == q.questions[1].type,
          "the empty reply echoes another question")
      end
    end
  end
end
