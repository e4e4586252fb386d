-- `clawlua cleanup [--dry-run] [-q] [--state-dir DIR]`: reclaims what sandboxes of dead
-- runtimes left behind, from the records in the state dir (clawlua.sandbox.state): their
-- processes, cgroups, mounts, directories and network objects (through clawlua.sandbox.net).
-- Sandboxes whose owner (pid + start time) still runs are never touched, nor anything that was
-- not recorded. Idempotent: a second run finds nothing.
local claw = require "clawlua"
local state = require "clawlua.sandbox.state"

local M = {}

M.usage = [[clawlua cleanup [--dry-run] [-q] [--state-dir DIR]

Reclaims everything recorded in the state dir (default: $CLAWLUA_STATE_DIR, /run/clawlua as
root, else $XDG_RUNTIME_DIR/clawlua) by sandboxes whose runtime is gone: processes, cgroups,
mounts, directories, network namespaces, links and firewall objects. Sandboxes of a live
runtime are left alone. --dry-run prints what would be removed. Exit status 0: nothing left
to reclaim; 1: something could not be reclaimed (printed); 2: usage.]]

local bb = state.busybox

local function exists(path)
  return bb { "test", "-e", path } ~= nil
end

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- Kills what is left in a cgroup directory and removes it (and its children first).
local function remove_cgroup(dir)
  local kill = io.open(dir .. "/cgroup.kill", "wb")
  if kill then
    kill:write("1")
    kill:close()
  else
    for pid in (read(dir .. "/cgroup.procs") or ""):gmatch("%d+") do bb { "kill", "-9", pid } end
  end
  for _ = 1, 50 do
    local ok, err = bb { "find", dir, "-depth", "-type", "d", "-exec", "rmdir", "{}", "+" }
    if ok or not exists(dir) then return true end
    if _ == 50 then return nil, err end
    claw.sleep(0.02)
  end
end

