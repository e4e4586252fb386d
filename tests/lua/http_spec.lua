-- clawlua.http against a real local server (tests/integration/httpd.py on 127.0.0.1).
local claw = require "clawlua"
local json = require "clawlua.json"
local http = claw.http
local H = require "helper"

describe("http.request", function()
  local srv
  setup(function() srv = H.httpd() end)
  teardown(function() srv.close() end)

  it("GETs a document with status, headers and body", function()
    local r = assert(http.request { url = srv.url("/json") })
    assert.are.equal(200, r.status)
    assert.are.equal("application/json", r.headers["content-type"])
    assert.are.equal("one, two", r.headers["x-test"]) -- repeated headers are joined
    assert.are.same({ ok = true, items = { 1, 2, 3 } }, json.decode(r.body))
  end)

  it("POSTs a body with headers, and sends other methods", function()
    local r = assert(http.request { url = srv.url("/echo"), body = '{"x":1}',
                                    headers = { ["Content-Type"] = "application/json", "X-Extra: yes" } })
    local doc = json.decode(r.body)
    assert.are.equal("POST", doc.method)
    assert.are.equal('{"x":1}', doc.body)
    assert.are.equal("application/json", doc.headers["content-type"])
    assert.are.equal("yes", doc.headers["x-extra"])
    r = assert(http.request { url = srv.url("/echo"), method = "PUT", body = "p" })
    assert.are.equal("PUT", json.decode(r.body).method)
    r = assert(http.request { url = srv.url("/echo"), method = "DELETE" })
    assert.are.equal("DELETE", json.decode(r.body).method)
  end)

  it("returns HTTP error statuses as responses, not failures", function()
    assert.are.equal(503, assert(http.request { url = srv.url("/status/503") }).status)
    assert.are.equal(404, assert(http.request { url = srv.url("/nothing") }).status)
  end)

  it("follows redirects only when asked", function()
    assert.are.equal(302, assert(http.request { url = srv.url("/redirect") }).status)
    local r = assert(http.request { url = srv.url("/redirect"), follow = true })
    assert.are.equal(200, r.status)
    assert.are.equal(srv.url("/json"), r.url)
  end)

  it("times out on a server that never answers", function()
    local t0 = claw.now()
    local r, err, code = http.request { url = srv.url("/hang"), timeout = 0.3 }
    assert.is_nil(r)
    assert.are.equal("timeout", err)
    assert.are.equal("ETIMEDOUT", code)
    assert.is_true(claw.now() - t0 < 3 * H.scale)
  end)

  it("reports connection failures", function()
    local r, err = http.request { url = "http://127.0.0.1:1/", timeout = 5 }
    assert.is_nil(r)
    assert.matches("^http: .*127%.0%.0%.1", err)
  end)

  it("caps the response body", function()
    local r, err = http.request { url = srv.url("/bytes?n=100000"), max_body = 1000 }
    assert.is_nil(r)
    assert.matches("larger than 1000 bytes", err)
    r = assert(http.request { url = srv.url("/bytes?n=100000") })
    assert.are.equal(100000, #r.body)
  end)

  it("streams chunks to a callback as they arrive (server-sent events)", function()
    local chunks, times = {}, {}
    local r = assert(http.request { url = srv.url("/sse?n=5&ms=40"), on_chunk = function(c)
      chunks[#chunks + 1] = c
      times[#times + 1] = claw.now()
      claw.sleep(0) -- the callback runs in the task and may wait
    end })
    assert.are.equal(200, r.status)
    assert.is_nil(r.body)
    local all = table.concat(chunks)
    local n = 0
    for _ in all:gmatch("event: tick\ndata: %d\n\n") do n = n + 1 end
    assert.are.equal(5, n)
    assert.is_true(#chunks >= 3, "expected incremental delivery, got " .. #chunks .. " chunk(s)")
    assert.is_true(times[#times] - times[1] > 0.08)
  end)

  it("stops a stream when the callback returns false", function()
    local r, err = http.request { url = srv.url("/sse?n=50&ms=20"), on_chunk = function() return false end }
    assert.is_nil(r)
    assert.matches("stopped by on_chunk", err)
  end)

  it("runs many requests in flight from different tasks", function()
    local tasks = {}
    local t0 = claw.now()
    for i = 1, 32 do
      tasks[i] = claw.spawn(function()
        return assert(http.request { url = srv.url("/slow?ms=200") }).status
      end)
    end
    for _, t in ipairs(tasks) do assert.are.equal(200, t:join()) end
    -- 32 x 200 ms sequentially would be 6.4 s
    assert.is_true(claw.now() - t0 < 3 * H.scale, "requests did not overlap")
  end)

  it("cancelling a task aborts its transfer at once", function()
    local t = claw.spawn(function() return http.request { url = srv.url("/hang") } end)
    claw.sleep(0.1)
    t:cancel()
    assert.are.same({ nil, "cancelled" }, { t:join() })
  end)

  it("rejects bad options", function()
    assert.has_error(function() http.request { } end, "bad field 'url' (missing)")
    assert.has_error(function() http.request { url = "x", bogus = 1 } end, "bad field 'bogus' (unknown field)")
    assert.has_error(function() http.request { url = "x", method = "get" } end,
      "bad field 'method' (upper-case token expected)")
    assert.has_error(function() http.request { url = "x", headers = { A = "b\r\nEvil: 1" } } end,
      "bad field 'headers' (line breaks in a header)")
    assert.has_error(function() http.request { url = "x", timeout = "1" } end,
      "bad field 'timeout' (number expected, got string)")
  end)

  it("keeps fds flat over many requests, failures and cancellations", function()
    http.request { url = srv.url("/json") } -- warm the connection cache
    H.settle()
    local fds = H.fds()
    for i = 1, 60 do
      if i % 3 == 0 then
        local t = claw.spawn(function() return http.request { url = srv.url("/slow?ms=500") } end)
        claw.sleep(0.005)
        t:cancel()
        t:join()
      elseif i % 3 == 1 then
        http.request { url = srv.url("/hang"), timeout = 0.05 }
      else
        assert(http.request { url = srv.url("/json") })
      end
    end
    H.settle()
    -- curl keeps a bounded cache of idle connections; it must not grow with the request count
    assert.is_true(H.fds() <= fds + 5, ("fds grew from %d to %d"):format(fds, H.fds()))
  end)
end)

describe("http over a Unix socket", function()
  it("talks HTTP to a server on a socket path", function()
    local dir = H.tmpdir()
    local srv = H.httpd(dir .. "/api.sock")
    local r = assert(http.request { url = "http://localhost/json", unix_socket = dir .. "/api.sock" })
    assert.are.equal(200, r.status)
    assert.is_true(json.decode(r.body).ok)
    srv.close()
    H.rm_rf(dir)
  end)
end)
