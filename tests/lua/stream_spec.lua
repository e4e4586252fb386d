-- clawlua.stream: buffered, bounded reads and writes on non-blocking fds.
local claw = require "clawlua"
local H = require "helper"
local stream = claw.stream

describe("streams", function()
  it("read lines, strip CR LF, and return the last line without a newline", function()
    local r, w = stream.pipe()
    w:write("one\r\ntwo\n", "three")
    w:close()
    assert.are.same({ "one", "two", "three" }, (function()
      local t = {}
      for line in r:lines() do t[#t + 1] = line end
      return t
    end)())
    assert.is_nil(r:read_line())
    r:close()
  end)

  it("lines() yields inside a task instead of running a nested loop", function()
    local r, w = stream.pipe()
    local depth_seen = 0
    local reader = claw.spawn(function()
      local n = 0
      for _ in r:lines() do n = n + 1 end
      return n
    end)
    local writer = claw.spawn(function()
      for i = 1, 5 do
        depth_seen = math.max(depth_seen, claw.loop.stats().depth)
        w:write("line " .. i .. "\n")
        claw.sleep(0.005)
      end
      w:close()
    end)
    writer:join()
    assert.are.equal(5, reader:join())
    -- the main chunk's join runs the loop at depth 1; a reader running a nested loop of its
    -- own would show up as depth 2 inside the writer
    assert.are.equal(1, depth_seen)
    r:close()
  end)

  it("skip a line longer than the cap, report it, and carry on", function()
    local r, w = stream.pipe()
    local writer = claw.spawn(function()
      w:write(string.rep("x", 300000) .. "\nnext\n")
      w:close()
    end)
    local line, err, code = r:read_line(1000)
    assert.is_nil(line)
    assert.matches("line longer than 1000 bytes", err)
    assert.are.equal("E2BIG", code)
    assert.are.equal("next", r:read_line(1000))
    writer:join()
    r:close()
  end)

  it("read_all stops at its cap", function()
    local r, w = stream.pipe()
    local writer = claw.spawn(function() w:write(string.rep("y", 200000)); w:close() end)
    local data, err = r:read_all(1000)
    assert.is_nil(data)
    assert.matches("more than 1000 bytes", err)
    r:close() -- the writer gets EPIPE instead of waiting for a reader forever
    writer:join()
  end)

  it("write waits for a slow reader instead of blocking the loop", function()
    local r, w = stream.pipe()
    local big = string.rep("z", 1 << 20) -- larger than the pipe buffer
    local ticks = 0
    local ticker = claw.spawn(function() for _ = 1, 3 do claw.sleep(0.005); ticks = ticks + 1 end end)
    local writer = claw.spawn(function() return w:write(big) end)
    claw.sleep(0.05)
    assert.is_false(writer:done())
    assert.are.equal(3, ticks)
    local got = {}
    local n = 0
    while n < #big do
      local c = assert(r:read())
      got[#got + 1] = c
      n = n + #c
    end
    assert.is_true(writer:join())
    assert.are.equal(big, table.concat(got))
    ticker:join()
    r:close()
    w:close()
  end)

  it("time out per operation", function()
    local r, w = stream.pipe()
    r:set_timeout(0.02)
    local v, err, code = r:read()
    assert.is_nil(v)
    assert.are.equal("timeout", err)
    assert.are.equal("ETIMEDOUT", code)
    r:close()
    w:close()
  end)

  it("report EPIPE when the reader is gone", function()
    local r, w = stream.pipe()
    r:close()
    local ok, err, code = w:write("x")
    assert.is_nil(ok)
    assert.are.equal("write: Broken pipe", err)
    assert.are.equal("EPIPE", code)
    w:close()
  end)

  it("raise on use after close; close twice is fine", function()
    local r, w = stream.pipe()
    r:close()
    assert.is_true(r:close())
    assert.is_true(r:is_closed())
    assert.has_error(function() r:read() end, "attempt to use a closed stream")
    w:close()
  end)

  it("wake a pending reader when closed", function()
    local r, w = stream.pipe()
    local t = claw.spawn(function() return r:read() end)
    claw.sleep(0.01)
    r:close()
    local v, err = t:join()
    assert.is_nil(v)
    assert.matches("stream closed", err)
    w:close()
  end)

  it("connect to Unix sockets, and fail clearly when nobody listens", function()
    local dir = H.tmpdir()
    local srv = H.httpd(dir .. "/s.sock")
    local s = assert(stream.connect_unix(dir .. "/s.sock", 2))
    assert(s:write("GET /json HTTP/1.0\r\nHost: x\r\n\r\n"))
    assert.matches("^HTTP/1%.[01] 200", s:read_line())
    s:close()
    srv.close()
    local v, err = stream.connect_unix(dir .. "/nobody.sock")
    assert.is_nil(v)
    assert.are.equal("connect " .. dir .. "/nobody.sock: No such file or directory", err)
    v, err = stream.connect_unix(string.rep("a", 200))
    assert.is_nil(v)
    assert.matches("path longer than 107 bytes", err)
    H.rm_rf(dir)
  end)

  it("wrap existing fds without taking ownership, restoring their flags", function()
    local function flags(fd)
      local info = H.read_file("/proc/self/fdinfo/" .. fd)
      return tonumber(info:match("flags:%s*(%d+)"), 8)
    end
    local O_NONBLOCK = 2048
    local r, w = stream.pipe()
    local fd = w:fileno()
    -- a second, borrowing stream on the pipe's write end, which w watches already
    local borrowed = assert(stream.fdopen(fd, "w", { name = "borrowed" }))
    assert.is_true(borrowed:write("via borrowed\n"))
    borrowed:close()
    assert.are.equal("via borrowed", r:read_line())
    assert(w:write("still open\n")) -- the borrowed stream did not close the fd
    assert.are.equal("still open", r:read_line())
    r:close()
    w:close()
    local before = flags(1) & O_NONBLOCK
    local out = assert(stream.fdopen(1, "w"))
    assert.are.equal(O_NONBLOCK, flags(1) & O_NONBLOCK)
    out:close()
    assert.are.equal(before, flags(1) & O_NONBLOCK)
    assert.has_error(function() stream.fdopen(0, "x") end)
    local v, err = stream.fdopen(987, "r")
    assert.is_nil(v)
    assert.are.equal("fdopen: Bad file descriptor", err)
  end)
end)
