#!/usr/bin/env bash
# Launch a fedrad hospital node: check the environment, run the preflight, then become the
# Flower SuperNode (exec, so systemd / docker signals reach it directly).
# The node's key pair is made on this machine, once: `fedrad-node keygen --out DIR` (DIR holds
# node.yaml); send only DIR/node-auth.pub to the coordinator. The preflight refuses to start if
# the private key is missing, readable by others, or not the one whose public key was registered.
#
# Usage: fedrad-node.sh [path/to/node.yaml]
#   default: $FEDRAD_NODE_CONFIG, else node.yaml beside this script.
# Environment:
#   FEDRAD_NODE_CONFIG   node.yaml path (overridden by the argument)
#   FEDRAD_VENV          a virtual environment to activate first (optional)
#   FEDRAD_SKIP_CHECK=1  skip the preflight (not recommended)
#   FEDRAD_NODE_DEBUG=1  the SuperNode logs at DEBUG, every request included (default INFO)
#   FEDRAD_QUICK_PULLS=0 keep Flower's 1-10 s waits for objects of a message still being uploaded
#                        (default: retry after 0.05-0.5 s and hand them to the task as they arrive;
#                        for side-by-side measurements only, see benchmarks/deploy_overhead.py)
#   FEDRAD_JEMALLOC=1    run the node with jemalloc instead of glibc malloc (LD_PRELOAD; optional,
#                        off by default). DP training allocates and frees large per-step buffers;
#                        see benchmarks/results/engine.md for what it measured. Needs libjemalloc.so.2
#                        (Debian/Ubuntu: apt-get install libjemalloc2); the node refuses to start if
#                        asked for it and it is missing. FEDRAD_JEMALLOC_LIB=/path overrides the lookup.
# Exit codes: those of `fedrad-node start`: 0 stopped, 2 configuration error, 10 the coordinator
# refuses this node's key (not registered or revoked; final), 1 anything else.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:-${FEDRAD_NODE_CONFIG:-$here/node.yaml}}"

die() { echo "fedrad-node.sh: $*" >&2; exit 1; }

if [[ -n "${FEDRAD_VENV:-}" ]]; then
    [[ -f "$FEDRAD_VENV/bin/activate" ]] || die "FEDRAD_VENV=$FEDRAD_VENV is not a virtual environment"
    # shellcheck disable=SC1091
    source "$FEDRAD_VENV/bin/activate"
fi

if [[ "${FEDRAD_JEMALLOC:-0}" == "1" ]]; then
    lib="${FEDRAD_JEMALLOC_LIB:-}"
    if [[ -z "$lib" ]]; then
        for candidate in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
                         /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2; do
            if [[ -f "$candidate" ]]; then lib="$candidate"; break; fi
        done
    fi
    [[ -n "$lib" && -f "$lib" ]] || die "FEDRAD_JEMALLOC=1 but libjemalloc.so.2 not found (apt-get install libjemalloc2, or set FEDRAD_JEMALLOC_LIB)"
    export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
    echo "fedrad-node.sh: using jemalloc ($lib)" >&2
elif [[ "${FEDRAD_JEMALLOC:-0}" != "0" ]]; then
    die "FEDRAD_JEMALLOC must be 0 or 1 (got ${FEDRAD_JEMALLOC})"
fi

[[ -f "$config" ]] || die "node configuration $config not found (pass its path or set FEDRAD_NODE_CONFIG)"
command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "Python >= 3.11 required (found $(python3 --version 2>&1))"
command -v fedrad-node >/dev/null 2>&1 || die "fedrad-node not on PATH: install fedrad (pip install fedrad) or set FEDRAD_VENV"
command -v flower-supernode >/dev/null 2>&1 || die "flower-supernode not on PATH: install fedrad's dependencies (flwr 1.41)"
[[ "$(id -u)" -ne 0 ]] || echo "fedrad-node.sh: warning: running as root; use a dedicated service account" >&2

# Never install packages at run time; everything comes from this environment.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
umask 077

if [[ "${FEDRAD_SKIP_CHECK:-0}" != "1" ]]; then
    fedrad-node check --config "$config" || die "preflight failed (see the problems and fixes above)"
fi

if [[ "${FEDRAD_NODE_DEBUG:-0}" == "1" ]]; then
    exec fedrad-node start --config "$config" --debug
fi
exec fedrad-node start --config "$config"
