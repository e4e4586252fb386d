-- Seccomp filters named by policies. "docker-default" is clawlua's own Docker-default-like
-- filter: everything allowed except the syscalls Docker's default profile keeps from a
-- container without extra capabilities (kernel modules, kexec, mount and namespaces, keyrings,
-- ptrace and other processes' memory, bpf and perf, clocks, swap, reboot, obsolete calls), which
-- fail with EPERM; clone with a namespace flag fails with EPERM and clone3 with ENOSYS (so libc
-- falls back to clone), as in Docker. A path names an OCI/Docker JSON profile
-- (clawlua.seccomp_profiles). "unconfined" is no filter. Compiled filters are cached per name.
local claw = require "clawlua"

local M = {}

M.denied = {
  "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
  "finit_module", "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
  "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount", "move_pages",
  "name_to_handle_at", "nfsservctl", "open_by_handle_at", "perf_event_open", "personality",
  "pivot_root", "process_vm_readv", "process_vm_writev", "ptrace", "query_module", "quotactl",
  "reboot", "request_key", "set_mempolicy", "setns", "settimeofday", "swapon", "swapoff",
  "sysfs", "_sysctl", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vm86",
  "vm86old", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
  "mount_setattr", "syslog", "vhangup", "lookup_dcookie",
}

-- CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
local CLONE_NS_FLAGS = { 0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
  0x40000000, 0x00000080 }

local function docker_default()
  local seccomp = claw.seccomp
  local names, seen = {}, {}
  for _, n in ipairs(M.denied) do
    if not seen[n] and pcall(seccomp.resolve, n) and seccomp.resolve(n) then
      names[#names + 1] = n
    end
    seen[n] = true
  end
  local rules = { { syscalls = names, action = { errno = "EPERM" } },
    { syscall = "clone3", action = { errno = "ENOSYS" } } }
  for _, flag in ipairs(CLONE_NS_FLAGS) do
    rules[#rules + 1] = { syscall = "clone", action = { errno = "EPERM" },
      args = { { index = 0, op = "&==", mask = flag, value = flag } } }
  end
  return seccomp.filter { default = "allow", rules = rules }
end

local cache = {}

--- The filter for a policy's seccomp value, or false for "unconfined".
---@param name string "docker-default" | "unconfined" | "/path/profile.json"
---@return userdata|false|nil filter, string|nil err
function M.filter(name)
  if cache[name] ~= nil then return cache[name] end
  local f, err
  if name == "unconfined" then
    f = false
  elseif name == "docker-default" then
    f = docker_default()
  else
    f, err = claw.seccomp.load_oci(name)
    if not f then return nil, err end
  end
  cache[name] = f
  return f
end

return M
