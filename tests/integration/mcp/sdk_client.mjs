#!/usr/bin/env node
// Drives `clawlua mcp` with the official TypeScript SDK client (@modelcontextprotocol/sdk).
// usage: node sdk_client.mjs [--full] -- <server command> [args...]
// Prints "ok <step>" per check and exits 0 when every check passed, 1 at the first failure.
// Without --full it checks the protocol and the tools that need no sandbox; with --full it
// also creates a real sandbox, runs commands in it (with progress and a cancellation), moves
// files, reads the audit and destroys it. The SDK validates every structuredContent against
// the tool's outputSchema, so a result of the wrong shape fails here.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { LoggingMessageNotificationSchema } from '@modelcontextprotocol/sdk/types.js';

const argv = process.argv.slice(2);
const sep = argv.indexOf('--');
const opts = argv.slice(0, sep);
const cmd = argv.slice(sep + 1);
const full = opts.includes('--full');

function check(cond, step, detail) {
  if (!cond) throw new Error(`${step}: ${detail === undefined ? 'check failed' : JSON.stringify(detail)}`);
  console.log(`ok ${step}`);
}

async function expectError(promise, code, step) {
  try {
    await promise;
  } catch (e) {
    check(e.code === code, step, { code: e.code, message: e.message });
    return e;
  }
  throw new Error(`${step}: expected JSON-RPC error ${code}, got a result`);
}

const transport = new StdioClientTransport({ command: cmd[0], args: cmd.slice(1), stderr: 'inherit', env: process.env });
const client = new Client({ name: 'clawlua-sdk-test', version: '1.0.0' }, { capabilities: {} });
const logs = [];
client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => logs.push(n.params));

