-- clawlua.sandbox.dns: the DNS message parser (strict bounds, hostile input) and the forwarder
-- on loopback against an upstream resolver played by the test (a clawlua.udp socket), so every
-- datagram the upstream receives is seen.
local claw = require "clawlua"
local dns = require "clawlua.sandbox.dns"
local H = require "helper"

local function be16(n) return string.char((n >> 8) & 255, n & 255) end
local function be32(n) return be16((n >> 16) & 0xFFFF) .. be16(n & 0xFFFF) end

local function name(s)
  local out = {}
  for l in s:gmatch("[^.]+") do out[#out + 1] = string.char(#l) .. l end
  return table.concat(out) .. "\0"
end

-- An answer to query (raw bytes) with records {name|ptr, type, ttl, rdata}.
local function answer(query, records, rcode)
  local qd = query:sub(13)
  local parts = { query:sub(1, 2), string.char(0x81, 0x80 | (rcode or 0)), be16(1), be16(#records),
                  be16(0), be16(0), qd }
  for _, r in ipairs(records) do
    parts[#parts + 1] = (r.ptr and be16(0xC000 | r.ptr) or name(r.name)) .. be16(r.type) .. be16(1)
      .. be32(r.ttl) .. be16(#r.rdata) .. r.rdata
  end
  return table.concat(parts)
end

describe("dns.parse", function()
  it("reads a query and an answer with compression, CNAME, A and AAAA", function()
    local qm = dns.query("Www.Example.COM", "A", 0x1234)
    local m = assert(dns.parse(qm))
    assert.are.equal(0x1234, m.id)
    assert.is_false(m.qr)
    assert.is_true(m.rd)
    assert.are.same({ { name = "www.example.com", type = 1, class = 1 } }, m.questions)
    local a = answer(qm, {
      { ptr = 12, type = 5, ttl = 300, rdata = name("cdn.example.net") },
      { name = "cdn.example.net", type = 1, ttl = 60, rdata = "\203\0\113\10" },
      { name = "cdn.example.net", type = 28, ttl = 0x80000001,
        rdata = "\32\1\13\184" .. ("\0"):rep(11) .. "\1" },
    })
    local r = assert(dns.parse(a))
    assert.is_true(r.qr)
    assert.are.equal(3, #r.answers)
    assert.are.equal("www.example.com", r.answers[1].name)
    assert.are.equal("cdn.example.net", r.answers[1].data)
    assert.are.equal("203.0.113.10", r.answers[2].data)
    assert.are.equal(60, r.answers[2].ttl)
    assert.are.equal("2001:db8::1", r.answers[3].data)
    assert.are.equal(0, r.answers[3].ttl) -- top bit set: zero (RFC 2181)
  end)

  it("refuses what is malformed, naming the reason and the byte", function()
    local q = dns.query("a.example", "A", 1)
    local cases = {
      { "", "shorter than its header" },
      { q:sub(1, 11), "shorter than its header" },
      { q:sub(1, -3), "truncated question" },
      { q .. "x", "trailing bytes" },
      { q:sub(1, 4) .. be16(2) .. q:sub(7), "more than one question" },
      { q:sub(1, 6) .. be16(65) .. q:sub(9), "more than 64 records" },
      -- a pointer to itself, and one pointing forward
      { q:sub(1, 12) .. be16(0xC00C) .. be16(1) .. be16(1), "does not point back" },
      { q:sub(1, 12) .. be16(0xC020) .. be16(1) .. be16(1) .. ("\0"):rep(30), "does not point back" },
      -- a pointer into the header (RD set: byte 2 reads as a label of one byte): a name that
      -- the empty reply's new header would change (found by fuzz_lua_dns)
      { q:sub(1, 12) .. be16(0xC002) .. be16(1) .. be16(1), "pointer into the header" },
      { q:sub(1, 12) .. "\64abc\0" .. be16(1) .. be16(1), "reserved label type" },
      { q:sub(1, 12) .. "\10abc", "label runs past the end" },
      { q:sub(1, 12) .. ("\63" .. ("a"):rep(63)):rep(5) .. "\0" .. be16(1) .. be16(1), "longer than 255" },
      { ("x"):rep(5000), "longer than 4096" },
    }
    for _, c in ipairs(cases) do
      local m, err = dns.parse(c[1])
      assert.is_nil(m, c[2])
      assert.matches(c[2], err, 1, true)
      assert.matches("at byte %d+$", err)
    end
    -- a record whose data overruns, an A of 5 bytes, a CNAME that does not fill its data
    local base = answer(q, { { name = "a.example", type = 1, ttl = 5, rdata = "\1\2\3\4" } })
    assert.matches("runs past the end", select(2, dns.parse(base:sub(1, -2))))
    assert.matches("A record of 5 bytes",
                   select(2, dns.parse(answer(q, { { name = "a.example", type = 1, ttl = 5, rdata = "\1\2\3\4\5" } }))))
    assert.matches("does not fill", select(2, dns.parse(answer(q, {
      { name = "a.example", type = 5, ttl = 5, rdata = name("b.example") .. "z" } }))))
  end)

  it("refuses a label holding a dot (fuzz_lua_dns: its text would read as another name)", function()
    local q = "\0\1\1\0\0\1\0\0\0\0\0\0" .. "\11example.com\0" .. "\0\1\0\1"
    local m, err = dns.parse(q)
    assert.is_nil(m)
    assert.matches("dns: label holds a dot at byte 12", err, 1, true)
  end)

  it("a chain of backward pointers is bounded", function()
    -- 40 names each a pointer to the previous one: valid pointers, but too many jumps
    local q = dns.query("a", "A", 1)
    local body, offs = {}, { 12 }
    local off = #q
    for i = 1, 40 do
      body[#body + 1] = be16(0xC000 | offs[i]) .. be16(99) .. be16(1) .. be32(1) .. be16(0)
      offs[i + 1] = off
      off = off + 12
    end
    local msg = q:sub(1, 6) .. be16(40) .. q:sub(9) .. table.concat(body)
    local m, err = dns.parse(msg)
    assert.is_nil(m)
    assert.matches("too many compression pointers", err, 1, true)
    -- 16 of them are fine
    local ok16 = q:sub(1, 6) .. be16(16) .. q:sub(9) .. table.concat(body, "", 1, 16)
    assert.are.equal(16, #assert(dns.parse(ok16)).answers)
  end)

  it("never raises on random or mutated input", function()
    math.randomseed(11)
    local q = dns.query("www.example.com", "AAAA", 7)
    local a = answer(q, { { ptr = 12, type = 28, ttl = 5, rdata = ("\1"):rep(16) },
                          { ptr = 12, type = 5, ttl = 5, rdata = be16(0xC00C) } })
    local n = 0
    for i = 1, 20000 do
      local msg
      if i % 2 == 0 then
        local t = {}
        for j = 1, math.random(0, 80) do t[j] = string.char(math.random(0, 255)) end
        msg = table.concat(t)
      else
        local b = { a:byte(1, -1) }
        for _ = 1, math.random(1, 4) do b[math.random(1, #b)] = math.random(0, 255) end
        msg = string.char(table.unpack(b))
      end
      local ok, m, err = pcall(dns.parse, msg)
      assert(ok, m)
      assert(m or err:match("^dns: "), "no reason")
      if m then n = n + 1 end
    end
    assert.is_true(n > 0)
  end)

  it("matches names and wildcards; checks host names", function()
    assert.is_true(dns.match("PyPI.org", "pypi.org"))
    assert.is_false(dns.match("evil-pypi.org", "pypi.org"))
    assert.is_true(dns.match("a.b.example.com", "*.example.com"))
    assert.is_false(dns.match("example.com", "*.example.com"))
    assert.is_false(dns.match("badexample.com", "*.example.com"))
    assert.are.equal("pypi.org", dns.check_name("PyPI.org."))
    assert.is_nil(dns.check_name("a..b"))
    assert.is_nil(dns.check_name("-a.b"))
    assert.is_nil(dns.check_name("1.2.3.4"))
    assert.is_nil(dns.check_name(("a"):rep(64) .. ".com"))
  end)
end)

describe("dns forwarder", function()
  local up, up_port, seen, fwd, fport, pins, client
  local zone = {
    ["ok.test"] = { { ptr = 12, type = 1, ttl = 120, rdata = "\198\51\100\7" } },
    ["slow.test"] = "silent",
  }

  before_each(function()
    seen, pins = {}, {}
    up = assert(claw.udp.open { host = "127.0.0.1" })
    up_port = select(2, up:address())
    local server = claw.spawn(function()
      while true do
        local msg, host, port = up:recv()
        if not msg then return end
        local m = assert(dns.parse(msg))
        seen[#seen + 1] = m.questions[1].name
        local z = zone[m.questions[1].name]
        if z ~= "silent" then
          -- first a forged answer with a wrong id, then the real one
          local forged = { { ptr = 12, type = 1, ttl = 9, rdata = "\6\6\6\6" } }
          up:send(answer(be16((m.id + 1) % 65536) .. msg:sub(3), forged), host, port)
          up:send(answer(msg, z or {}, z and 0 or 3), host, port)
        end
      end
    end)
    server:set_daemon(true)
    fwd = assert(dns.start {
      host = "127.0.0.1", port = 0, upstreams = { "127.0.0.1:" .. up_port }, sandbox = "dns-test",
      timeout = 0.3, max_pending = 4, cache_size = 2,
      allowed = function(n) return n == "ok.test" or n == "slow.test" or n == "gone.test" end,
      pin = function(n, addrs)
        pins[#pins + 1] = { name = n, addrs = addrs, at = claw.now() }
        return true
      end,
    })
    fport = select(2, fwd:address())
    client = assert(claw.udp.open { host = "127.0.0.1" })
  end)

  after_each(function()
    fwd:close()
    fwd:close()
    up:close()
    client:close()
  end)

  local function ask(n, qtype, id)
    assert(client:send(dns.query(n, qtype or "A", id or 77), "127.0.0.1", fport))
    local msg = client:recv(3)
    return msg and assert(dns.parse(msg)), msg
  end

  it("forwards an allowed name, pins its addresses before answering, caches the answer", function()
    local m = ask("ok.test", "A", 4242)
    assert.are.equal(4242, m.id)
    assert.are.equal(0, m.rcode)
    assert.are.equal("198.51.100.7", m.answers[1].data)
    assert.are.same({ "ok.test" }, seen)
    assert.are.equal(1, #pins)
    assert.are.same({ { addr = "198.51.100.7", ttl = 120 } }, pins[1].addrs)
    -- again: from the cache, same answer, new id, the upstream not asked
    local again = ask("ok.test", "A", 99)
    assert.are.equal(99, again.id)
    assert.are.equal("198.51.100.7", again.answers[1].data)
    assert.is_true(again.answers[1].ttl <= 120)
    assert.are.same({ "ok.test" }, seen)
    assert.are.equal(1, fwd:stats().cache_hits)
  end)

  it("answers NXDOMAIN for names off the list without asking upstream, and audits it", function()
    local seq = claw.audit.emit("test.mark", {})
    local m = ask("exfil-aGVsbG8.evil.test", "TXT")
    assert.are.equal(3, m.rcode)
    assert.are.equal(0, #m.answers)
    assert.are.same({}, seen)
    assert.are.same({}, pins)
    local found
    for ev in claw.audit.query { kind = "dns.deny", sandbox = "dns-test", after_seq = seq } do
      found = ev.detail.name
    end
    assert.are.equal("exfil-agvsbg8.evil.test", found)
  end)

  it("SERVFAIL when the upstream is silent; NXDOMAIN from upstream passes through", function()
    local m = ask("slow.test")
    assert.are.equal(2, m.rcode)
    local g = ask("gone.test")
    assert.are.equal(3, g.rcode)
    assert.are.same({}, pins)
  end)

  it("drops oversized and malformed queries, and bounds queries in flight", function()
    assert(client:send(("\0"):rep(600), "127.0.0.1", fport))
    assert(client:send("\1\2\3", "127.0.0.1", fport))
    assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { client:recv(0.3) })
    -- 10 queries for a silent name: at most 4 are forwarded at once, the rest dropped
    for i = 1, 10 do client:send(dns.query("slow.test", "A", i), "127.0.0.1", fport) end
    claw.sleep(0.1)
    assert.is_true(#seen <= 4)
    assert.is_true(fwd:stats().dropped >= 6)
    local answers = 0
    while client:recv(1) do answers = answers + 1 end
    assert.is_true(answers <= 4)
    assert.is_true(H.eventually(function() return fwd:stats().pending == 0 end, 3))
  end)
end)

describe("claw.udp", function()
  it("sends and receives datagrams on the loop, with timeouts, bounds and closing", function()
    local a <close> = assert(claw.udp.open { host = "127.0.0.1" })
    local b <close> = assert(claw.udp.open { host = "127.0.0.1" })
    local host, port = a:address()
    assert.are.equal("127.0.0.1", host)
    -- a receiver waiting in a task is woken by the datagram
    local t = claw.spawn(function() return a:recv(5) end)
    claw.sleep(0.02)
    -- the largest UDP payload over IPv4 (65535 less the IP and UDP headers)
    assert.is_true(b:send(("x"):rep(65507), host, port))
    local data, from, fport = t:join()
    assert.are.equal(65507, #data)
    assert.matches("Message too long", (select(2, b:send(("x"):rep(65508), host, port))))
    assert.are.same({ "127.0.0.1", select(2, b:address()) }, { from, fport })
    assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { a:recv(0) })
    assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { a:recv(0.05) })
    assert.has_error(function() b:send(("x"):rep(65536), host, port) end)
    assert.has_error(function() b:send("x", "not-an-address", port) end)
    assert.has_error(function() claw.udp.open { host = "nope" } end,
                     "bad field 'host' (an IPv4 or IPv6 address expected)")
    assert.has_error(function() claw.udp.open { prot = 1 } end)
    local _, err = b:send("x", "::1", port)
    assert.matches("another address family", err)
    -- a port in use
    local c, berr = claw.udp.open { host = "127.0.0.1", port = port }
    assert.is_nil(c)
    assert.matches("udp bind 127.0.0.1:%d+: Address already in use", berr)
    a:close()
    a:close()
    assert.is_true(a:is_closed())
    assert.has_error(function() a:recv(0) end, "attempt to use a closed udp socket")
  end)
end)
