#!/bin/sh
# A script of unknown origin: the untrusted_script example runs it in a sandbox.
echo "collecting facts"
echo "kernel: $(uname -s)"
echo "entries here: $(ls | wc -l)"
echo "warning: cannot reach the update server" >&2
exit 3
