# Sourced by the by-hand scripts: with BIN and L set, starts a `--no-tls` server on a
# fresh root under $H (HAND_DIR, default /tmp/netdisk-hand), registers and logs in user
# `bench`, and leaves: SP (server pid), CF (the client's config folder), C (the client
# command line), T (a timestamp naming this run's folders).
H=${HAND_DIR:-/tmp/netdisk-hand}; T=$(date +%s%N)
R=$H/roots/$L-$T; CF=$H/cfgs/$L-$T; mkdir -p "$R" "$CF"
PORT=$((20000 + RANDOM % 20000))
"$BIN" serve --listen 127.0.0.1:$PORT --root "$R" --no-tls > "$R.log" 2>&1 &
SP=$!; sleep 1
export XDG_CONFIG_HOME=$CF HOME=$CF NETDISK_PASSWORD=benchpassword1
C="$BIN --server 127.0.0.1:$PORT --quiet --no-tls"
$C register bench >/dev/null 2>&1; $C login bench >/dev/null
