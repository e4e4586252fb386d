-- `clawlua mcp` driven by the official TypeScript SDK client (@modelcontextprotocol/sdk from
-- npm, installed by this spec into <build>/npm/mcp; tests/integration/mcp/sdk_client.mjs is
-- the driver). The full run (a real sandbox: exec, files, progress, cancellation, audit,
-- destroy) needs root and the clawlua.sandbox module.
local claw = require "clawlua"
local H = require "helper"

local npm_dir = (H.bin:match("^(.*)/bin/[^/]*$") or "build") .. "/npm/mcp"

--- Installs the SDK (once; cached in the build directory). Returns true or nil, why.
local function install()
  local r = claw.proc.run { "sh", H.src .. "/tests/integration/mcp/npm_install.sh", npm_dir, timeout = 600 }
  if r.code ~= 0 then return nil, (r.stderr or ""):sub(-400) end
  return true
end

local function drive(full)
  local args = { "node", npm_dir .. "/sdk_client.mjs" }
  if full then args[#args + 1] = "--full" end
  args[#args + 1] = "--"
  args[#args + 1] = H.bin
  args[#args + 1] = "mcp"
  args.timeout = 180
  return assert(claw.proc.run(args))
end

describe("clawlua mcp with the official TypeScript SDK client", function()
  local ok, why = install()
  if not ok then
    it("(skipped)", function() print("SKIP mcp_sdk_spec: " .. why) end)
    return
  end

  it("initializes, lists, calls, reads resources, and gets the errors the spec names", function()
    local r = drive(false)
    assert(r.code == 0, r.stdout .. r.stderr)
    assert.matches("ok tools/list order", r.stdout)
    assert.matches("ok bad arguments are %-32602", r.stdout)
    assert.matches("ALL OK", r.stdout)
  end)

  it("runs a real sandbox end to end (create, exec, files, progress, cancel, audit, destroy)", function()
    local probe = H.clawlua { "-e", "require 'clawlua.sandbox'; require 'clawlua.policy'" }
    if probe.code ~= 0 then
      print("SKIP full SDK run: clawlua.sandbox / clawlua.policy cannot be required: " .. probe.stderr:match("[^\n]*"))
      return
    end
    if not H.is_root() then
      print("SKIP full SDK run: the jail backend needs root")
      return
    end
    local r = drive(true)
    assert(r.code == 0, r.stdout .. r.stderr)
    assert.matches("ok cancellation kills the command", r.stdout)
    assert.matches("ALL OK", r.stdout)
  end)
end)
