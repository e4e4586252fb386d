#!/usr/bin/env python3
"""A scripted chat-model server for clawlua's LLM and agent tests (python3 standard library).

Listens on 127.0.0.1 (an ephemeral port, printed as the first stdout line) and answers both wire
formats: POST /v1/chat/completions (OpenAI) and POST /v1/messages (Anthropic), streamed (SSE)
when the request asks for it, whole otherwise. It replays a script: the n-th model request gets
the n-th turn. It records every request it receives.

  model_server.py [SCRIPT.json]
  POST /_script     replace the script (JSON body) and forget the requests recorded so far
  GET  /_requests   [{"path", "headers", "body"}...] every model request received, in order

Script: {"turns": [TURN...], "repeat_last": false}. With repeat_last, the last turn answers
every request beyond the end (a model that never stops calling tools); otherwise such a request
gets a 500. A TURN is one of
  {"text": "...", "tool_calls": [{"id", "name", "arguments": {..} | "raw text"}],
   "usage": {"input": N, "output": N}, "stop": "end_turn"|..., "delay": seconds,
   "chunk": N (text piece size when streamed), "cut": true (stream cut mid-event),
   "unknown_event": true (an event type the client cannot know), "error_event": "type"}
  {"status": 429, "headers": {"Retry-After": "1"}, "error": "message", "error_type": "..."}
  {"raw": "text sent as the body as it is"}       (malformed JSON; streamed: as an event's data)
"{{sandbox}}" anywhere in a turn becomes the id that the request's first user message names as
"sandbox ID" (the examples create a sandbox and name it in the task), else the last sandbox id
("sb-...") a tool result in the request carries (the model created it with sandbox_create).
"""
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"script": {"turns": []}, "n": 0, "requests": []}


def next_turn():
    with LOCK:
        turns = STATE["script"].get("turns", [])
        n = STATE["n"]
        STATE["n"] = n + 1
        if n < len(turns):
            return n, turns[n]
        if STATE["script"].get("repeat_last") and turns:
            return n, turns[-1]
        return n, {"status": 500, "error": "script exhausted after %d turns" % len(turns)}


def first_user_text(req):
    for m in req.get("messages", []):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return "".join(b.get("text", "") for b in c if isinstance(b, dict))
    return ""


def substitute(t, req):
    """Replaces {{sandbox}} in a turn by the id the task names ("sandbox ID")."""
    m = re.search(r"sandbox ([A-Za-z0-9_.:-]+)", first_user_text(req))
    if m:
        sid = m.group(1)
    else:
        found = re.findall(r"\b(sb-[0-9a-f]{8,})\b", json.dumps(req.get("messages", [])))
        if not found:
            return t
        sid = found[-1]
    return json.loads(json.dumps(t).replace("{{sandbox}}", sid))


def call_id(n, i, call):
    return call.get("id") or "call_%d_%d" % (n, i)


def args_text(call):
    a = call.get("arguments", {})
    return a if isinstance(a, str) else json.dumps(a)


def pieces(s, size):
    size = max(1, size)
    return [s[i:i + size] for i in range(0, len(s), size)] or [""]


def openai_whole(n, t):
    msg = {"role": "assistant", "content": t.get("text")}
    calls = t.get("tool_calls") or []
    if calls:
        msg["tool_calls"] = [{"id": call_id(n, i, c), "type": "function",
                              "function": {"name": c["name"], "arguments": args_text(c)}}
                             for i, c in enumerate(calls)]
    u = t.get("usage", {})
    return {"id": "chatcmpl-%d" % n, "object": "chat.completion", "model": "scripted",
            "choices": [{"index": 0, "message": msg,
                         "finish_reason": t.get("stop") or ("tool_calls" if calls else "stop")}],
            "usage": {"prompt_tokens": u.get("input", 10), "completion_tokens": u.get("output", 5)}}


