#!/usr/bin/env node
// The benchmark peer: an MCP stdio server on the official TypeScript SDK (McpServer) with one
// tool, `echo` {text} -> text content + structuredContent {text}. Used by tests/bench/mcp.lua.
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { z } from 'zod';

const server = new McpServer({ name: 'ts-sdk-echo', version: '1.0.0' });
server.registerTool('echo', {
  title: 'Echo',
  description: 'Echo the given text back',
  inputSchema: { text: z.string() },
  outputSchema: { text: z.string() },
}, async ({ text }) => ({ content: [{ type: 'text', text }], structuredContent: { text } }));
await server.connect(new StdioServerTransport());
