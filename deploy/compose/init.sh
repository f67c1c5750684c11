#!/usr/bin/env bash
# One-shot set-up for deploy/docker-compose.yml: the federation key, a CA, the
# server's and the nodes' certificates, and their configuration files.
#
# Output layout (each top-level folder is its own named volume in compose, so a
# container mounts only what its party may hold):
#
#   $OUT/authority/ca/      the federation CA (ca.key 0600, ca.crt, crl.pem, issued.json)
#   $OUT/authority/keys/    secret.ctx (0600), public.ctx, fingerprint
#   $OUT/server/            server.crt, server.key, ca.crt, crl.pem, public.ctx, server.toml,
#                           layout.json (the model layout the server pins, from node-1's model)
#   $OUT/node-N/            node-N.crt, node-N.key, node-N.enrol.crt, node-N.enrol.key (0600),
#                           ca.crt, secret.ctx (0600), node-N.toml
#
# The server's folder never receives secret.ctx. Paths inside the TOML files are
# relative (cipherhive resolves them against the file's folder), so the same files
# work wherever the folder is mounted; state_dir is absolute (the image's VOLUME).
#
# Idempotent: keys, the CA and certificates are created only when missing, so
# re-running it (every `docker compose up`) never replaces the federation key
# (that would make the server's stored sums undecryptable). It refreshes the
# server's copy of crl.pem and rewrites the TOML files every time.
#
# Environment (all optional):
#   CIPHERHIVE_INIT_OUT           output root                         (default /out)
#   CIPHERHIVE_INIT_NODES         number of member nodes              (default 3)
#   CIPHERHIVE_INIT_SERVER_HOSTS  names in the server certificate     (default "server localhost")
#   CIPHERHIVE_INIT_SERVER_ADDR   address the nodes dial              (default server:7443)
#   CIPHERHIVE_INIT_STATE_DIR     state_dir written into the configs  (default /var/lib/cipherhive)
#   CIPHERHIVE_INIT_UID           owner of the output when run as root (default 10001)
#   CIPHERHIVE_INIT_MAX_ROUNDS    [rounds] max_rounds of the server   (default 0: never stop)
#   CIPHERHIVE_BIN                the cipherhive command              (default cipherhive on PATH)
set -euo pipefail
umask 077

out="${CIPHERHIVE_INIT_OUT:-/out}"
nodes="${CIPHERHIVE_INIT_NODES:-3}"
server_hosts="${CIPHERHIVE_INIT_SERVER_HOSTS:-server localhost}"
server_addr="${CIPHERHIVE_INIT_SERVER_ADDR:-server:7443}"
state_dir="${CIPHERHIVE_INIT_STATE_DIR:-/var/lib/cipherhive}"
owner="${CIPHERHIVE_INIT_UID:-10001}"
max_rounds="${CIPHERHIVE_INIT_MAX_ROUNDS:-0}"
cipherhive="${CIPHERHIVE_BIN:-cipherhive}"

if ! [[ "$nodes" =~ ^[1-9][0-9]*$ ]]; then
    echo "init.sh: CIPHERHIVE_INIT_NODES must be a positive number, got '$nodes'" >&2
    exit 2
fi
if ! [[ "$max_rounds" =~ ^[0-9]+$ ]]; then
    echo "init.sh: CIPHERHIVE_INIT_MAX_ROUNDS must be a whole number, got '$max_rounds'" >&2
    exit 2
fi
min_participants=$((nodes < 3 ? nodes : 3))
if ((min_participants < 2)); then
    echo "init.sh: a federation needs at least 2 nodes (the server refuses min_participants < 2)" >&2
    exit 2
fi

ca="$out/authority/ca"
keys="$out/authority/keys"

log() { echo "init: $*"; }

# 1. The federation key: created once, never replaced.
if [[ ! -f "$keys/secret.ctx" ]]; then
    log "creating the federation key in $keys"
    "$cipherhive" keygen --out "$keys"
else
    log "keeping the federation key in $keys ($(cat "$keys/fingerprint"))"
fi

# 2. The CA.
if [[ ! -f "$ca/ca.key" ]]; then
    log "creating the CA in $ca"
    "$cipherhive" certs init --ca "$ca"
fi

