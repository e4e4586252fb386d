-- The fixed tools, resources and prompts the official MCP conformance suite
-- (@modelcontextprotocol/conformance) expects of a server under test, served by
-- `clawlua mcp --conformance-fixtures` instead of the sandbox tools. Same interface as a tool
-- set (clawlua.mcp.tools), plus prompts, resource templates, subscriptions and completion.
-- This is a test mode: nothing here touches a sandbox.
local claw = require "clawlua"

local json = claw.json

local M = {}

-- A 1x1 red PNG, and a WAV header with no samples (8 kHz, 16-bit, mono).
M.PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
M.WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="

local NO_ARGS = { type = "object", properties = json.object {} }

local function text(t) return { type = "text", text = t } end

local function result(content, is_error)
  return { content = json.array(content), isError = is_error or nil }
end

local TOOLS = {
  { name = "test_simple_text", description = "Returns simple text", input = NO_ARGS,
    call = function() return result { text "This is a simple text response for testing." } end },
  { name = "test_image_content", description = "Returns an image", input = NO_ARGS,
    call = function() return result { { type = "image", data = M.PNG, mimeType = "image/png" } } end },
  { name = "test_audio_content", description = "Returns audio", input = NO_ARGS,
    call = function() return result { { type = "audio", data = M.WAV, mimeType = "audio/wav" } } end },
  { name = "test_embedded_resource", description = "Returns an embedded resource", input = NO_ARGS,
    call = function()
      return result { { type = "resource", resource = { uri = "test://embedded-resource", mimeType = "text/plain",
                                                         text = "This is an embedded resource content." } } }
    end },
  { name = "test_multiple_content_types", description = "Returns text, an image and a resource", input = NO_ARGS,
    call = function()
      return result { text "Multiple content types test:", { type = "image", data = M.PNG, mimeType = "image/png" },
        { type = "resource", resource = { uri = "test://mixed-content-resource", mimeType = "application/json",
                                          text = '{"test":"data","value":123}' } } }
    end },
  { name = "test_tool_with_logging", description = "Sends three log messages while it runs", input = NO_ARGS,
    call = function(_, ctx)
      ctx.log("info", "Tool execution started")
      claw.sleep(0.05)
      ctx.log("info", "Tool processing data")
      claw.sleep(0.05)
      ctx.log("info", "Tool execution completed")
      return result { text "Logging tool completed" }
    end },
  { name = "test_tool_with_progress", description = "Reports progress 0, 50, 100 of 100", input = NO_ARGS,
    call = function(_, ctx)
      local p = ctx.progress or function() end
      p(0, 100)
      claw.sleep(0.05)
      p(50, 100)
      claw.sleep(0.05)
      p(100, 100)
      -- Through a stdio -> HTTP bridge a notification may travel on another HTTP stream than
      -- the response, and a client drops progress that arrives after the response: give the
      -- last one a head start (stdout has them in order either way).
      claw.sleep(0.02)
      return result { text "Progress tool completed" }
    end },
  { name = "test_error_handling", description = "Always fails", input = NO_ARGS,
    call = function() return result({ text "This tool intentionally returns an error for testing" }, true) end },
  { name = "test_sampling", description = "Asks the client's LLM",
    input = { type = "object", properties = { prompt = { type = "string" } }, required = json.array { "prompt" } },
    call = function(args, ctx)
      if type(ctx.client_capabilities) ~= "table" or ctx.client_capabilities.sampling == nil then
        return result({ text "the client does not support sampling" }, true)
      end
      local r, err = ctx.request("sampling/createMessage", {
        messages = json.array { { role = "user", content = text(args.prompt) } }, maxTokens = 100 })
      if not r then return result({ text("sampling failed: " .. tostring(err and err.message)) }, true) end
      local answer = type(r.content) == "table" and r.content.text or json.encode(r.content)
      return result { text("LLM response: " .. tostring(answer)) }
    end },
  { name = "test_elicitation", description = "Asks the user",
    input = { type = "object", properties = { message = { type = "string" } }, required = json.array { "message" } },
    call = function(args, ctx)
      return M.elicit(ctx, args.message, {
        type = "object",
        properties = { username = { type = "string", description = "User's response" },
                       email = { type = "string", description = "User's email address" } },
        required = json.array { "username", "email" } }, "User response: ")
    end },
  { name = "test_elicitation_sep1034_defaults", description = "Elicitation with defaults", input = NO_ARGS,
    call = function(_, ctx)
      return M.elicit(ctx, "Please review and update the form fields with defaults", {
        type = "object",
        properties = {
          name = { type = "string", description = "User name", default = "John Doe" },
          age = { type = "integer", description = "User age", default = 30 },
          score = { type = "number", description = "User score", default = 95.5 },
          status = { type = "string", description = "User status",
                     enum = json.array { "active", "inactive", "pending" },
                     default = "active" },
          verified = { type = "boolean", description = "Verification status", default = true },
        } }, "Elicitation completed: ")
    end },
  { name = "test_elicitation_sep1330_enums", description = "Elicitation with every enum form", input = NO_ARGS,
    call = function(_, ctx)
      local function titled(prefix, names)
        local t = {}
        for i, n in ipairs(names) do t[i] = { const = prefix .. i, title = n } end
        return json.array(t)
      end
      return M.elicit(ctx, "Please select options from the enum fields", {
        type = "object",
        properties = {
          untitledSingle = { type = "string", enum = json.array { "option1", "option2", "option3" } },
          titledSingle = { type = "string",
                           oneOf = titled("value", { "First Option", "Second Option", "Third Option" }) },
          legacyEnum = { type = "string", enum = json.array { "opt1", "opt2", "opt3" },
                         enumNames = json.array { "Option One", "Option Two", "Option Three" } },
          untitledMulti = { type = "array",
                            items = { type = "string", enum = json.array { "option1", "option2", "option3" } } },
          titledMulti = { type = "array",
                          items = { anyOf = titled("value", { "First Choice", "Second Choice", "Third Choice" }) } },
        } }, "Elicitation completed: ")
    end },
  { name = "json_schema_2020_12_tool", description = "Tool with JSON Schema 2020-12 features",
    input = { ["$schema"] = "https://json-schema.org/draft/2020-12/schema", type = "object",
              ["$defs"] = { address = { type = "object",
                                        properties = { street = { type = "string" }, city = { type = "string" } } } },
              properties = { name = { type = "string" }, address = { ["$ref"] = "#/$defs/address" } },
              additionalProperties = false },
    call = function(args) return result { text("received " .. json.encode(args)) } end },
}

