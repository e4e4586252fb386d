-- `clawlua policy check FILE...`: loads each policy file the way sandboxes do and prints the
-- effective, fully defaulted policy as JSON; a bad file prints its error (file:line: field:
-- reason) and the exit status is 1.
local claw = require "clawlua"
local policy = require "clawlua.policy"

local M = {}

M.usage = [[clawlua policy check FILE...

Prints the effective policy of each FILE (every default filled in) as JSON. Exit status 0: all
valid; 1: an error, printed as file:line: field: reason; 2: usage.]]

---@param args string[]
---@return integer
function M.run(args)
  if args[1] == "-h" or args[1] == "--help" or args[1] == "help" then
    io.stdout:write("usage: ", M.usage, "\n")
    return 0
  end
  if args[1] ~= "check" or #args < 2 then
    io.stderr:write("clawlua policy: ", args[1] and ("unknown command '" .. args[1] .. "'")
      or "no command given", "\n", M.usage, "\n")
    return 2
  end
  local status = 0
  for i = 2, #args do
    local p, err = policy.load(args[i])
    if p then
      io.stdout:write(claw.json.encode(policy.describe(p), { pretty = true, sort_keys = true }), "\n")
    else
      io.stderr:write("clawlua policy: ", err, "\n")
      status = 1
    end
  end
  return status
end

return M
