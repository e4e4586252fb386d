-- clawlua.llm.sse: the incremental server-sent-events parser.
local sse = require "clawlua.llm.sse"

local function parse(chunks, opts)
  local evs = {}
  opts = opts or {}
  opts.on_event = function(ev) evs[#evs + 1] = { event = ev.event, data = ev.data, id = ev.id, retry = ev.retry } end
  local p = sse.new(opts)
  for _, c in ipairs(chunks) do
    local ok, err = p:feed(c)
    if not ok then return evs, err end
  end
  local ok, err = p:finish()
  return evs, (not ok) and err or nil
end

describe("sse parser", function()
  -- fuzz_lua_sse findings (against the WHATWG event-stream reading)
  it("skips a UTF-8 BOM at the start of the stream, even split across chunks", function()
    local evs = parse({ "\239\187\191data: x\n\n" })
    assert.are.same({ { event = "message", data = "x" } }, evs)
    evs = parse({ "\239", "\187", "\191data: y\n\n\239\187\191data: z\n\n" })
    assert.equal("y", evs[1].data)
    assert.equal(1, #evs) -- only the first BOM is skipped: the second starts an unknown field
  end)

  it("an empty event field means message", function()
    local evs = parse({ "event:\ndata: a\n\nevent: \ndata: b\n\n" })
    assert.are.same({ { event = "message", data = "a" }, { event = "message", data = "b" } }, evs)
    evs = parse({ "event:\r\ndata: c\r\n\r\n" })
    assert.equal("message", evs[1].event)
  end)

  it("parses events with LF, CRLF and CR line ends, comments and fields", function()
    for _, nl in ipairs { "\n", "\r\n", "\r" } do
      local text = (": a comment\nevent: add\nid: 7\nretry: 1500\ndata: one\ndata:two\n\n" ..
                    "data: {\"x\":1}\n\n"):gsub("\n", nl)
      local evs, err = parse { text }
      assert.is_nil(err)
      assert.are.same({ event = "add", data = "one\ntwo", id = "7", retry = 1500 }, evs[1])
      assert.are.same({ event = "message", data = "{\"x\":1}", id = "7", retry = 1500 }, evs[2])
      assert.are.equal(2, #evs)
    end
  end)

  it("gives the same events whatever the chunking, CRLF split across chunks included", function()
    local text = "event: a\r\ndata: hello world\r\n\r\nevent: b\rdata: x\r\rdata: last\n\n"
    local whole = parse { text }
    assert.are.equal(3, #whole)
    for size = 1, 7 do
      local chunks = {}
      for i = 1, #text, size do chunks[#chunks + 1] = text:sub(i, i + size - 1) end
      local evs, err = parse(chunks)
      assert.is_nil(err)
      assert.are.same(whole, evs)
    end
  end)

  it("ignores unknown fields, a bad retry, and events without data", function()
    local evs = parse { "foo: bar\nretry: soon\nevent: empty\n\ndata\n\n" }
    assert.are.equal(1, #evs)
    assert.are.equal("", evs[1].data) -- a bare 'data' line is an empty data line
    assert.are.equal("message", evs[1].event) -- the event type ended with the empty event
    assert.is_nil(evs[1].retry)
  end)

  it("reports a stream cut in the middle of an event", function()
    local evs, err = parse { "data: one\n\ndata: {\"partial\":" }
    assert.are.equal(1, #evs)
    assert.are.equal("sse: stream ended in the middle of an event", err)
    evs, err = parse { "data: one\n\nevent: x\n" }
    assert.are.equal(1, #evs)
    assert.matches("middle of an event", err)
  end)

  it("bounds lines and events", function()
    local _, err = parse({ "data: " .. ("x"):rep(100) }, { max_line = 64 })
    assert.are.equal("sse: line longer than 64 bytes", err)
    _, err = parse({ ("data: 0123456789\n"):rep(20) .. "\n" }, { max_event = 100 })
    assert.are.equal("sse: event larger than 100 bytes", err)
    -- a long line delivered in small chunks is caught too, before it grows without bound
    local p = sse.new { on_event = function() end, max_line = 64 }
    local ok, e
    for _ = 1, 100 do
      ok, e = p:feed("xxxxxxxx")
      if not ok then break end
    end
    assert.is_nil(ok)
    assert.matches("line longer than 64", e)
    assert.are.same({ nil, e }, { p:feed("\n") }) -- stays failed
  end)

  it("stops when on_event returns false, and rejects a missing callback", function()
    local n = 0
    local p = sse.new { on_event = function() n = n + 1 return false end }
    assert.are.same({ nil, "stopped" }, { p:feed("data: a\n\ndata: b\n\n") })
    assert.are.equal(1, n)
    assert.has_error(function() sse.new {} end, "bad field 'on_event' (function expected, got nil)")
  end)
end)
