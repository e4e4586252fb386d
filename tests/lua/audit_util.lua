-- Helpers shared by the audit specs: log files as arrays of lines, forging chained records,
-- tmpfs mounts for full-disk tests.
local claw = require "clawlua"
local H = require "helper"

local U = {}

--- The lines of a file (without newlines); `torn` is the unfinished last line, if any.
function U.lines(path)
  local data = H.read_file(path)
  local t = {}
  for l in data:gmatch("([^\n]*)\n") do t[#t + 1] = l end
  local torn = data:match("\n([^\n]+)$") or (not data:find("\n") and data ~= "" and data or nil)
  return t, torn
end

function U.write_lines(path, lines, tail)
  H.write_file(path, table.concat(lines, "\n") .. (#lines > 0 and "\n" or "") .. (tail or ""))
end

--- SHA-256 of s as hex, computed by sha256sum: an implementation independent of the runtime.
function U.sha256(s)
  local out = H.sh("sha256sum", { stdin = s })
  return (out:match("^(%x+)"))
end

--- A record chained after prev_line, the way an attacker with write access would forge one.
function U.forge(prev_line, body)
  local prev = prev_line:match('"hash":"(%x+)"')
  local h = U.sha256(prev .. body)
  return body:sub(1, -2) .. ',"prev":"' .. prev .. '","hash":"' .. h .. '"}'
end

--- Writes a chained log of n events to path through a fresh sink; returns its lines.
function U.make_log(path, n, opts)
  os.remove(path)
  local o = { path = path, max_bytes = 0, fsync = "never" }
  for k, v in pairs(opts or {}) do o[k] = v end
  local s = assert(claw.audit.sink(o))
  for i = 1, n do claw.audit.emit("test.log", { i = i, sandbox = "vm-" .. (i % 2) }) end
  s:close()
  return (U.lines(path))
end

--- Verifies one file; returns its result and a compact list "kind@line" of its issues.
function U.verify(paths)
  local rep = claw.audit.verify(paths)
  local found = {}
  for _, f in ipairs(rep.files) do
    for _, is in ipairs(f.issues) do found[#found + 1] = is.kind .. "@" .. is.line end
  end
  return rep, table.concat(found, " ")
end

--- Mounts a tmpfs of `size` on a new directory; returns the directory and an unmount function.
function U.tmpfs(size)
  local dir = H.tmpdir()
  H.sh(("mount -t tmpfs -o size=%s,mode=0755 clawlua-test '%s'"):format(size, dir))
  return dir, function()
    H.sh(("umount '%s'"):format(dir), { may_fail = true })
    H.rm_rf(dir)
  end
end

function U.can_mount()
  if not H.is_root() then return false, "needs root to mount a tmpfs" end
  local dir = H.tmpdir()
  local _, r = H.sh(("mount -t tmpfs -o size=64k clawlua-probe '%s'"):format(dir), { may_fail = true })
  if r.code == 0 then H.sh(("umount '%s'"):format(dir)) end
  H.rm_rf(dir)
  if r.code ~= 0 then return false, "cannot mount tmpfs: " .. r.stderr end
  return true
end

--- After a full disk: how many records are missing from the log at `path` (gaps in its seqs),
--- and how many its own audit.sink.dropped records report.
function U.drops_in_file(path)
  local first, last, count, reported = nil, nil, 0, 0
  for ev in claw.audit.read_file(path) do
    first = first or ev.seq
    last = ev.seq
    count = count + 1
    if ev.kind == "audit.sink.dropped" then reported = reported + ev.detail.dropped end
  end
  return (last - first + 1) - count, reported
end

--- Events of the ring after seq with this kind.
function U.events_after(seq, kind)
  return claw.audit.events { after_seq = seq, kind = kind }
end

return U
