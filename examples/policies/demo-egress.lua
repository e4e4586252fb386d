-- The main job's policy (examples/sandbox.lua): a QEMU microVM that may reach one name on one
-- port and nothing else. Its only resolver is clawlua's DNS forwarder, which answers names on
-- the list (asking the resolvers below) and pins their addresses into the sandbox's firewall;
-- every other name gets NXDOMAIN without leaving the host. 203.0.113.53 is the demo's own DNS
-- server, in a network namespace the example makes.
return {
  backend = "vm",
  resources = { vcpus = 1, memory_mib = 128, lifetime_s = 300 },
  network = { egress = "deny", allow = { "allowed.example:80/tcp" }, resolvers = { "203.0.113.53" } },
}
