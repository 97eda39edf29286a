#!/bin/bash
# By-hand small-file A/B (docs/PERFORMANCE.md, sessions 5-6).
# usage: scripts/hand/mput.sh BIN LABEL
# A fresh server root, then three `mput --to` a new folder each of N × 4 KiB files
# (N=${FILES:-3000}), then one `mget` of the first folder; prints files/s. Nothing is
# deleted meanwhile: on an ext4 without a journal, creations right after deletions are slow.
set -u
BIN=$1; L=$2; N=${FILES:-3000}; H=${HAND_DIR:-/tmp/netdisk-hand}
if [ ! -d "$H/src" ]; then
  mkdir -p "$H/src"
  for i in $(seq -w 1 "$N"); do head -c 4096 /dev/urandom > "$H/src/f$i.bin"; done
fi
source "$(dirname "$0")/serve.sh"
cd "$H/src"; N=$(ls | wc -l)
out="$L mput:"
for r in 1 2 3; do
  $C mkdir r$r; sync
  s=$(date +%s.%N); $C mput --to r$r f*.bin; e=$(date +%s.%N)
  out="$out $(python3 -c "print(round($N/($e-$s)))")"
done
mkdir -p "$H/outs/$L-$T"; cd "$H/outs/$L-$T"; sync
s=$(date +%s.%N); $C mget $(cd "$H/src"; ls | sed 's|^|r1/|'); e=$(date +%s.%N)
echo "$out | mget $(python3 -c "print(round($N/($e-$s)))") | load $(cut -d' ' -f1 /proc/loadavg)"
kill $SP
