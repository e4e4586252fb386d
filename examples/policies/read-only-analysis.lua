-- Read-only analysis of a code base: the host's /usr (for its tools) and the sources bound
-- read-only, no network, and a hook that refuses every file write through the sandbox API
-- (commands may still use the scratch dir and /tmp for their own temporary files).
return {
  backend = "jail",
  resources = { memory_mib = 512, pids = 256, lifetime_s = 1800, max_output = "8M" },
  network = { egress = "deny" },
  files = { readonly = { "/usr" } },
  hooks = {
    on_file = function(op, path)
      if op == "write_file" then return false, "read-only analysis: no writes (" .. path .. ")" end
      return true
    end,
  },
}
