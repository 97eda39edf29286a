#!/bin/bash
# By-hand check of one request at a time (docs/PERFORMANCE.md, session 6).
# usage: scripts/hand/loop.sh BIN LABEL N
# One connection (`netdisk shell` fed commands): N single `put`s, then N single `get`s of
# the files made by scripts/hand/mput.sh in $HAND_DIR/src; prints files/s.
set -u
BIN=$1; L=$2; N=$3
source "$(dirname "$0")/serve.sh"
cd "$H/src"
{ echo "mkdir p"; ls | head -"$N" | sed 's|^\(.*\)$|put \1 p/\1|'; } > "$CF/puts"
mkdir -p "$CF/down"; { echo "lcd $CF/down"; ls | head -"$N" | sed 's|^\(.*\)$|get p/\1|'; } > "$CF/gets"
s=$(date +%s.%N); $C shell < "$CF/puts" > /dev/null 2>&1; e=$(date +%s.%N)
s2=$(date +%s.%N); $C shell < "$CF/gets" > /dev/null 2>&1; e2=$(date +%s.%N)
echo "$L put $(python3 -c "print(round($N/($e-$s)))")/s get $(python3 -c "print(round($N/($e2-$s2)))")/s | load $(cut -d' ' -f1 /proc/loadavg)"
kill $SP
