-- fuzz: seeds=seccomp_oci,seccomp_firecracker dict=seccomp_oci
-- fuzz_lua_seccomp_profiles: lua/clawlua/seccomp_profiles.lua on a decoded document. The input
-- is JSON; what decodes to a table is given to oci_table (the loader's core, which raises on a
-- bad profile) inside pcall, the way oci() does, and to the public loaders as text (which must
-- return a filter or nil + message and never raise). Errors of oci_table must name a JSON path.
local claw = ...
local profiles = require "clawlua.seccomp_profiles"

local OPTS = { arch = "x86_64", kernel = "6.1" }

local function check_filter(f)
  local info = f:info()
  assert(#f:bpf() == 8 * info.instructions, "bpf() and info().instructions disagree")
end

return function(data)
  local doc = claw.json.decode(data)
  if type(doc) ~= "table" then return end
  local ok, res = pcall(profiles.oci_table, doc, OPTS)
  if ok then
    check_filter(res)
  else
    assert(type(res) == "string" and res:match("^%$[%w%.%[%]_]*: "),
           "oci_table error without a JSON path: " .. tostring(res))
  end
  if not data:match("^%s*{") then return end
  local f, err = profiles.oci(data, OPTS)
  assert(f or err:match("^seccomp profile profile: "), err)
  assert(ok == (f ~= nil), "oci() and oci_table() disagree: " .. tostring(err or res))
  if f then check_filter(f) end
  local fc, ferr = profiles.firecracker(data)
  if fc then
    for _, filter in pairs(fc) do check_filter(filter) end
  else
    assert(type(ferr) == "string" and ferr:match("^seccomp profile profile: "), ferr)
  end
end