local function cgroup_dirs(prefix)
  local parent, stem = prefix:match("^(.*)/([^/]*)$")
  local out = {}
  local list = parent and bb { "ls", "-1A", parent }
  for name in (list or ""):gmatch("[^\n]+") do
    if name:sub(1, #stem) == stem then out[#out + 1] = parent .. "/" .. name end
  end
  return out
end

-- Whether a cgroup filesystem is mounted at path or above it (then a missing path is gone).
local function cgroup_mounted(path)
  for line in (read("/proc/self/mountinfo") or ""):gmatch("[^\n]+") do
    local mnt, fstype = line:match("^%S+ %S+ %S+ %S+ (%S+) .- %- (%S+)")
    if (fstype == "cgroup" or fstype == "cgroup2") and (path == mnt or path:sub(1, #mnt + 1) == mnt .. "/") then
      return true
    end
  end
  return false
end

local reclaim = {}

function reclaim.pid(name, dry)
  local pid, start = name:match("^(%d+):(%d+)$")
  pid, start = tonumber(pid), tonumber(start)
  if not pid or not state.alive(pid, start) then return {} end
  if dry then return { "process " .. pid } end
  local ok, err = bb { "kill", "-9", tostring(pid) }
  if not ok and state.alive(pid, start) then return nil, "kill " .. pid .. ": " .. err end
  return { "process " .. pid }
end

function reclaim.cgroup(prefix, dry)
  -- the prefix names the runtime's pid: a live process with that pid may own such cgroups now
  local pid = tonumber(prefix:match("clawlua%-(%d+)%-$"))
  if pid and state.alive(pid) then return {} end
  local parent = prefix:match("^(.*)/[^/]*$") or ""
  if not exists(parent) and not cgroup_mounted(parent) then
    -- under `ip netns exec`, whose sysfs has no /sys/fs/cgroup, the jail mounts the hierarchies
    -- in this mount namespace of its own (as a runtime there does)
    local info = claw.jail.cgroup_info()
    if not exists(parent) and not cgroup_mounted(parent) then
      -- saying "nothing left" would be a lie
      return nil, ("cgroup %s: no cgroup hierarchy is mounted over %s here%s (run clawlua cleanup "
        .. "in the mount namespace the runtime ran in)"):format(prefix, parent,
        info.mount_error and " (" .. info.mount_error .. ")" or "")
    end
  end
  local done = {}
  for _, d in ipairs(cgroup_dirs(prefix)) do
    if not dry then
      local ok, err = remove_cgroup(d)
      if not ok then return nil, "cgroup " .. d .. ": " .. tostring(err) end
    end
    done[#done + 1] = "cgroup " .. d
  end
  return done
end

function reclaim.dir(path, dry)
  if not exists(path) then return {} end
  if not dry then
    local ok, err = bb { "rm", "-rf", path }
    if not ok then return nil, "dir " .. path .. ": " .. err end
  end
  return { "dir " .. path }
end

-- a VM's run dir (sockets, the VMM's log) and a VM sandbox's files disk directory
reclaim.run_dir = reclaim.dir

-- A VMM's bare pid, for `clawlua ps`: the VM backend records the VMM's process as a pid
-- (with its start time) too, and its cgroups; a bare pid may be another process by now.
function reclaim.vmm_pid() return {} end

function reclaim.mount(path, dry)
  local mounted = (read("/proc/self/mountinfo") or ""):find(" " .. path .. " ", 1, true)
  if not mounted then return {} end
  if not dry then
    local ok, err = bb { "umount", "-l", path }
    if not ok then return nil, "mount " .. path .. ": " .. err end
  end
  return { "mount " .. path }
end

local function reclaim_other(kind, name, dry)
  local ok, net = pcall(require, "clawlua.sandbox.net")
  if not ok or type(net.cleanup) ~= "function" then
    return nil, ("%s %s: clawlua.sandbox.net is not available to reclaim it"):format(kind, name)
  end
  if dry then return { kind .. " " .. name } end
  local done, err = net.cleanup(kind, name)
  if not done then return nil, ("%s %s: %s"):format(kind, name, tostring(err)) end
  return { kind .. " " .. name }
end

-- Objects that live in the network namespace of the runtime that made them.
local NET_KINDS = { link = true, addr = true, sysctl = true, nft = true, fw = true, fwtables = true }

-- The name under /run/netns of the namespace "net:[N]", if one is there.
local function netns_name(ns)
  local ino = ns:match("^net:%[(%d+)%]$")
  local names = ino and bb { "ls", "-1A", "/run/netns" }
  for name in (names or ""):gmatch("[^\n]+") do
    local i = bb { "stat", "-L", "-c", "%i", "/run/netns/" .. name }
    if i and i:match("%d+") == ino then return name end
  end
  return nil
end

-- Removes a state dir of a dead runtime (nothing with dry_run): true, or nil, err.
local function remove_dir(dir, dry_run)
  if dry_run then return true end
  return bb { "rm", "-rf", dir }
end

--- Reclaims the sandboxes of dead runtimes. opts: {dry_run=, base=, say=fn(line)}.
--- Returns {reclaimed = {ids}, live = {ids}, objects = n, errors = {msgs}}.
function M.cleanup(opts)
  opts = opts or {}
  local say = opts.say or function() end
  local res = { reclaimed = {}, live = {}, objects = 0, errors = {} }
  local fw_reclaimed, fw_live = false, false
  for _, sb in ipairs(state.list(opts.base)) do
    if sb.id:match("^%.spare%-") then -- a spare state dir (no objects): not a sandbox
      if not sb.alive then
        local ok, err = remove_dir(sb.dir, opts.dry_run)
        if ok then
          say(("%s spare state dir %s (owner %s gone)"):format(opts.dry_run and "would remove" or "removed",
            sb.dir, tostring(sb.pid)))
        else
          res.errors[#res.errors + 1] = sb.dir .. ": " .. tostring(err)
        end
      end
    elseif sb.alive then
      res.live[#res.live + 1] = sb.id
      for _, o in ipairs(sb.objects) do fw_live = fw_live or o.kind == "fw" or o.kind == "fwtables" end
      say(("%s: owner %d is running, left alone"):format(sb.id, sb.pid))
    else
      local failed = false
      -- Network objects of a runtime that ran in another network namespace are that namespace's:
      -- touching the same names here would remove this namespace's (the host's forwarding
      -- switch, say). Still there: say where to run cleanup. Gone: they went with it.
      local away, away_name = sb.netns and sb.netns ~= state.netns() and sb.netns, nil
      if away then away_name = netns_name(away) end
      for i = #sb.objects, 1, -1 do -- reverse order of creation
        local o = sb.objects[i]
        local fn = reclaim[o.kind]
        local done, err
        if away and NET_KINDS[o.kind] then
          if away_name then
            err = ("%s %s: in network namespace %s (%s); run `nsenter --net=/run/netns/%s clawlua cleanup`")
              :format(o.kind, o.name, away_name, away, away_name)
          else
            done = {}
            say(("%s: %s %s went with its network namespace %s"):format(sb.id, o.kind, o.name, away))
          end
        elseif fn then
          done, err = fn(o.name, opts.dry_run)
        else
          done, err = reclaim_other(o.kind, o.name, opts.dry_run)
        end
        if not done then
          failed = true
          res.errors[#res.errors + 1] = sb.id .. ": " .. err
          say(("%s: could not reclaim %s"):format(sb.id, err))
        else
          fw_reclaimed = fw_reclaimed or ((o.kind == "fw" or o.kind == "fwtables") and #done > 0)
          for _, what in ipairs(done) do
            res.objects = res.objects + 1
            say(("%s: %s %s"):format(sb.id, opts.dry_run and "would remove" or "removed", what))
          end
        end
      end
      if not failed then
        local ok, err = remove_dir(sb.dir, opts.dry_run)
        if not ok then
          failed = true
          res.errors[#res.errors + 1] = sb.id .. ": " .. err
        end
        say(("%s: %s state dir %s (owner %s gone)"):format(sb.id,
          opts.dry_run and "would remove" or "removed", sb.dir, tostring(sb.pid)))
      end
      if not failed then res.reclaimed[#res.reclaimed + 1] = sb.id end
    end
  end
  -- the shared firewall tables a dead runtime made go too, once no VM of anyone uses them
  if fw_reclaimed and not fw_live and not opts.dry_run then
    local ok, dropped = require("clawlua.sandbox.net").drop_idle_firewall()
    if not ok then
      res.errors[#res.errors + 1] = "firewall tables: " .. tostring(dropped)
    elseif dropped then
      say("removed the firewall's tables (no VM attached any more)")
    end
  end
  return res
end

---@param args string[]
---@return integer
function M.run(args)
  local o = require("clawlua.cli.options").command("cleanup", M.usage, args, { ["--dry-run"] = "flag",
    ["-n"] = "flag", ["-q"] = "flag", ["--quiet"] = "flag", ["--state-dir"] = "value" })
  if type(o) == "number" then return o end
  local opts = { dry_run = o["--dry-run"] or o["-n"], base = o["--state-dir"] }
  local quiet = o["-q"] or o["--quiet"]
  opts.say = function(line) if not quiet then print(line) end end
  local res = M.cleanup(opts)
  if not quiet then
    print(("%s %d sandbox(es), %d object(s); %d of live runtimes left alone; %d error(s)"):format(
      opts.dry_run and "would reclaim" or "reclaimed", #res.reclaimed, res.objects, #res.live, #res.errors))
  end
  for _, e in ipairs(res.errors) do io.stderr:write("clawlua cleanup: ", e, "\n") end
  return #res.errors == 0 and 0 or 1
end

return M
