#!/usr/bin/env bash
# Launch the fedrad coordinator: the Flower SuperLink with TLS and SuperNode authentication.
#
# Usage: fedrad-coordinator.sh PROVISIONING_DIR
#   PROVISIONING_DIR/coordinator/{ca.pem,superlink.pem,superlink.key} are used; ca.key is not.
# Environment:
#   FEDRAD_PORT (8000)  FEDRAD_HOST (0.0.0.0)  FEDRAD_STATE (/var/lib/fedrad)
#   FEDRAD_CONTROL_ADDRESS (127.0.0.1:$FEDRAD_PORT): where the local `flwr` CLI reaches the
#   Control API; must be a name or IP in the SuperLink certificate's SANs.
# Also writes $FLWR_HOME/config.toml (default $FEDRAD_STATE/flwr) with a `fedrad` connection, so
# `flwr run deploy/app fedrad` and deploy/sync-supernodes.py work on this machine.
set -euo pipefail

die() { echo "fedrad-coordinator.sh: $*" >&2; exit 1; }

prov="${1:-${FEDRAD_PROVISIONING:-}}"
[[ -n "$prov" ]] || die "usage: fedrad-coordinator.sh PROVISIONING_DIR"
coord="$prov/coordinator"
port="${FEDRAD_PORT:-8000}"
host="${FEDRAD_HOST:-0.0.0.0}"
state="${FEDRAD_STATE:-/var/lib/fedrad}"
export FLWR_HOME="${FLWR_HOME:-$state/flwr}"

for f in ca.pem superlink.pem superlink.key; do
    [[ -f "$coord/$f" ]] || die "$coord/$f missing: run 'fedrad provision --config federation.yaml --out $prov' first"
done
if [[ -f "$coord/ca.key" ]]; then
    echo "fedrad-coordinator.sh: warning: $coord/ca.key is on the running coordinator; move it offline" >&2
fi
mode="$(stat -c '%a' "$coord/superlink.key")"
[[ "$mode" == "600" || "$mode" == "400" ]] || die "$coord/superlink.key has mode $mode; run: chmod 600 $coord/superlink.key"
command -v flower-superlink >/dev/null 2>&1 || die "flower-superlink not on PATH: install fedrad (flwr 1.41)"
python3 -c 'import fedrad.server.app' 2>/dev/null || die "fedrad is not importable here: the SuperLink runs fedrad.server.app"

mkdir -p "$state" "$FLWR_HOME"
umask 077
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedrad"

[superlink.fedrad]
address = "${FEDRAD_CONTROL_ADDRESS:-127.0.0.1:$port}"
root-certificates = "$(cd "$coord" && pwd)/ca.pem"
TOML

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-superlink \
    --ssl-ca-certfile "$coord/ca.pem" \
    --ssl-certfile "$coord/superlink.pem" \
    --ssl-keyfile "$coord/superlink.key" \
    --enable-supernode-auth \
    --host "$host" --port "$port" \
    --database "$state/superlink.db" \
    --disable-runtime-dependency-installation
