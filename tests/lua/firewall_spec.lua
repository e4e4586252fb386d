-- labels: root netns
-- timeout: 900
-- clawlua.firewall against the real kernel: rules are checked with real packets between network
-- namespaces the tests create (tests/lua/netns.lua), and the kernel's ruleset is read back with
-- nft. The firewall's netlink sockets are opened inside the "host" namespace (firewall.open's
-- netns option, which creates them on a helper thread that entered it), so the test process
-- stays in its own namespace and drives all of them.
local claw = require "clawlua"
local firewall = claw.firewall
local json = require "clawlua.json"
local H = require "helper"
local N = require "netns"

local available, why = N.available()

local TCP, UDP, DENIED_PORT = 5001, 5002, 5003

local function with_topo(opts, fn)
  local t = N.topology(opts)
  local fw
  finally(function()
    if fw then fw:close() end
    t:destroy()
    assert.are.same({}, N.leftovers(t.prefix))
  end)
  fw = assert(firewall.open { netns = t.host, resolvers = opts.resolvers or {},
                              log_group = opts.log_group, on_drop = opts.on_drop,
                              min_ttl = opts.min_ttl })
  fn(t, fw)
end

local function oks(results)
  local r = {}
  for i, x in ipairs(results) do r[i] = x.ok end
  return r
end

local function ruleset_text(t) return t:nft("list ruleset") end

describe("firewall", function()
  if not available then
    pending("firewall tests skipped: " .. why)
    return
  end
  local fds0
  setup(function() fds0 = H.fds() end)
  teardown(function()
    H.settle()
    assert.are.same({}, N.leftovers())
    assert.is_true(H.fds() <= fds0, "file descriptors leaked")
  end)

  it("lets allowed flows through and drops denied CIDRs, ports, protocols and the rest", function()
    with_topo({}, function(t, fw)
      t:serve { TCP, UDP, DENIED_PORT }
      assert(fw:attach("vm-1", t:spec(1, {
        egress = {
          policy = "drop",
          allow = {
            { cidr = "10.98.0.0/16", proto = "tcp", port = TCP },
            { cidr = { "10.98.0.1", "fd98::/64" }, proto = "udp", port = "5000-5002" },
            { cidr = "10.97.0.1", proto = "icmp" },
            { cidr = "fd98::1", proto = "tcp", port = TCP },
          },
          deny = { { cidr = "10.98.0.2" } },
        },
      })))
      local r = t:probe(1, {
        { kind = "tcp", dst = "10.98.0.1", port = TCP },          -- 1 allowed
        { kind = "tcp", dst = "10.98.0.2", port = TCP },          -- 2 denied CIDR (deny wins)
        { kind = "tcp", dst = "10.98.0.1", port = DENIED_PORT },  -- 3 port not allowed
        { kind = "udp", dst = "10.98.0.1", port = UDP },          -- 4 allowed, reply comes back
        { kind = "udp", dst = "10.97.0.1", port = UDP },          -- 5 CIDR not allowed for udp
        { kind = "icmp", dst = "10.97.0.1" },                     -- 6 allowed protocol
        { kind = "icmp", dst = "10.98.0.1" },                     -- 7 protocol not allowed there
        { kind = "tcp", dst = "fd98::1", port = TCP },            -- 8 v6 allowed
        { kind = "tcp", dst = "fd98::2", port = TCP },            -- 9 v6 default drop
        { kind = "udp", dst = "fd98::2", port = UDP },            -- 10 v6 CIDR allowed
        { kind = "tcp", dst = "169.254.169.254", port = TCP },    -- 11 metadata
      })
      assert.are.same({ true, false, false, true, false, true, false, true, false, true, false },
                      oks(r))
      -- the kernel counted what it did
      local c = assert(fw:counters("vm-1"))
      assert.is_true(c["egress.deny[1]"].packets >= 1)
      assert.is_true(c["egress.allow[1]"].packets >= 1)
      assert.is_true(c["egress.policy"].packets >= 1)
      assert.is_true(c["egress.established"].packets >= 1) -- return traffic
    end)
  end)
end)