function M.elicit(ctx, message, requested, prefix)
  if type(ctx.client_capabilities) ~= "table" or ctx.client_capabilities.elicitation == nil then
    return result({ text "the client does not support elicitation" }, true)
  end
  local r, err = ctx.request("elicitation/create", { message = message, requestedSchema = requested })
  if not r then return result({ text("elicitation failed: " .. tostring(err and err.message)) }, true) end
  return result { text(("%saction=%s, content=%s"):format(prefix, tostring(r.action),
    json.encode(r.content or json.object {}))) }
end

local RESOURCES = {
  ["test://static-text"] = { name = "static-text", description = "A static text resource", mimeType = "text/plain",
                             text = "This is the content of the static text resource." },
  ["test://static-binary"] = { name = "static-binary", description = "A static binary resource (PNG)",
                               mimeType = "image/png", blob = M.PNG },
  ["test://watched-resource"] = { name = "watched-resource", description = "A resource to subscribe to",
                                  mimeType = "text/plain", text = "Watched resource content." },
}
local RESOURCE_ORDER = { "test://static-text", "test://static-binary", "test://watched-resource" }

local PROMPTS = {
  { name = "test_simple_prompt", description = "A simple prompt without arguments",
    get = function() return { { role = "user", content = text "This is a simple prompt for testing." } } end },
  { name = "test_prompt_with_arguments", description = "A prompt with two arguments",
    arguments = { { name = "arg1", description = "First test argument", required = true },
                  { name = "arg2", description = "Second test argument", required = true } },
    get = function(a)
      local t = ("Prompt with arguments: arg1='%s', arg2='%s'"):format(a.arg1, a.arg2)
      return { { role = "user", content = text(t) } }
    end },
  { name = "test_prompt_with_embedded_resource", description = "A prompt that embeds a resource",
    arguments = { { name = "resourceUri", description = "URI of the resource to embed", required = true } },
    get = function(a)
      local res = { uri = a.resourceUri, mimeType = "text/plain", text = "Embedded resource content for testing." }
      return { { role = "user", content = { type = "resource", resource = res } },
               { role = "user", content = text "Please process the embedded resource above." } }
    end },
  { name = "test_prompt_with_image", description = "A prompt with an image",
    get = function()
      return { { role = "user", content = { type = "image", data = M.PNG, mimeType = "image/png" } },
               { role = "user", content = text "Please analyze the image above." } }
    end },
}

