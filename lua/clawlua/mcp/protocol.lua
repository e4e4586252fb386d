-- MCP protocol revisions: which ones clawlua speaks, how a version is negotiated, and how a
-- result is shaped for each.
--   2025-06-18, 2025-11-25: a session opened by `initialize` (the version negotiated there).
--   2026-07-28: stateless; every request carries `_meta["io.modelcontextprotocol/
--   protocolVersion"]` and the client's capabilities; results carry `resultType`, list results
--   `ttlMs` and `cacheScope`; `server/discover` replaces the handshake.
local claw = require "clawlua"

local json = claw.json

local M = {}

M.STATELESS = "2026-07-28"
M.LATEST_SESSION = "2025-11-25"
--- Every revision, newest first (the order `supported` lists are sent in).
M.VERSIONS = { "2026-07-28", "2025-11-25", "2025-06-18" }
M.SESSION_VERSIONS = { ["2025-11-25"] = true, ["2025-06-18"] = true }

M.META_VERSION = "io.modelcontextprotocol/protocolVersion"
M.META_CAPS = "io.modelcontextprotocol/clientCapabilities"
M.META_CLIENT = "io.modelcontextprotocol/clientInfo"
M.META_LOG_LEVEL = "io.modelcontextprotocol/logLevel"
M.META_SERVER = "io.modelcontextprotocol/serverInfo"

M.UNSUPPORTED_VERSION = -32022
M.MISSING_CAPABILITY = -32021
M.RESOURCE_NOT_FOUND = -32002

--- Log levels (RFC 5424 order, as MCP uses them), least severe first.
M.LEVELS = { "debug", "info", "notice", "warning", "error", "critical", "alert", "emergency" }
M.LEVEL_RANK = {}
for i, l in ipairs(M.LEVELS) do M.LEVEL_RANK[l] = i end

--- How long clients may cache list results (2026-07-28). The tool list never changes while the
--- server runs; resources do (the sandbox list), so they are never cached.
M.TOOLS_TTL_MS = 3600 * 1000
M.DISCOVER_TTL_MS = 3600 * 1000

--- The version `initialize` answers with: the client's when it is a session revision we
--- speak, else our latest session revision (the client then decides whether to go on).
---@param requested any
---@return string
function M.negotiate(requested)
  if type(requested) == "string" and M.SESSION_VERSIONS[requested] then return requested end
  return M.LATEST_SESSION
end

--- The supported-version list (a JSON array).
function M.supported()
  local t = {}
  for i, v in ipairs(M.VERSIONS) do t[i] = v end
  return json.array(t)
end

--- The revision a request asks for through its `_meta`, if it names one.
---@param params table
---@return string|nil version, table|nil meta
function M.request_version(params)
  local meta = type(params) == "table" and params._meta
  if type(meta) ~= "table" then return nil end
  local v = meta[M.META_VERSION]
  if v == nil then return nil, meta end
  return v, meta
end

function M.is_known(v)
  return v == M.STATELESS or M.SESSION_VERSIONS[v] == true
end

--- The error object for a version we do not speak (2026-07-28's UnsupportedProtocolVersionError).
function M.unsupported_error(requested)
  return {
    code = M.UNSUPPORTED_VERSION,
    message = ("unsupported protocol version %s"):format(
      type(requested) == "string" and ("'" .. requested .. "'") or "(not a string)"),
    data = { requested = type(requested) == "string" and requested or json.encode(requested),
             supported = M.supported() },
  }
end

--- The server's capabilities (the same in every revision; no listChanged: the lists are fixed
--- for the life of the process apart from the sandbox resource, which clients re-read).
--- `extra` adds what a tool set offers beyond tools and resources: prompts, subscribe,
--- completions (the conformance fixtures do).
---@param extra {prompts: boolean|nil, subscribe: boolean|nil, completions: boolean|nil}|nil
function M.capabilities(extra)
  extra = extra or {}
  local caps = {
    tools = { listChanged = false },
    resources = { listChanged = false, subscribe = extra.subscribe == true },
    logging = json.object {},
  }
  if extra.prompts then caps.prompts = { listChanged = false } end
  if extra.completions then caps.completions = json.object {} end
  return caps
end

--- Adds what a revision requires on every result. `list` marks cacheable list results.
---@param version string
---@param result table
---@param cache {ttl_ms: integer, scope: string}|nil
---@param server_info table|nil
function M.shape_result(version, result, cache, server_info)
  if version ~= M.STATELESS then return result end
  result.resultType = result.resultType or "complete"
  if cache then
    result.ttlMs = cache.ttl_ms
    result.cacheScope = cache.scope
  end
  if server_info then
    local meta = result._meta or {}
    meta[M.META_SERVER] = server_info
    result._meta = meta
  end
  return result
end

return M
