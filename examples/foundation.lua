-- The runtime foundation at work: tasks on one loop, child processes, JSON and HTTP, for real.
--
--   build/bin/clawlua examples/foundation.lua          (or: lua5.4 with clawlua.so on LUA_CPATH)
--
-- It writes a few JSON documents into a scratch directory, serves them with python3's
-- http.server on 127.0.0.1, fetches them concurrently (one task each) while other tasks run
-- commands, checksums the bodies through sha256sum's stdin and prints a JSON summary.
local claw = require "clawlua"
local json, proc, http = claw.json, claw.proc, claw.http

local function check(ok, err)
  if not ok then error(err, 2) end
  return ok
end

local summary = claw.run(function()
  local t0 = claw.now()
  local dir = check(proc.run { "mktemp", "-d", "/tmp/clawlua-example.XXXXXX" }).stdout:gsub("%s+$", "")

  -- 1. Documents shaped like MCP tool listings.
  for i = 1, 8 do
    local doc = { id = i, tools = json.array {} }
    for k = 1, i do
      doc.tools[k] = { name = ("tool_%d_%d"):format(i, k), inputSchema = { type = "object" } }
    end
    local f = check(io.open(("%s/doc%d.json"):format(dir, i), "w"))
    f:write(check(json.encode(doc)))
    f:close()
  end

  -- 2. A real HTTP server as a child process; its handle kills it when this scope ends.
  local server <close> = check(proc.spawn { "python3", "-u", "-m", "http.server", "--bind", "127.0.0.1", "0",
                                            cwd = dir, stdout = "pipe", stderr = "null" })
  server.stdout:set_timeout(10)
  local banner = check(server.stdout:read_line())
  local port = check(banner:match("port (%d+)"), "unexpected banner: " .. banner)

  -- 3. Fetch every document concurrently, one task each.
  local fetches = {}
  for i = 1, 8 do
    fetches[i] = claw.spawn(function()
      local r = check(http.request { url = ("http://127.0.0.1:%s/doc%d.json"):format(port, i), timeout = 10 })
      assert(r.status == 200, "status " .. r.status)
      return r.body
    end)
  end

  -- 4. Meanwhile, other tasks run commands.
  local uname = claw.spawn(function() return check(proc.run { "uname", "-sr" }).stdout:gsub("%s+$", "") end)
  local slow = claw.spawn(function()
    local r = check(proc.run { "sleep", "10", timeout = 0.2 })
    return r.timed_out and r.signal_name
  end)

  -- 5. Decode what came back and checksum it through a pipe.
  local bodies, tools = {}, 0
  for i, t in ipairs(fetches) do
    bodies[i] = t:join()
    tools = tools + #check(json.decode(bodies[i])).tools
  end
  local sum = check(proc.run { "sha256sum", stdin = table.concat(bodies) }).stdout:match("^%x+")

  local result = {
    documents = #bodies,
    tools = tools,
    sha256 = sum,
    kernel = uname:join(),
    timeout_kill = slow:join(),
    server_port = tonumber(port),
    elapsed_s = math.floor((claw.now() - t0) * 1000) / 1000,
    loop = claw.loop.stats(),
  }
  check(proc.run { "rm", "-rf", dir })
  return result
end)

print(json.encode(summary, { pretty = true, sort_keys = true }))