def openai_events(n, t):
    def chunk(delta, finish=None):
        return {"id": "chatcmpl-%d" % n, "object": "chat.completion.chunk", "model": "scripted",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    yield None, chunk({"role": "assistant"})
    for p in pieces(t.get("text") or "", t.get("chunk", 7)) if t.get("text") else []:
        yield None, chunk({"content": p})
    calls = t.get("tool_calls") or []
    parts = [pieces(args_text(c), t.get("chunk", 7)) for c in calls]
    for i, c in enumerate(calls):  # every call opens first, then arguments arrive interleaved
        yield None, chunk({"tool_calls": [{"index": i, "id": call_id(n, i, c), "type": "function",
                                           "function": {"name": c["name"], "arguments": ""}}]})
    for k in range(max((len(p) for p in parts), default=0)):
        for i, p in enumerate(parts):
            if k < len(p):
                yield None, chunk({"tool_calls": [{"index": i, "function": {"arguments": p[k]}}]})
    if t.get("unknown_event"):
        yield None, {"object": "chat.completion.future", "something": True}
    yield None, chunk({}, t.get("stop") or ("tool_calls" if calls else "stop"))
    u = t.get("usage", {})
    yield None, {"id": "chatcmpl-%d" % n, "object": "chat.completion.chunk", "choices": [],
                 "usage": {"prompt_tokens": u.get("input", 10), "completion_tokens": u.get("output", 5)}}
    yield None, "[DONE]"


def anthropic_whole(n, t):
    content = []
    if t.get("text"):
        content.append({"type": "text", "text": t["text"]})
    calls = t.get("tool_calls") or []
    for i, c in enumerate(calls):
        a = c.get("arguments", {})
        content.append({"type": "tool_use", "id": call_id(n, i, c), "name": c["name"],
                        "input": a if not isinstance(a, str) else a})
    u = t.get("usage", {})
    return {"id": "msg_%d" % n, "type": "message", "role": "assistant", "model": "scripted",
            "content": content, "stop_reason": t.get("stop") or ("tool_use" if calls else "end_turn"),
            "usage": {"input_tokens": u.get("input", 10), "output_tokens": u.get("output", 5)}}


def anthropic_events(n, t):
    u = t.get("usage", {})
    yield "message_start", {"type": "message_start", "message": {
        "id": "msg_%d" % n, "type": "message", "role": "assistant", "model": "scripted", "content": [],
        "stop_reason": None, "usage": {"input_tokens": u.get("input", 10), "output_tokens": 1}}}
    idx = 0
    if t.get("text"):
        yield "content_block_start", {"type": "content_block_start", "index": idx,
                                      "content_block": {"type": "text", "text": ""}}
        yield "ping", {"type": "ping"}
        for p in pieces(t["text"], t.get("chunk", 7)):
            yield "content_block_delta", {"type": "content_block_delta", "index": idx,
                                          "delta": {"type": "text_delta", "text": p}}
        yield "content_block_stop", {"type": "content_block_stop", "index": idx}
        idx += 1
    calls = t.get("tool_calls") or []
    for i, c in enumerate(calls):
        yield "content_block_start", {"type": "content_block_start", "index": idx, "content_block": {
            "type": "tool_use", "id": call_id(n, i, c), "name": c["name"], "input": {}}}
        for p in pieces(args_text(c), t.get("chunk", 7)):
            yield "content_block_delta", {"type": "content_block_delta", "index": idx,
                                          "delta": {"type": "input_json_delta", "partial_json": p}}
        yield "content_block_stop", {"type": "content_block_stop", "index": idx}
        idx += 1
    if t.get("unknown_event"):
        yield "future_event", {"type": "future_event", "anything": 1}
    if t.get("error_event"):
        yield "error", {"type": "error", "error": {"type": t["error_event"], "message": "Overloaded"}}
    yield "message_delta", {"type": "message_delta", "delta": {
        "stop_reason": t.get("stop") or ("tool_use" if calls else "end_turn")},
        "usage": {"output_tokens": u.get("output", 5)}}
    yield "message_stop", {"type": "message_stop"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One segment per response: headers and body written separately would meet the client's
    # delayed ACK (40 ms a request on keep-alive connections).
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def send_json(self, code, doc, headers=None):
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/_requests":
            with LOCK:
                return self.send_json(200, STATE["requests"])
        self.send_json(404, {"error": "no such path"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path == "/_script":
            with LOCK:
                STATE["script"] = json.loads(raw)
                STATE["n"] = 0
                STATE["requests"] = []
            return self.send_json(200, {"ok": True})
        if self.path not in ("/v1/chat/completions", "/v1/messages"):
            return self.send_json(404, {"error": "no such path"})
        try:
            req = json.loads(raw)
        except ValueError:
            req = None
        with LOCK:
            STATE["requests"].append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": req})
        if req is None:
            return self.send_json(400, {"error": {"type": "invalid_request_error", "message": "body is not JSON"}})
        n, t = next_turn()
        t = substitute(t, req)
        if t.get("delay"):
            time.sleep(t["delay"])
        anthropic = self.path == "/v1/messages"
        if "status" in t:
            if anthropic:
                err = {"type": "error", "error": {"type": t.get("error_type", "overloaded_error"),
                                                  "message": t.get("error", "try later")}}
            else:
                err = {"error": {"type": t.get("error_type", "rate_limit_exceeded"),
                                 "message": t.get("error", "try later")}}
            return self.send_json(t["status"], err, t.get("headers"))
        if not req.get("stream"):
            if "raw" in t:
                return self.send_json(200, t["raw"].encode())
            return self.send_json(200, anthropic_whole(n, t) if anthropic else openai_whole(n, t))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        out = []
        if "raw" in t:
            out.append("data: %s\n\n" % t["raw"])
        else:
            events = anthropic_events(n, t) if anthropic else openai_events(n, t)
            for name, doc in events:
                data = doc if isinstance(doc, str) else json.dumps(doc)
                out.append(("event: %s\n" % name if name else "") + "data: %s\n\n" % data)
        if t.get("cut"):  # stop in the middle of an event, half-way through the answer
            half = out[: max(1, len(out) // 2)]
            last = half[-1]
            half[-1] = last[: len(last) // 2]
            out = half
        self.wfile.write("".join(out).encode())
        self.wfile.flush()
        self.close_connection = True


def main():
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as f:
            STATE["script"] = json.load(f)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    print(srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
