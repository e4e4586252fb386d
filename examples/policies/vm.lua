-- A microVM of its own kernel (QEMU microvm, Firecracker where present) for code that needs
-- one: more isolation than the jail, slower to start (a warm pool hides most of it).
return {
  backend = "vm",
  resources = { vcpus = 1, memory_mib = 256, lifetime_s = 600, max_output = "16M" },
  network = { egress = "deny", allow = { "198.51.100.10:80/tcp" }, resolvers = { "9.9.9.9" } },
  seccomp = "docker-default",
}
