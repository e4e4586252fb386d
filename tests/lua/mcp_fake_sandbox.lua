-- A FAKE of the clawlua.sandbox module, for the MCP protocol and tool-shape specs only: it
-- follows the contract in the brief (create/exec/write_file/read_file/list_dir/update_policy/
-- info/destroy) with an in-memory file system, and records what it was asked so the specs can
-- check it. The real module is exercised by mcp_sandbox_spec.lua.
--   exec understands: {"echo", ...}, {"exit", N}, {"sleep", S} (cancellable), {"cat"} (stdin).
local claw = require "clawlua"

local M = {}

--- Resets the fake's state; `opts.fail_create` makes create fail with that message.
function M.reset(opts)
  M.created, M.destroyed, M.cancelled, M.execs = {}, {}, {}, {}
  M.fail_create = opts and opts.fail_create
  M.create_delay = opts and opts.create_delay -- seconds a create takes (a boot)
  M.next_id = 0
end
M.reset()

local Box = {}
Box.__index = Box

function M.create(policy, opts)
  assert(type(policy) == "table", "fake sandbox: policy table expected")
  if M.fail_create then return nil, "sandbox: " .. M.fail_create, "EFAKE" end
  if M.create_delay then claw.sleep(M.create_delay) end
  M.next_id = M.next_id + 1
  local sb = setmetatable({ id = "fake-" .. M.next_id, backend = opts and opts.backend or policy.backend or "jail",
                            files = {}, network = policy.network, state = "running", policy = policy }, Box)
  M.created[#M.created + 1] = sb.id
  return sb
end

function Box:exec(spec)
  assert(self.state == "running", "fake sandbox: exec on a destroyed sandbox")
  M.execs[#M.execs + 1] = spec
  local t0 = claw.now()
  local cmd = spec[1]
  local r = { stdout = "", stderr = "", timed_out = false, truncated = false }
  if cmd == "echo" then
    r.stdout = table.concat(spec, " ", 2) .. "\n"
    r.code = 0
  elseif cmd == "exit" then
    r.code = tonumber(spec[2])
    r.stderr = "exiting " .. spec[2] .. "\n"
  elseif cmd == "binary" then
    r.stdout = "ok\255\254 done\n"
    r.code = 0
  elseif cmd == "cat" then
    r.stdout = spec.stdin or ""
    r.code = 0
  elseif cmd == "sleep" then
    local ok, err = pcall(claw.sleep, tonumber(spec[2]))
    if not ok then
      M.cancelled[#M.cancelled + 1] = self.id -- "the command is killed"
      error(err, 0)
    end
    r.code = 0
  else
    return nil, "exec: no such command in the fake: " .. tostring(cmd)
  end
  r.duration = claw.now() - t0
  return r
end

function Box:write_file(path, data, opts)
  self.files[path] = { data = data, mode = opts and opts.mode }
  return true
end

function Box:read_file(path, opts)
  local f = self.files[path]
  if not f then return nil, "read_file " .. path .. ": No such file or directory", "ENOENT" end
  if opts and opts.max and #f.data > opts.max then return nil, "read_file " .. path .. ": larger than max" end
  return f.data
end

function Box:list_dir()
  local t = {}
  for name, f in pairs(self.files) do t[#t + 1] = { name = name, type = "file", size = #f.data } end
  return t
end

function Box:update_policy(p)
  self.network = p.network
  return true
end

function Box:info()
  return { id = self.id, backend = self.backend, state = self.state, policy = self.policy,
           created = 0, network = { address = "10.0.0.2", gateway = "10.0.0.1" } }
end

function Box:destroy()
  if self.state == "destroyed" then return true end
  self.state = "destroyed"
  M.destroyed[#M.destroyed + 1] = self.id
  return true
end

--- A policy table shaped like clawlua.policy's, with a hook the specs control.
function M.policy(hook)
  return { name = "fake", backend = "jail", resources = { vcpus = 1, memory_mib = 256, lifetime_s = 600,
           max_output = 1 << 20 }, network = { egress = "deny", allow = {} }, env = {},
           hooks = { on_tool_call = hook } }
end

return M
