-- `clawlua audit`: read and verify JSONL audit logs written by audit.sink{path=...}.
--   clawlua audit tail [-f] [-n N] [--kind K] [--vm ID] [--pid PID] [--json] FILE...
--   clawlua audit verify [-q] FILE...
local claw = require "clawlua"

local audit = claw.audit

local M = {}

M.usage = [[clawlua audit <command> [options] FILE...

commands:
  tail [-f] [-n N] [--kind K] [--vm ID] [--pid PID] [--json] [--color|--no-color] FILE...
      print the last N (default 10) matching records of the files, in order; with -f, keep
      following the last file (across its rotations) until interrupted.
      --kind K matches K and K.*; --vm ID (or --sandbox ID) the sandbox; --json prints the
      records as stored instead of one readable line each. -n 0 prints only new records.
  verify [-q] FILE...
      check the hash chain of the files (a rotated set in any order: they are checked oldest
      first, each against the one before). Exit status 0: intact; 1: tampered or unreadable,
      with what and where; 2: usage. -q prints problems only.]]

local POLL_INTERVAL = 0.2

local function usage_error(msg)
  io.stderr:write("clawlua audit: ", msg, "\n", M.usage, "\n")
  return 2
end

-- Options and operands, as every subcommand splits them (clawlua.cli.options).
local parse = require("clawlua.cli.options").parse

local function out_stream()
  local ok, s = pcall(claw.stream.stdout)
  if ok and s then return s end
  return nil
end

local function writer()
  local s = out_stream()
  if s then
    return function(text) s:write(text) end, function() s:close() end
  end
  return function(text)
    io.stdout:write(text)
    io.stdout:flush()
  end, function() end
end

local function tail(args)
  local opts, files = parse(args, {
    ["-f"] = "flag", ["--follow"] = "flag", ["-n"] = "value", ["--lines"] = "value",
    ["--kind"] = "value", ["--vm"] = "value", ["--sandbox"] = "value", ["--pid"] = "value",
    ["--json"] = "flag", ["--color"] = "flag", ["--no-color"] = "flag",
  })
  if not opts then return usage_error(files) end
  if #files == 0 then return usage_error("tail: no FILE given") end
  local n = tonumber(opts["-n"] or opts["--lines"] or "10")
  if not n or n < 0 or math.type(n) ~= "integer" then
    return usage_error("tail: -n needs a non-negative integer")
  end
  local filter = { kind = opts["--kind"], sandbox = opts["--vm"] or opts["--sandbox"] }
  if opts["--pid"] then
    filter.pid = math.tointeger(tonumber(opts["--pid"]))
    if not filter.pid then return usage_error("tail: --pid needs an integer") end
  end
  local follow = opts["-f"] or opts["--follow"]
  local json = opts["--json"]
  local color = claw.stream.isatty(1)
  if opts["--color"] then color = true end
  if opts["--no-color"] then color = false end

  local write, finish = writer()
  local function show(line)
    if json then
      write(line .. "\n")
    else
      local text = audit.format(line, { color = color })
      if text then write(text .. "\n") end
    end
  end

  -- Open every file first: a missing one is an error before anything is printed.
  local readers = {}
  for i, path in ipairs(files) do
    local r, err = audit.reader(path, { filter = filter, raw = true, follow = follow and i == #files })
    if not r then
      io.stderr:write("clawlua audit tail: ", err, "\n")
      for _, o in ipairs(readers) do o:close() end
      return 1
    end
    readers[i] = r
  end
  -- The last n matches across the files, in order.
  local ring, count = {}, 0
  for _, r in ipairs(readers) do
    while true do
      local line, err = r:next(1 << 20)
      if line == false then
        claw.yield()
      elseif line == nil then
        if err then
          io.stderr:write("clawlua audit tail: ", err, "\n")
          return 1
        end
        break
      elseif n > 0 then
        count = count + 1
        ring[(count - 1) % n + 1] = line
      end
    end
  end
  for i = math.max(1, count - n + 1), count do show(ring[(i - 1) % n + 1]) end
  for i = 1, #readers - (follow and 1 or 0) do readers[i]:close() end
  if not follow then
    finish()
    return 0
  end
  -- Follow the last file: poll it on the loop (regular files are always "readable").
  local r = readers[#readers]
  while true do
    local line, err = r:next(1 << 20)
    if line then
      show(line)
    elseif line == false then
      claw.yield()
    elseif err then
      io.stderr:write("clawlua audit tail: ", err, "\n")
      return 1
    else
      claw.sleep(POLL_INTERVAL)
    end
  end
end

local function short(hash) return hash and hash:sub(1, 16) or "?" end

local function verify(args)
  local opts, files = parse(args, { ["-q"] = "flag", ["--quiet"] = "flag" })
  if not opts then return usage_error(files) end
  if #files == 0 then return usage_error("verify: no FILE given") end
  local quiet = opts["-q"] or opts["--quiet"]
  local report = audit.verify(files)
  local out = {}
  local function say(s) out[#out + 1] = s end
  for i, f in ipairs(report.files) do
    if f.error then
      say(("%s: cannot verify: %s"):format(f.path, f.error))
    elseif f.ok then
      if not quiet then
        local range = f.first_seq and (", seq %d..%d"):format(f.first_seq, f.last_seq) or ""
        say(("%s: OK (%d records%s, head %s)"):format(f.path, f.records, range, short(f.last_hash)))
        local a = f.anchor
        if a and not a.genesis and not a.checked and i == 1 then
          say("  note: the chain continues from an earlier file that was not given (rotated away?)")
        end
      end
    else
      say(("%s: TAMPERED (%d problem%s)"):format(f.path, f.issues_total, f.issues_total == 1 and "" or "s"))
      for _, is in ipairs(f.issues) do
        local where = is.seq and ("line %d (seq %d)"):format(is.line, is.seq) or ("line %d"):format(is.line)
        say(("  %s: %s: %s"):format(where, is.kind, is.message))
      end
      if f.issues_total > #f.issues then
        say(("  ... and %d more"):format(f.issues_total - #f.issues))
      end
    end
    if f.torn and not quiet then
      say(("  note: the last line is unfinished (%d bytes: a crash in the middle of a write); the chain "
        .. "verifies up to the record before it"):format(f.torn_bytes or 0))
    end
  end
  if #out > 0 then
    local write, finish = writer()
    write(table.concat(out, "\n") .. "\n")
    finish()
  end
  return report.ok and 0 or 1
end

M.commands = { tail = tail, verify = verify }

--- Entry point: args are what follows `clawlua audit`.
---@param args string[]
---@return integer
function M.run(args)
  local sub = args[1]
  if sub == nil then return usage_error("no command given") end
  if sub == "help" or sub == "-h" or sub == "--help" then
    io.stdout:write("usage: ", M.usage, "\n")
    return 0
  end
  local fn = M.commands[sub]
  if not fn then return usage_error(("unknown command '%s'"):format(sub)) end
  local rest = {}
  for i = 2, #args do rest[#rest + 1] = args[i] end
  return fn(rest)
end

return M
