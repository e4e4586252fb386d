/*
 * The ceiling of tests/bench/mcp.lua: an "MCP server" that parses nothing. It finds the id and
 * the method of each line by substring and writes a canned answer (the echo tool's text copied
 * back), so what the benchmark measures against it is the client, the pipes and the wake-ups
 * alone: no server can answer the same client faster than this.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LINE_MAX_BYTES 65536

static void reply(const char *line) {
  char out[LINE_MAX_BYTES + 512];
  const char *idp = strstr(line, "\"id\":");
  if (!idp || !strstr(line, "\"method\"")) return; /* a notification */
  long id = strtol(idp + 5, NULL, 10);
  int n;
  if (strstr(line, "\"initialize\""))
    n = snprintf(out, sizeof out,
                 "{\"jsonrpc\":\"2.0\",\"id\":%ld,\"result\":{\"protocolVersion\":\"2025-11-25\","
                 "\"capabilities\":{\"tools\":{}},\"serverInfo\":{\"name\":\"ceiling\","
                 "\"version\":\"1\"}}}\n",
                 id);
  else if (strstr(line, "\"tools/list\""))
    n = snprintf(out, sizeof out,
                 "{\"jsonrpc\":\"2.0\",\"id\":%ld,\"result\":{\"tools\":[{\"name\":\"echo\","
                 "\"inputSchema\":{\"type\":\"object\"}}]}}\n",
                 id);
  else if (strstr(line, "\"tools/call\"")) {
    const char *t = strstr(line, "\"text\":\"");
    const char *e = t ? strchr(t + 8, '"') : NULL;
    int len = e ? (int)(e - (t + 8)) : 0;
    const char *text = e ? t + 8 : "";
    n = snprintf(out, sizeof out,
                 "{\"jsonrpc\":\"2.0\",\"id\":%ld,\"result\":{\"content\":[{\"type\":\"text\","
                 "\"text\":\"%.*s\"}],\"structuredContent\":{\"text\":\"%.*s\"}}}\n",
                 id, len, text, len, text);
  } else
    n = snprintf(out, sizeof out, "{\"jsonrpc\":\"2.0\",\"id\":%ld,\"result\":{}}\n", id);
  if (n > 0 && write(1, out, (size_t)n) != n) exit(1);
}

int main(void) {
  static char buf[LINE_MAX_BYTES];
  size_t have = 0;
  for (;;) {
    ssize_t r = read(0, buf + have, sizeof buf - 1 - have);
    if (r <= 0) return 0;
    have += (size_t)r;
    buf[have] = 0;
    char *s = buf, *nl;
    while ((nl = memchr(s, '\n', (size_t)(buf + have - s)))) {
      *nl = 0;
      reply(s);
      s = nl + 1;
    }
    have = (size_t)(buf + have - s);
    memmove(buf, s, have);
    if (have == sizeof buf - 1) have = 0; /* a line longer than the buffer: dropped */
  }
}
