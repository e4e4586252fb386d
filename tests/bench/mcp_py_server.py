#!/usr/bin/env python3
"""The benchmark floor: a plain python3 MCP stdio server (stdlib only, no SDK, no validation)
with one `echo` tool. Used by tests/bench/mcp.lua to show the cost of the bare language."""
import json
import sys

TOOL = {"name": "echo", "description": "Echo the given text back",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "outputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}


def reply(mid, result):
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": mid, "result": result}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    msg = json.loads(line)
    method, mid = msg.get("method"), msg.get("id")
    if mid is None:
        continue
    if method == "initialize":
        reply(mid, {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                    "serverInfo": {"name": "py-echo", "version": "1"}})
    elif method == "tools/list":
        reply(mid, {"tools": [TOOL]})
    elif method == "tools/call":
        text = msg["params"]["arguments"]["text"]
        reply(mid, {"content": [{"type": "text", "text": text}], "structuredContent": {"text": text}})
    else:
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": mid,
                                     "error": {"code": -32601, "message": "method not found"}}) + "\n")
        sys.stdout.flush()
