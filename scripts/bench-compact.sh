#!/usr/bin/env bash
# Compaction throughput: MB/s of clusters moved by `qcow-tool compact` on a GiB-sized image, beside a plain
# sequential copy of the same number of bytes on the same disk (read + write + fsync), and their ratio.
#
# Environment:
#   QCOW_BENCH_DIR  work directory (default: <target dir>/bench-compact)
#   BENCH_MOVE      bytes of data the compaction has to move, a qemu-img size (default: 1G)
#   BENCH_RUNS      runs of each (default: 3)
#
# The image holds 2 x BENCH_MOVE of data written by qemu-io; the first half is discarded by qcow-tool (zero
# clusters), so compaction moves the second half down into the holes.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dir=${QCOW_BENCH_DIR:-$target/bench-compact}
move=${BENCH_MOVE:-1G}
runs=${BENCH_RUNS:-3}
command -v qemu-img >/dev/null || { echo "bench-compact: qemu-img not found: install qemu-utils" >&2; exit 1; }

echo "building qcow-tool (release)..." >&2
cargo build --release -q -p qcow-tool --manifest-path "$root/Cargo.toml"
tool=$target/release/qcow-tool
mkdir -p "$dir"
bytes=$(python3 -c "import sys; u={'K':1<<10,'M':1<<20,'G':1<<30}; s=sys.argv[1]; print(int(s[:-1])*u[s[-1]] if s[-1] in u else int(s))" "$move")

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

compact_times=()
copy_times=()
for run in $(seq "$runs"); do
    img=$dir/compact.qcow2
    rm -f "$img"
    qemu-img create -q -f qcow2 "$img" $((bytes * 2))
    # First half zeros (discarded below), second half data.
    qemu-io -f qcow2 -c "write -P 0 0 $bytes" -c "write -P 0x5a $bytes $bytes" "$img" >/dev/null
    "$tool" discard "$img" >/dev/null
    sync
    t0=$(now)
    "$tool" compact "$img" > "$dir/compact.out"
    t1=$(now)
    compact_times+=("$(echo "$t1 - $t0" | bc -l)")
    qemu-img check -q "$img"

    src=$dir/copy-src.raw
    dst=$dir/copy-dst.raw
    [ -f "$src" ] && [ "$(stat -c %s "$src")" = "$bytes" ] || head -c "$bytes" /dev/urandom > "$src"
    rm -f "$dst"
    sync
    t0=$(now)
    dd if="$src" of="$dst" bs=1M conv=fsync status=none
    t1=$(now)
    copy_times+=("$(echo "$t1 - $t0" | bc -l)")
    rm -f "$dst"
done
cat "$dir/compact.out"
c=$(printf '%s\n' "${compact_times[@]}" | median)
p=$(printf '%s\n' "${copy_times[@]}" | median)
mb=$(echo "$bytes / 1000000" | bc -l)
printf 'moved %s bytes; %s runs each; load average %s\n' "$bytes" "$runs" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'compaction: median %.3f s = %.0f MB/s (runs: %s)\n' "$c" "$(echo "$mb / $c" | bc -l)" "${compact_times[*]}"
printf 'sequential copy (dd, fsync): median %.3f s = %.0f MB/s (runs: %s)\n' "$p" "$(echo "$mb / $p" | bc -l)" "${copy_times[*]}"
printf 'ratio compaction/copy throughput: %.2f\n' "$(echo "$p / $c" | bc -l)"
