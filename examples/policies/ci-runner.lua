-- A CI job: more memory, processes and time; egress to the source and package hosts only.
return {
  backend = "jail",
  resources = { memory_mib = 2048, pids = 1024, cpu = 2.0, lifetime_s = 3600, max_output = "64M" },
  network = {
    egress = "deny",
    allow = { "github.com:443", "codeload.github.com:443", "deb.debian.org:80", "registry.npmjs.org:443" },
    resolvers = { "9.9.9.9" },
  },
  files = { readonly = { "/usr" } },
  env = { CI = "true" },
}
