#!/bin/bash
# By-hand check of one request at a time (docs/PERFORMANCE.md, session 6).
# usage: scripts/hand/loop.sh BIN LABEL N
# One connection (`netdisk shell` fed commands): N single `put`s, then N single `get`s of
# the files made by scripts/hand/mput.sh in $HAND_DIR/src; prints files/s.
set -u
BIN=$1; L=$2; N=$3; H=${HAND_DIR:-/tmp/netdisk-hand}; T=$(date +%s%N)
R=$H/roots/$L-$T; CF=$H/cfgs/$L-$T; mkdir -p "$R" "$CF"
PORT=$((20000 + RANDOM % 20000))
"$BIN" serve --listen 127.0.0.1:$PORT --root "$R" --no-tls > "$R.log" 2>&1 &
SP=$!; sleep 1
export XDG_CONFIG_HOME=$CF HOME=$CF NETDISK_PASSWORD=benchpassword1
C="$BIN --server 127.0.0.1:$PORT --quiet --no-tls"
$C register bench >/dev/null 2>&1; $C login bench >/dev/null
cd "$H/src"
{ echo "mkdir p"; ls | head -"$N" | sed 's|^\(.*\)$|put \1 p/\1|'; } > "$CF/puts"
mkdir -p "$CF/down"; { echo "lcd $CF/down"; ls | head -"$N" | sed 's|^\(.*\)$|get p/\1|'; } > "$CF/gets"
s=$(date +%s.%N); $C shell < "$CF/puts" > /dev/null 2>&1; e=$(date +%s.%N)
s2=$(date +%s.%N); $C shell < "$CF/gets" > /dev/null 2>&1; e2=$(date +%s.%N)
echo "$L put $(python3 -c "print(round($N/($e-$s)))")/s get $(python3 -c "print(round($N/($e2-$s2)))")/s | load $(cut -d' ' -f1 /proc/loadavg)"
kill $SP
