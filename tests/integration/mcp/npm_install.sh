#!/bin/sh
# Installs the npm peers of clawlua's MCP tests and benchmark (the official TypeScript SDK) into
# DIR (default build/npm/mcp) once, and copies this folder's and tests/bench's .mjs files next
# to them (ES modules resolve packages from their own directory).
# usage: tests/integration/mcp/npm_install.sh [DIR]; exit 0 when ready, 1 with the reason.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../.." && pwd)
dir=${1:-build/npm/mcp}
command -v node >/dev/null && command -v npm >/dev/null || { echo "node and npm are not installed" >&2; exit 1; }
mkdir -p "$dir"
# One install at a time (the host and stock runs of a spec start together), and "done" only once
# npm finished: a half-extracted package must not be taken for an installed one.
exec 9>"$dir/.lock"
flock 9
if [ ! -f "$dir/.installed" ] || ! cmp -s "$here/package.json" "$dir/package.json"; then
  rm -f "$dir/.installed"
  cp "$here/package.json" "$dir/"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error >&2) ||
    { echo "npm could not install @modelcontextprotocol/sdk into $dir" >&2; exit 1; }
  touch "$dir/.installed"
fi
cp "$here"/*.mjs "$src"/tests/bench/mcp*.mjs "$dir/"
