-- The clawlua command line: runs scripts the way lua5.4 does (arg, ..., #!, -, -e, -l, -v) and
-- dispatches subcommands. Subcommands live in a registry that other modules extend:
--   cli.register{ name = "audit", summary = "...", usage = "...", run = function(args) end }
-- or lazily, by module name, so that starting clawlua never loads what a command needs:
--   cli.lazy.audit = { module = "clawlua.cmd.audit", summary = "..." }
-- Every command answers `clawlua <command> --help` (and -h) with its usage, exit status 0.
local claw = require "clawlua"

local M = {}

---@class clawlua.command
---@field name string
---@field summary string
---@field usage string|nil
---@field run fun(args: string[]): integer|nil

---@type table<string, clawlua.command>
M.commands = {}
---@type table<string, {module: string, summary: string}>
M.lazy = {}

local PROG = "clawlua"
local command_help -- forward: defined beside M.main

--- Adds a subcommand.
---@param spec clawlua.command
function M.register(spec)
  assert(type(spec) == "table" and type(spec.name) == "string" and type(spec.run) == "function",
    "cli.register{name=, summary=, run=} expected")
  M.commands[spec.name] = spec
  M.lazy[spec.name] = nil
  return spec
end

--- Finds a subcommand, loading its module when it is registered lazily.
---@return clawlua.command|nil
function M.find(name)
  if M.commands[name] then return M.commands[name] end
  local l = M.lazy[name]
  if not l then return nil end
  local mod = require(l.module)
  if M.commands[name] then return M.commands[name] end
  if type(mod) == "table" and type(mod.run) == "function" then
    return M.register { name = name, summary = l.summary, usage = mod.usage, run = mod.run }
  end
  error(l.module .. " did not register the '" .. name .. "' command")
end

local function command_names()
  local names = {}
  for n in pairs(M.commands) do names[#names + 1] = n end
  for n in pairs(M.lazy) do names[#names + 1] = n end
  table.sort(names)
  return names
end

local function summary_of(name)
  local c = M.commands[name]
  if c then return c.summary or "" end
  return M.lazy[name].summary or ""
end

function M.usage()
  local lines = {
    ("usage: %s [options] [script [args...]]"):format(PROG),
    ("       %s <command> [args...]"):format(PROG),
    "",
    "options (as lua5.4):",
    "  -e chunk      execute string 'chunk'",
    "  -l mod        require library 'mod' into global 'mod'",
    "  -v, --version show version information",
    "  -E            ignore environment variables (LUA_INIT, LUA_PATH, ...)",
    "  -W            turn warnings on",
    "  -h, --help    show this help",
    "  --            stop handling options",
    "  -             execute stdin and stop handling options",
    "",
    "commands:",
  }
  for _, n in ipairs(command_names()) do
    lines[#lines + 1] = ("  %-12s  %s"):format(n, summary_of(n))
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "A script path wins over a command of the same name only when the file exists."
  return table.concat(lines, "\n") .. "\n"
end

local function version_line()
  return ("clawlua %s (%s, libcurl %s)"):format(claw.version, _VERSION, claw.http.curl_version() or "not loadable")
end

local function errmsg(e)
  if type(e) == "string" then return e end
  local mt = getmetatable(e)
  if mt and mt.__tostring then return tostring(e) end
  return ("(error object is a %s value)"):format(type(e))
end

local function traceback(e)
  return debug.traceback(errmsg(e), 2)
end

local function report(msg)
  io.stderr:write(PROG, ": ", msg, "\n")
  io.stderr:flush()
end

--- Runs the loop until no task is left and turns what happened into an exit status.
local function drain(code)
  local blocked = claw.loop.run()
  local sig = claw.loop.stopping()
  if sig then
    return sig == "SIGINT" and 130 or (sig == "SIGTERM" and 143 or 128)
  end
  if blocked > 0 then
    report(("%d task(s) left waiting with nothing that could wake them"):format(blocked))
  end
  if code == 0 and claw.loop.stats().unhandled_errors > 0 then return 1 end
  return code
end

--- Calls chunk with a traceback handler; returns true and the chunk's first result, or
--- false after reporting the error (a shutdown's cancellation is not reported).
local function dochunk(chunk, ...)
  local ok, res = xpcall(chunk, traceback, ...)
  if not ok then
    if claw.is_cancelled(res) or claw.loop.stopping() then return false, nil end
    report(res)
    return false, res
  end
  return true, res
end

local function load_stdin()
  local src = io.stdin:read("a") or ""
  if src:sub(1, 1) == "#" then src = "--" .. src end -- keep line numbers, drop the #! line
  return load(src, "=stdin", "t")
end

local function run_init(ignore_env)
  if ignore_env then return true end
  local name = "LUA_INIT_5_4"
  local init = os.getenv(name)
  if not init then
    name = "LUA_INIT"
    init = os.getenv(name)
  end
  if not init then return true end
  local chunk, err
  if init:sub(1, 1) == "@" then
    chunk, err = loadfile(init:sub(2))
  else
    chunk, err = load(init, "=" .. name)
  end
  if not chunk then
    report(err)
    return false
  end
  return (dochunk(chunk))
end

local function file_exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

local function looks_like_path(s)
  return s:find("/", 1, true) ~= nil or s:match("%.lua$") ~= nil
end

local function usage_error(msg)
  if msg then report(msg) end
  io.stderr:write(M.usage())
  return 2
end

local function run_command(cmd, args)
  local ok, res = dochunk(function()
    return claw.run(cmd.run, args)
  end)
  if not ok then return drain(1) end
  local code = res
  if code == nil or code == true then code = 0 elseif code == false then code = 1 end
  if math.type(code) ~= "integer" then code = 0 end
  return drain(code)
end

--- Prints a command's usage and summary (`clawlua help CMD`, `clawlua CMD --help`).
function command_help(cmd)
  io.stdout:write("usage: ", cmd.usage or ("clawlua " .. cmd.name), "\n")
  if cmd.summary then io.stdout:write("\n", cmd.summary, "\n") end
  return 0
end

--- Entry point of the host. argv[0] is the program; returns the exit status.
---@param argv table<integer, string>
---@return integer
function M.main(argv)
  PROG = (argv[0] or "clawlua"):match("[^/]*$")
  local n = #argv
  -- A subcommand comes first; a script file of the same name wins only when it exists.
  local first = argv[1]
  if first and first:sub(1, 1) ~= "-" and not file_exists(first) then
    local cmd = M.find(first)
    if cmd then
      local args = {}
      for i = 2, n do args[#args + 1] = argv[i] end
      if args[1] == "--help" or args[1] == "-h" then return command_help(cmd) end
      return run_command(cmd, args)
    end
    if looks_like_path(first) then
      report("cannot open " .. first)
      return 1
    end
    return usage_error(("unknown command '%s'"):format(first))
  end

  -- lua5.4-style options.
  local actions, script, show_version, ignore_env, warnings = {}, nil, false, false, false
  local i = 1
  while i <= n do
    local a = argv[i]
    if a == "--" then
      i = i + 1
      script = i <= n and i or nil
      break
    elseif a == "-" then
      script = i
      break
    elseif a:sub(1, 1) ~= "-" then
      script = i
      break
    elseif a == "-e" or a == "-l" then
      local v = argv[i + 1]
      if not v then return usage_error(("'%s' needs an argument"):format(a)) end
      actions[#actions + 1] = { a, v }
      i = i + 2
    elseif a:match("^%-[el].") then
      actions[#actions + 1] = { a:sub(1, 2), a:sub(3) }
      i = i + 1
    elseif a == "-v" or a == "--version" then
      show_version = true
      i = i + 1
    elseif a == "-E" then
      ignore_env = true
      i = i + 1
    elseif a == "-W" then
      warnings = true
      i = i + 1
    elseif a == "-h" or a == "--help" then
      io.stdout:write(M.usage())
      return 0
    else
      return usage_error(("unrecognized option '%s'"):format(a))
    end
  end

  -- The global 'arg': script at 0, options below, script arguments above.
  local base = script or (n + 1)
  local argtab = {}
  for k = 0, n do argtab[k - base] = argv[k] end
  _G.arg = argtab

  if show_version then io.stdout:write(version_line(), "\n") end
  if warnings then warn("@on") end
  if not run_init(ignore_env) then return 1 end

  for _, act in ipairs(actions) do
    if act[1] == "-e" then
      local chunk, err = load(act[2], "=(command line)", "t")
      if not chunk then
        report(err)
        return 1
      end
      local ok = dochunk(chunk)
      if not ok then return drain(1) end
    else
      local name = act[2]
      local glob, mod = name:match("^([^=]+)=(.+)$")
      if not glob then glob, mod = name, name end
      local ok, res = dochunk(require, mod)
      if not ok then return drain(1) end
      _G[glob] = res
    end
  end

  if not script then
    if #actions > 0 or show_version then return drain(0) end
    if claw.stream.isatty(0) then return usage_error() end
    local chunk, err = load_stdin()
    if not chunk then
      report(err)
      return 1
    end
    local ok = dochunk(chunk)
    return drain(ok and 0 or 1)
  end

  local path = argv[script]
  local chunk, err
  if path == "-" then
    chunk, err = load_stdin()
  else
    if not file_exists(path) then
      report("cannot open " .. path)
      return 1
    end
    chunk, err = loadfile(path)
  end
  if not chunk then
    report(err)
    return 1
  end
  local ok = dochunk(chunk, table.unpack(argv, script + 1, n))
  return drain(ok and 0 or 1)
end

M.register {
  name = "help",
  summary = "show this help, or a command's",
  usage = "clawlua help [command]",
  run = function(args)
    local name = args[1]
    if not name then
      io.stdout:write(M.usage())
      return 0
    end
    local cmd = M.find(name)
    if not cmd then return usage_error(("unknown command '%s'"):format(name)) end
    return command_help(cmd)
  end,
}

--- Splits a subcommand's argv into options and operands (clawlua.cli.options).
M.parse_options = require("clawlua.cli.options").parse

M.lazy.agent = { module = "clawlua.cmd.agent", summary = "run an agent on a task, its tools in sandboxes" }
M.lazy.audit = { module = "clawlua.cmd.audit", summary = "read and verify audit logs (tail, verify)" }
M.lazy.mcp = { module = "clawlua.cmd.mcp", summary = "serve the sandbox tools over MCP on stdin/stdout" }
M.lazy.cleanup = { module = "clawlua.cmd.cleanup",
  summary = "reclaim what sandboxes of dead runtimes left behind" }
M.lazy.ps = { module = "clawlua.cmd.ps", summary = "list the sandboxes in the state dir" }
M.lazy.policy = { module = "clawlua.cmd.policy", summary = "check a policy file (policy check FILE)" }

M.register {
  name = "version",
  summary = "print the versions of clawlua and what it is built on",
  usage = "clawlua version",
  run = function()
    io.stdout:write(version_line(), "\n")
    return 0
  end,
}

return M
