-- Package installs: egress only to the Python package index's names (resolved by clawlua's
-- DNS forwarder, their answers pinned in the sandbox's firewall set), HTTPS only.
return {
  backend = "jail",
  resources = { memory_mib = 1024, pids = 512, lifetime_s = 900, max_output = "16M" },
  network = {
    egress = "deny",
    allow = { "pypi.org:443/tcp", { host = "files.pythonhosted.org", port = 443 } },
    resolvers = { "9.9.9.9", "149.112.112.112" },
  },
  files = { readonly = { "/usr" } },
}