# 3. Certificates, each issued only if its folder lacks it. --replace revokes a
#    still-valid certificate of the same name whose files were lost (a deleted volume).
issue() { # role name out [host ...]
    local role="$1" name="$2" dir="$3"
    shift 3
    # A node also holds its enrolment pair ($name.enrol.crt/.key, for masked rounds); a folder
    # from before enrolment certificates existed gets both pairs reissued.
    if [[ -f "$dir/$name.crt" && -f "$dir/$name.key" ]] &&
        [[ "$role" != node || (-f "$dir/$name.enrol.crt" && -f "$dir/$name.enrol.key") ]]; then
        return 0
    fi
    local hosts=()
    local h
    for h in "$@"; do
        hosts+=(--host "$h")
    done
    log "issuing the $role certificate '$name'"
    "$cipherhive" certs issue --ca "$ca" --role "$role" --name "$name" --out "$dir" --replace "${hosts[@]}"
}

# shellcheck disable=SC2086 # server_hosts is a space-separated list on purpose
issue server server "$out/server" $server_hosts
for i in $(seq 1 "$nodes"); do
    issue node "node-$i" "$out/node-$i"
done

# 4. What each party holds besides its certificate.
install -m 0644 "$keys/public.ctx" "$out/server/public.ctx"
install -m 0644 "$ca/crl.pem" "$out/server/crl.pem" # refreshed on every run (revocations)
for i in $(seq 1 "$nodes"); do
    install -m 0600 "$keys/secret.ctx" "$out/node-$i/secret.ctx"
    # Masked rounds: every member checks its peers' enrolment certificates against the CRL.
    install -m 0644 "$ca/crl.pem" "$out/node-$i/crl.pem"
done
# Every member pins the federation's membership (masked rounds refuse anyone else).
members=""
for i in $(seq 1 "$nodes"); do
    members+="${members:+, }\"node-$i\""
done

# 5. Configuration files (rewritten every run: edit this script, not the copies).
cat >"$out/server/server.toml" <<TOML
# Written by deploy/compose/init.sh; relative paths are relative to this file.
[server]
listen = "0.0.0.0:7443"
health_listen = "0.0.0.0:7444"
state_dir = "$state_dir"
public_context = "public.ctx"
grace_seconds = 20.0

[tls]
tls_cert = "server.crt"
tls_key = "server.key"
tls_ca = "ca.crt"
tls_crl = "crl.pem"

[federation]
# Pinned by the operator, not by the first node to join: see `cipherhive node layout`.
layout = "layout.json"

[rounds]
min_participants = $min_participants
timeout_seconds = 300.0
interval_seconds = 2.0
max_rounds = $max_rounds
TOML

for i in $(seq 1 "$nodes"); do
    cat >"$out/node-$i/node-$i.toml" <<TOML
# Written by deploy/compose/init.sh; relative paths are relative to this file.
[node]
server = "$server_addr"
secret_context = "secret.ctx"
state_dir = "$state_dir"
workers = 1

[tls]
tls_cert = "node-$i.crt"
tls_key = "node-$i.key"
tls_ca = "ca.crt"
tls_server_name = "server"

[masking]
# Names (or certificate fingerprints) this member takes part with; crl.pem sits beside ca.crt.
members = [$members]

[trainer]
plugin = "cipherhive.demo.digits:DigitsTrainer"
options = { shard = $((i - 1)), shards = $nodes, seed = 0, epochs = 5 }
TOML
done

# 6. The model layout the server pins (what every node's Join must match), built from
#    node-1's configuration exactly as the node daemon builds it.
log "writing the model layout of node-1's model to $out/server/layout.json"
"$cipherhive" node layout --config "$out/node-1/node-1.toml" --out "$out/server/layout.json" >/dev/null

# 7. Readable by the daemons' user (uid 10001 in the image), by no one else.
# (Only the owner matters for the node folders: secret.ctx must stay 0600, or the
# node refuses it.)
parties=("$out/server")
for i in $(seq 1 "$nodes"); do
    parties+=("$out/node-$i")
done
if [[ "$(id -u)" == 0 ]]; then
    chown -R "$owner:$owner" "${parties[@]}"
fi
chmod 0644 "$out/server/server.toml" "$out/server/layout.json"
chmod 0755 "$out/server"
for i in $(seq 1 "$nodes"); do
    chmod 0644 "$out/node-$i/node-$i.toml"
    chmod 0700 "$out/node-$i"
done
log "done: $nodes nodes, server certificate for: $server_hosts"
