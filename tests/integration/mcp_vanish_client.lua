-- An MCP client that vanishes mid-call (mcp_vanish_spec): starts `clawlua mcp` on pipes (no
-- parent-death signal, as a client written in any other language would), initializes, creates a
-- sandbox, sends a sandbox_exec of `sleep SLEEP` and waits until that command runs. Then, by
-- mode: "eof" closes the server's stdin (its stdout still read), "close" closes stdin and
-- stdout; both wait for the server's exit and print {op="exit", status=, after=seconds}.
-- "kill": prints {op="ready", pid=server pid} and hangs until the test SIGKILLs this client.
-- usage: clawlua mcp_vanish_client.lua CLAWLUA_BIN MODE SLEEP
local claw = require "clawlua"
local json = require "clawlua.json"

local bin, mode, sleep_s = arg[1], arg[2], arg[3]

local function out(t)
  io.stdout:write(json.encode(t), "\n")
  io.stdout:flush()
end

claw.run(function()
  local p = assert(claw.proc.spawn { bin, "mcp", stdin = "pipe", stdout = "pipe", stderr = "inherit",
                                     pdeathsig = false })
  p.stdout:set_timeout(30)
  local function request(id, method, params)
    p.stdin:write(json.encode { jsonrpc = "2.0", id = id, method = method, params = params } .. "\n")
    while true do
      local m = json.decode((assert(p.stdout:read_line(), "the server closed stdout")))
      if m.id == id then return m end
    end
  end
  request(1, "initialize", { protocolVersion = "2025-11-25", capabilities = {},
                              clientInfo = { name = "vanish", version = "1" } })
  p.stdin:write('{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
  local r = request(2, "tools/call", { name = "sandbox_create", arguments = {} })
  local id = assert(r.result and r.result.structuredContent.id, json.encode(r))
  p.stdin:write(json.encode { jsonrpc = "2.0", id = 3, method = "tools/call",
    params = { name = "sandbox_exec", arguments = { id = id, command = { "sleep", sleep_s } } } } .. "\n")
  local deadline = claw.now() + 20
  while claw.proc.run { "pgrep", "-f", "^sleep " .. sleep_s .. "$" }.code ~= 0 do
    assert(claw.now() < deadline, "the command did not start")
    claw.sleep(0.01)
  end
  if mode == "kill" then
    out { op = "ready", pid = p:pid(), sandbox = id }
    claw.sleep(3600)
  end
  local t0 = claw.now()
  p.stdin:close()
  if mode == "close" then
    p.stdout:close()
  else
    claw.spawn(function() while p.stdout:read_line() do end end):set_daemon(true)
  end
  local st = p:wait(10)
  out { op = "exit", status = st or "timeout", after = claw.now() - t0, sandbox = id }
  if st then p:close() end
end)
