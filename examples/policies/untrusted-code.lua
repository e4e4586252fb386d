-- Untrusted code: the jail backend, no network at all (a network namespace with loopback only),
-- Docker-default-like seccomp, tight resources. Used by tests/lua/sandbox_spec.lua.
return {
  backend = "jail",
  resources = { memory_mib = 256, pids = 128, cpu = 1.0, lifetime_s = 300, max_output = "4M" },
  network = { egress = "deny" },
  seccomp = "docker-default",
  env = { LANG = "C.UTF-8" },
  hooks = {
    -- refuse obviously destructive commands before they reach the sandbox
    on_exec = function(argv)
      if argv[1] == "rm" and argv[2] == "-rf" and argv[3] == "/" then return false, "rm -rf /" end
      return true
    end,
  },
}
