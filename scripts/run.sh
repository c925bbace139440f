#!/usr/bin/env bash
# Install what anontrace needs (scripts/install.sh) and run it, as root.
#   scripts/run.sh              check the kernel, then show the live top view
#                               of anon_vmas system-wide (`anontrace top`: q or
#                               Ctrl-C to end)
#   scripts/run.sh ARGS...      run `anontrace ARGS...` instead, e.g.
#                               scripts/run.sh -p 1234 -i 5
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
if [ "$#" -gt 0 ]; then
    exec .venv/bin/anontrace "$@"
fi
.venv/bin/anontrace check
exec .venv/bin/anontrace top
