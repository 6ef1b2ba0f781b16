#!/bin/sh
# Entrypoint of the fedrad images: the command always runs as a non-root user, however the container
# is started (`--user`, compose's FEDRAD_UID, or root).
#   started as root:     drops to the owner of $FEDRAD_OWNER_REF (the node's kit / the provisioning
#                        folder: that user owns its private key, 0600) or, if root owns that too,
#                        refuses; makes the state folder that user's first (a fresh volume is 10001's).
#   started as non-root: runs as that user; the state folder must be writable by it.
# Usage: container-entrypoint.sh COMMAND [ARGS...]
set -eu

state="${FEDRAD_STATE_DIR:-/var/lib/fedrad}"
ref="${FEDRAD_OWNER_REF:-}"
die() { echo "fedrad: $*" >&2; exit 78; }  # 78: EX_CONFIG

if [ "$(id -u)" = 0 ]; then
    [ -n "$ref" ] && [ -e "$ref" ] || die "started as root and $ref (whose owner the service runs as) is missing"
    uid="$(stat -c %u "$ref")"
    gid="$(stat -c %g "$ref")"
    [ "$uid" != 0 ] || die "refusing to run as root: $ref belongs to root. Give the folder mounted there (and \
its private key) to the service account, e.g. 'chown -R 10001:10001 <that folder>' on the host, or start the \
container with --user <owner uid>:<gid> (compose: FEDRAD_UID/FEDRAD_GID, never 0)"
    mkdir -p "$state"
    if [ "$(stat -c %u "$state")" != "$uid" ]; then
        chown -R "$uid:$gid" "$state"
    fi
    chmod 0700 "$state"
    echo "fedrad: started as root; running as uid $uid (owner of $ref)" >&2
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all --bounding-set=-all \
        -- "$0" "$@"
fi

if [ ! -w "$state" ] || [ ! -x "$state" ]; then
    die "state folder $state is not writable by uid $(id -u) (it belongs to uid $(stat -c %u "$state")). Start \
the container as root (the entrypoint then runs as the owner of $ref and hands it the state folder), as \
--user $(stat -c %u "$state"), or give the volume to uid $(id -u)"
fi
umask 077
exec "$@"
