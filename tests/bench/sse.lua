-- A 10 MB streamed model answer (OpenAI chat-completion chunks and Anthropic events, as server-
-- sent events in 16 KiB network chunks) through clawlua.llm.sse and the JSON path, against
-- Debian's lua-cjson decoding the same event payloads (the peer), measured in the same run.
--   build/bin/clawlua tests/bench/sse.lua [megabytes=10]
local json = require "clawlua.json"
local cjson = require "cjson"
local sse = require "clawlua.llm.sse"
local openai = require "clawlua.llm.openai"
local anthropic = require "clawlua.llm.anthropic"

local target = (tonumber(arg and arg[1]) or 10) * 1024 * 1024
local CHUNK = 16 * 1024

local WORDS = { "the", "sandbox", "ran", "every", "command", "under", "its", "policy", "and", "wrote",
                "a", "report", "with", "numbers", "like", "42", "émigré", "naïve", "\"quoted\"", "line\n" }

-- The stream as text, and the JSON payloads of its events (what the peer decodes).
local function build(kind)
  local parts, payloads, size, i = {}, {}, 0, 0
  while size < target do
    i = i + 1
    local text = WORDS[i % #WORDS + 1] .. " " .. WORDS[(i * 7) % #WORDS + 1] .. " "
    local data, ev
    if kind == "openai" then
      data = json.encode { id = "chatcmpl-1", object = "chat.completion.chunk", created = 1700000000,
                           model = "scripted", choices = { { index = 0, delta = { content = text },
                                                             finish_reason = json.null } } }
      ev = "data: " .. data .. "\n\n"
    else
      data = json.encode { type = "content_block_delta", index = 0, delta = { type = "text_delta", text = text } }
      ev = "event: content_block_delta\ndata: " .. data .. "\n\n"
    end
    payloads[#payloads + 1] = data
    parts[#parts + 1] = ev
    size = size + #ev
  end
  local head, tail
  if kind == "openai" then
    head = ""
    tail = 'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
  else
    head = 'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":5}}}\n\n' ..
           'event: content_block_start\ndata: {"type":"content_block_start","index":0,' ..
           '"content_block":{"type":"text","text":""}}\n\n'
    tail = 'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},' ..
           '"usage":{"output_tokens":9}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
  end
  local stream = head .. table.concat(parts) .. tail
  local chunks = {}
  for k = 1, #stream, CHUNK do chunks[#chunks + 1] = stream:sub(k, k + CHUNK - 1) end
  return chunks, payloads, #stream
end

-- The best of n runs, in CPU time (os.clock): the machine is shared, wall time is noisy.
local function best(n, fn)
  local t = math.huge
  for _ = 1, n do
    collectgarbage("collect")
    local t0 = os.clock()
    fn()
    t = math.min(t, os.clock() - t0)
  end
  return t
end

for _, kind in ipairs { "openai", "anthropic" } do
  local chunks, payloads, bytes = build(kind)
  local peer = best(7, function()
    local decode = cjson.decode
    for i = 1, #payloads do decode(payloads[i]) end
  end)
  -- Each side holds only its own input while it runs: the peer its payloads, ours the chunks
  -- (80 k live strings would tax every collection of the side that allocates more).
  local n_events = #payloads
  payloads = nil -- luacheck: ignore 311
  collectgarbage("collect")
  local parse_only = best(7, function()
    local p = sse.new { on_event = function() end }
    for i = 1, #chunks do p:feed(chunks[i]) end
    assert(p:finish())
  end)
  local sse_json = best(7, function()
    local decode = json.decode
    local p = sse.new { on_event = function(ev) if ev.data ~= "[DONE]" then decode(ev.data) end end }
    for i = 1, #chunks do p:feed(chunks[i]) end
    assert(p:finish())
  end)
  local answer
  local full = best(7, function()
    local st = (kind == "openai" and openai or anthropic).stream(nil)
    local p = sse.new { on_event = function(ev) return assert(st:event(ev)) end }
    for i = 1, #chunks do assert(p:feed(chunks[i])) end
    assert(p:finish())
    answer = assert(st:finish())
  end)
  local text = answer.message.content[1].text
  print(("%s stream: %.1f MB, %d events, answer %.1f MB"):format(kind, bytes / 2 ^ 20, n_events, #text / 2 ^ 20))
  print(("  lua-cjson decoding the %d payloads (peer): %7.1f ms"):format(n_events, peer * 1000))
  print(("  sse parser alone:                          %7.1f ms"):format(parse_only * 1000))
  print(("  sse + clawlua.json:                        %7.1f ms  = %.2fx lua-cjson"):format(sse_json * 1000,
    sse_json / peer))
  print(("  sse + json + answer assembly (llm.%s): %7.1f ms  = %.2fx lua-cjson (target <= 2x)"):format(kind,
    full * 1000, full / peer))
end
