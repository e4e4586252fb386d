#!/usr/bin/env node
// The benchmark peer of tests/bench/mcp.lua, the team's reference server unchanged below this line.
// Minimal MCP stdio server built with @modelcontextprotocol/sdk (v1.x) McpServer.
// One tool: "echo" {text: string} -> text content + structuredContent {text}.
// stdout carries only JSON-RPC (newline-delimited); logs go to stderr.
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { z } from 'zod';

const server = new McpServer({ name: 'ts-echo-server', version: '1.0.0' });

server.registerTool(
  'echo',
  {
    title: 'Echo',
    description: 'Echo the given text back',
    inputSchema: { text: z.string().describe('Text to echo') },
    outputSchema: { text: z.string() },
  },
  async ({ text }) => ({
    content: [{ type: 'text', text }],
    structuredContent: { text },
  }),
);

await server.connect(new StdioServerTransport());
process.stderr.write('ts-echo-server: ready on stdio\n');
