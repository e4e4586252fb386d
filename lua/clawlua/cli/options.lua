-- Option parsing shared by the subcommands (lua/clawlua/cmd/*.lua). Apart from clawlua.cli,
-- which names the subcommands, so that a subcommand never requires the module that loads it.
local M = {}

--- Splits a subcommand's argv into options (per spec) and operands. spec: name -> "flag" |
--- "value" | "list" (repeatable; the values in order). "--name=value" works for values; "--"
--- ends the options; "-" is an operand. Returns opts, operands or nil, message.
---@param args string[]
---@param spec table<string, "flag"|"value"|"list">
---@return table|nil, string[]|string
function M.parse(args, spec)
  local opts, files = {}, {}
  for name, kind in pairs(spec) do
    if kind == "list" then opts[name] = {} end
  end
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--" then
      for k = i + 1, #args do files[#files + 1] = args[k] end
      break
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      local name, inline = a:match("^(%-%-[%w-]+)=(.*)$")
      name = name or a
      local kind = spec[name]
      if not kind then return nil, ("unknown option '%s'"):format(a) end
      if kind == "flag" then
        if inline then return nil, ("option '%s' takes no value"):format(name) end
        opts[name] = true
      else
        local v = inline
        if not v then
          i = i + 1
          v = args[i]
        end
        if not v then return nil, ("option '%s' needs a value"):format(name) end
        if kind == "list" then table.insert(opts[name], v) else opts[name] = v end
      end
    else
      files[#files + 1] = a
    end
    i = i + 1
  end
  return opts, files
end


--- parse for a subcommand that takes no operands and answers -h/--help: the options, or the
--- exit status once usage was printed (0 for help, 2 for a bad argument, on stderr).
---@return table|integer
function M.command(name, usage, args, spec)
  spec["-h"], spec["--help"] = "flag", "flag"
  local o, rest = M.parse(args, spec)
  if o and #rest > 0 then o, rest = nil, ("unknown argument '%s'"):format(rest[1]) end
  if not o then
    io.stderr:write("clawlua ", name, ": ", rest, "\n", usage, "\n")
    return 2
  end
  if o["-h"] or o["--help"] then
    io.stdout:write("usage: ", usage, "\n")
    return 0
  end
  return o
end

return M
