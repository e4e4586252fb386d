-- Bad input and failure paths leave nothing behind: many cycles of spawn/kill, HTTP requests
-- that succeed, time out, are cancelled or whose callback raises, and a callback that raises
-- in a task; the fd and child counts return to their starting values.
local claw = require "clawlua"
local H = require "helper"

describe("resource accounting", function()
  local srv
  setup(function() srv = H.httpd() end)
  teardown(function() srv.close() end)

  it("returns to the starting fd and child counts after mixed failure cycles", function()
    -- keepalive = false keeps curl's cache of idle connections empty, so the count is exact
    local function get(opts)
      opts.keepalive = false
      return claw.http.request(opts)
    end
    -- the first request creates curl's multi handle (and its wake-up socket pair) for good
    assert(get { url = srv.url("/json") })
    H.settle()
    local fds, kids = H.fds(), H.children()
    for i = 1, 40 do
      local p = assert(claw.proc.spawn { "sleep", "30", stdout = "pipe", stderr = "pipe" })
      if i % 2 == 0 then p:kill("KILL"); p:wait() end
      p:close()
      local t = claw.spawn(function()
        return get { url = srv.url("/slow?ms=300") }
      end)
      claw.sleep(0.002)
      t:cancel()
      t:join()
      assert.is_nil((get { url = srv.url("/hang"), timeout = 0.02 }))
      assert(get { url = srv.url("/json") })
      local ok, err = pcall(get, { url = srv.url("/sse?n=20&ms=5"),
        on_chunk = function() error("callback exploded") end })
      assert.is_false(ok)
      assert.matches("callback exploded", err)
      local bad = claw.spawn(function() error("task callback raised") end)
      assert.has_error(function() bad:join() end)
      assert.is_nil((claw.proc.spawn { "/nonexistent" }))
    end
    assert.is_true(H.eventually(function()
      H.settle()
      return H.fds() == fds and H.children() == kids
    end, 10 * H.scale), ("fds %d -> %d, children %d -> %d"):format(fds, H.fds(), kids, H.children()))
  end)
end)
