-- Netlink faults of clawlua.firewall (firewall_faults_spec), in a process of its own so that
-- CLAWLUA_TEST_FW_RCVBUF (the firewall's test seam: its netlink receive buffer) applies to every
-- handle it opens. usage: clawlua fw_faults_child.lua NETNS MODE CYCLES; prints one JSON line.
--   enobufs: chains named like those of 40 VMs exist already (a crashed runtime's, made with
--     nft), so attach_many of the 40 is refused with an error per chain, more replies than the
--     receive buffer holds. Each cycle, on a new handle: the attach fails naming the first chain
--     refused (File exists), the ruleset and the handle's list are unchanged, and the handle
--     counted the overflow.
--   ebusy: a rule of someone else (nft) jumps to a VM's chain, so detaching the VM is refused
--     (EBUSY). Each cycle: the detach fails naming the chain, nothing changed; once that rule is
--     gone the same detach succeeds; the VM is attached again.
local claw = require "clawlua"
local json = require "clawlua.json"

local ns, mode, cycles = arg[1], arg[2], tonumber(arg[3])
local TABLE = "clawfault"

local function nft(script)
  local r = assert(claw.proc.run { "ip", "netns", "exec", ns, "nft", "-f", "-", stdin = script, timeout = 30 })
  assert(r.code == 0, "nft: " .. r.stderr .. "\n" .. script)
end
local function ruleset()
  local r = assert(claw.proc.run { "ip", "netns", "exec", ns, "nft", "list", "ruleset", timeout = 30 })
  assert(r.code == 0, r.stderr)
  return r.stdout
end
local function open()
  return assert(claw.firewall.open { netns = ns, table = TABLE, resolvers = {} })
end
local function spec(i)
  return { iface = ("fl%d"):format(i), ip = ("10.99.%d.2"):format(i), egress = { policy = "drop" } }
end
local function ids(fw)
  local out = {}
  for _, v in ipairs(fw:list()) do out[#out + 1] = v.id end
  return table.concat(out, " ")
end
local function vm_chains(id)
  local base = claw.firewall.names(id)
  local out = {}
  for c in ruleset():gmatch("chain (%S+) {") do
    if c:sub(1, #base) == base then out[#out + 1] = c end
  end
  assert(#out > 0, "no chain of " .. id)
  return out
end

local result = { mode = mode, cycles = 0, errors = {} }
claw.run(function()
  local t0 = claw.now()
  local fw = open()
  assert(fw:attach("keep", spec(0)))
  result.fds_before = claw.proc.diagnostics().fds
  if mode == "enobufs" then
    local many = {}
    for i = 1, 40 do many["x" .. i] = spec(i) end
    -- the chains the 40 VMs get, left behind by "someone else"
    assert(fw:attach_many(many))
    local chains = {}
    for id in pairs(many) do
      for _, c in ipairs(vm_chains(id)) do chains[#chains + 1] = c end
    end
    local ids_many = {}
    for id in pairs(many) do ids_many[#ids_many + 1] = id end
    assert(fw:detach_many(ids_many))
    local add = {}
    for _, c in ipairs(chains) do add[#add + 1] = ("add chain inet %s %s"):format(TABLE, c) end
    nft(table.concat(add, "\n") .. "\n")
    fw:close()
    result.chains = #chains
    local before = ruleset()
    for _ = 1, cycles do
      local h = open()
      local ok, err = h:attach_many(many)
      assert(ok == nil, "the attach was not refused")
      assert(err:find("File exists", 1, true) and err:find("chain '", 1, true), err)
      result.errors[err:gsub("'x%d+'", "'x<n>'"):gsub("vm_%S+", "<chain>")] = true
      assert(h:stats().overruns == 1, "no overflow: " .. json.encode(h:stats()))
      assert(ids(h) == "keep", "the handle's list changed: " .. ids(h))
      assert(ruleset() == before, "the ruleset changed")
      h:close()
      result.cycles = result.cycles + 1
    end
    local del = {}
    for _, c in ipairs(chains) do del[#del + 1] = ("delete chain inet %s %s"):format(TABLE, c) end
    nft(table.concat(del, "\n") .. "\n")
    fw = open()
  elseif mode == "ebusy" then
    assert(fw:attach("busy", spec(1)))
    local target = vm_chains("busy")[1]
    for _ = 1, cycles do
      nft(("add chain inet %s ext\nadd rule inet %s ext jump %s\n"):format(TABLE, TABLE, target))
      local before = ruleset()
      local ok, err = fw:detach("busy")
      assert(ok == nil, "the detach was not refused")
      assert(err:find("Device or resource busy", 1, true), err)
      result.errors[err:gsub("vm_%S+", "<chain>")] = true
      assert(ids(fw) == "busy keep", "the handle's list changed: " .. ids(fw))
      assert(ruleset() == before, "the ruleset changed")
      nft(("flush chain inet %s ext\ndelete chain inet %s ext\n"):format(TABLE, TABLE))
      assert(fw:detach("busy")) -- the same call, once the cause is gone
      assert(ids(fw) == "keep")
      assert(fw:attach("busy", spec(1)))
      result.cycles = result.cycles + 1
    end
  end
  result.fds_after = claw.proc.diagnostics().fds
  assert(fw:destroy())
  result.seconds = claw.now() - t0
end)
local errs = {}
for e in pairs(result.errors) do errs[#errs + 1] = e end
result.errors = errs
io.stdout:write(json.encode(result), "\n")