local Set = {}
Set.__index = Set

--- The fixture set.
function M.new()
  local self = setmetatable({ by_name = {}, prompt_by_name = {}, subscriptions = {} }, Set)
  for _, t in ipairs(TOOLS) do self.by_name[t.name] = t end
  for _, p in ipairs(PROMPTS) do self.prompt_by_name[p.name] = p end
  return self
end

function Set.list(_)
  local t = {}
  for i, d in ipairs(TOOLS) do t[i] = { name = d.name, description = d.description, inputSchema = d.input } end
  return t
end

function Set:call(name, args, ctx)
  local t = self.by_name[name]
  if not t then return nil, { code = -32602, message = ("unknown tool '%s'"):format(tostring(name)) } end
  for _, req in ipairs(t.input.required or {}) do
    if type(args[req]) ~= "string" then
      return nil, { code = -32602, message = ("invalid arguments for tool '%s': $.%s: is required"):format(name, req) }
    end
  end
  return t.call(args, ctx or {})
end

function Set.resources(_)
  local t = {}
  for i, uri in ipairs(RESOURCE_ORDER) do
    local r = RESOURCES[uri]
    t[i] = { uri = uri, name = r.name, description = r.description, mimeType = r.mimeType }
  end
  return t
end

function Set.templates(_)
  return { { uriTemplate = "test://template/{id}/data", name = "template-data",
             description = "Data for an id", mimeType = "application/json" } }
end

function Set.read_resource(_, uri)
  local r = RESOURCES[uri]
  if r then return { { uri = uri, mimeType = r.mimeType, text = r.text, blob = r.blob } } end
  local id = uri:match("^test://template/([^/]+)/data$")
  if id then
    return { { uri = uri, mimeType = "application/json",
               text = json.encode { id = id, templateTest = true, data = "Data for ID: " .. id } } }
  end
  return nil, "resource not found: " .. uri
end

function Set:subscribe(uri)
  self.subscriptions[uri] = true
  return true
end

function Set:unsubscribe(uri)
  self.subscriptions[uri] = nil
  return true
end

function Set.prompts(_)
  local t = {}
  for i, p in ipairs(PROMPTS) do
    t[i] = { name = p.name, description = p.description, arguments = p.arguments and json.array(p.arguments) }
  end
  return t
end

function Set:get_prompt(name, args)
  local p = self.prompt_by_name[name]
  if not p then return nil, { code = -32602, message = ("unknown prompt '%s'"):format(tostring(name)) } end
  for _, a in ipairs(p.arguments or {}) do
    if a.required and type(args[a.name]) ~= "string" then
      return nil, { code = -32602, message = ("prompt '%s' needs argument '%s'"):format(name, a.name) }
    end
  end
  return { description = p.description, messages = json.array(p.get(args)) }
end

local WORDS = { "paris", "park", "party", "test", "testing", "tested" }

function Set.complete(_, _, argument)
  local values = {}
  local prefix = type(argument.value) == "string" and argument.value or ""
  for _, w in ipairs(WORDS) do
    if w:sub(1, #prefix) == prefix then values[#values + 1] = w end
  end
  return { completion = { values = json.array(values), total = #values, hasMore = false } }
end

function Set.close(_) end

return M