try {
  await client.connect(transport);
  check(client.getServerVersion()?.name === 'clawlua', 'initialize', client.getServerVersion());
  check(client.getServerCapabilities()?.tools !== undefined, 'capabilities.tools');
  await client.ping();
  console.log('ok ping');

  const { tools } = await client.listTools();
  const names = tools.map((t) => t.name);
  check(JSON.stringify(names) === JSON.stringify(['sandbox_create', 'sandbox_exec', 'sandbox_write_file',
    'sandbox_read_file', 'sandbox_list', 'sandbox_destroy', 'sandbox_update_policy', 'audit_query',
    'policy_show']), 'tools/list order', names);
  check(tools.every((t) => t.inputSchema?.type === 'object' && t.outputSchema), 'tool schemas');

  const aq = await client.callTool({ name: 'audit_query', arguments: { limit: 5 } });
  check(!aq.isError && Array.isArray(aq.structuredContent.events), 'audit_query', aq);
  const miss = await client.callTool({ name: 'sandbox_exec', arguments: { id: 'nope', command: ['true'] } });
  check(miss.isError === true && /no sandbox 'nope'/.test(miss.content[0].text), 'missing sandbox is isError', miss);
  await expectError(client.callTool({ name: 'sandbox_exec', arguments: { id: 1 } }), -32602, 'bad arguments are -32602');
  await expectError(client.callTool({ name: 'no_such_tool', arguments: {} }), -32602, 'unknown tool is -32602');

  const { resources } = await client.listResources();
  check(resources.map((r) => r.uri).join(' ') === 'clawlua://audit clawlua://sandboxes', 'resources/list', resources);
  const rr = await client.readResource({ uri: 'clawlua://sandboxes' });
  check(Array.isArray(JSON.parse(rr.contents[0].text).sandboxes), 'resources/read');
  await expectError(client.readResource({ uri: 'clawlua://nope' }), -32002, 'unknown resource is -32002');

  await client.setLoggingLevel('info');
  console.log('ok logging/setLevel');

  if (full) {
    const ps = await client.callTool({ name: 'policy_show', arguments: {} });
    check(!ps.isError && typeof ps.structuredContent.backend === 'string', 'policy_show', ps);
    const cr = await client.callTool({ name: 'sandbox_create', arguments: {} });
    check(!cr.isError && typeof cr.structuredContent.id === 'string', 'sandbox_create', cr);
    const id = cr.structuredContent.id;
    const ex = await client.callTool({ name: 'sandbox_exec', arguments: { id, command: ['sh', '-c', 'echo hi; echo oops >&2; exit 3'] } });
    check(!ex.isError && ex.structuredContent.exit_code === 3 && ex.structuredContent.stdout === 'hi\n' &&
      ex.structuredContent.stderr === 'oops\n', 'sandbox_exec (exit 3 is a result)', ex);
    const wr = await client.callTool({ name: 'sandbox_write_file', arguments: { id, path: '/tmp/in.txt', content: 'hello sandbox\n' } });
    check(!wr.isError && wr.structuredContent.bytes === 14, 'sandbox_write_file', wr);
    await client.callTool({ name: 'sandbox_exec', arguments: { id, command: ['sh', '-c', 'tr a-z A-Z </tmp/in.txt >/tmp/out.txt'] } });
    const rd = await client.callTool({ name: 'sandbox_read_file', arguments: { id, path: '/tmp/out.txt' } });
    check(!rd.isError && rd.structuredContent.content === 'HELLO SANDBOX\n', 'sandbox_read_file', rd);
    const rb = await client.callTool({ name: 'sandbox_read_file', arguments: { id, path: '/tmp/out.txt', encoding: 'base64' } });
    check(Buffer.from(rb.structuredContent.content, 'base64').toString() === 'HELLO SANDBOX\n', 'sandbox_read_file base64', rb);

    const progress = [];
    const slow = await client.callTool({ name: 'sandbox_exec', arguments: { id, command: ['sleep', '2.5'], timeout_s: 20 } },
      undefined, { onprogress: (p) => progress.push(p), timeout: 60000 });
    check(!slow.isError && slow.structuredContent.exit_code === 0 && progress.length >= 2, 'progress during a long exec', { progress });

    const ac = new AbortController();
    const t0 = performance.now();
    const long = client.callTool({ name: 'sandbox_exec', arguments: { id, command: ['sleep', '30'] } }, undefined, { signal: ac.signal, timeout: 60000 });
    await new Promise((r) => setTimeout(r, 300));
    await client.ping(); // answered while the exec runs
    check(performance.now() - t0 < 2000, 'ping answered during a 30 s exec');
    ac.abort('test');
    await long.then(() => { throw new Error('cancelled call resolved'); }, () => {});
    const after = await client.callTool({ name: 'sandbox_exec', arguments: { id, command: ['sh', '-c', 'pgrep -x sleep || echo none'] } });
    check(after.structuredContent.stdout.trim() === 'none', 'cancellation kills the command', after);

    const ls = await client.callTool({ name: 'sandbox_list', arguments: {} });
    check(ls.structuredContent.sandboxes.some((s) => s.id === id), 'sandbox_list', ls);
    const au = await client.callTool({ name: 'audit_query', arguments: { sandbox: id, limit: 50 } });
    check(au.structuredContent.events.length > 0, 'audit_query for the sandbox', au.structuredContent.events.length);
    const de = await client.callTool({ name: 'sandbox_destroy', arguments: { id } });
    check(!de.isError && de.structuredContent.destroyed === true, 'sandbox_destroy', de);
    const ls2 = await client.callTool({ name: 'sandbox_list', arguments: {} });
    check(ls2.structuredContent.sandboxes.length === 0, 'sandbox gone', ls2);
    check(logs.length > 0, 'log notifications at the client level', logs.length);
  }
  await client.close();
  console.log('ALL OK');
  process.exit(0);
} catch (e) {
  console.log(`FAILED: ${e?.message ?? e}`);
  try { await client.close(); } catch { /* already closed */ }
  process.exit(1);
}
