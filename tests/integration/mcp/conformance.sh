#!/bin/sh
# Runs the official MCP conformance suite (@modelcontextprotocol/conformance, server scenarios,
# the "active" suite) against `clawlua mcp --conformance-fixtures`, reached through the
# supergateway stdio -> Streamable HTTP bridge. Bridge and suite run inside a network
# namespace this script creates (loopback only) and removes.
# usage: tests/integration/mcp/conformance.sh CLAWLUA_BIN [NPM_DIR] [-- conformance args...]
# Prints the suite's output; exit status: the suite's (non-zero when a scenario failed),
# 3 when the npm packages cannot be installed, 4 without root (network namespaces).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "$1")
dir=${2:-build/npm/conformance}
shift 2 2>/dev/null || shift $#
[ "${1:-}" = "--" ] && shift
[ "$(id -u)" = 0 ] || { echo "conformance.sh: needs root (a network namespace)" >&2; exit 4; }
command -v npm >/dev/null || { echo "conformance.sh: npm is not installed" >&2; exit 3; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# One install at a time (the host and stock runs start together); "done" once npm finished.
exec 9>"$dir/.lock"
flock 9
if [ ! -f "$dir/.installed" ] || ! cmp -s "$here/conformance/package.json" "$dir/package.json"; then
  rm -f "$dir/.installed"
  cp "$here/conformance/package.json" "$dir/"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error >&2) ||
    { echo "conformance.sh: npm could not install the conformance suite, node 22 and supergateway" >&2; exit 3; }
  touch "$dir/.installed"
fi
exec 9>&-
node22="$dir/node_modules/.bin/node"
ns="clawlua-mcpconf-$$"
port=38123
gw=""
cleanup() {
  [ -n "$gw" ] && kill "$gw" 2>/dev/null && wait "$gw" 2>/dev/null
  ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" "$node22" "$dir/node_modules/supergateway/dist/index.js" \
  --stdio "$bin mcp --conformance-fixtures --log-level off" \
  --outputTransport streamableHttp --stateful --port "$port" >"$dir/supergateway.log" 2>&1 &
gw=$!
i=0
until grep -q "Listening on port" "$dir/supergateway.log" 2>/dev/null; do
  i=$((i + 1))
  [ $i -gt 100 ] && { echo "conformance.sh: the bridge did not start:" >&2; cat "$dir/supergateway.log" >&2; exit 1; }
  sleep 0.1
done
cd "$dir"
ip netns exec "$ns" "$node22" "$dir/node_modules/@modelcontextprotocol/conformance/dist/index.js" \
  server --url "http://127.0.0.1:$port/mcp" "$@"
