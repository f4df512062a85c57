#!/usr/bin/env bash
# What an enabled persistent bitmap costs writers: `qcow-tool bench` and `qemu-img bench` on the same image with
# and without one enabled bitmap (added by `qemu-img bitmap --add`, 64 KiB granularity, before a run and removed
# after it, so that both variants write the very same file: two copies of an image can differ by 15% in speed on
# their own), run alternately. Prints,
# per case, the median run time (each tool's own "Run completed in", requests only) of each tool without and with
# the bitmap, and the ratio with / without; then the same for qemu-img, for reference.
#
# Cases (4 KiB requests):
#   write-over-d64    writes over a fully allocated 1 GiB image, 64 in flight
#   write-alloc-d64   writes into an empty 1 GiB image (a new one per run), 64 in flight
#   write-over-d1     writes over the fully allocated image, one in flight
#
# Environment: QCOW_BENCH_DIR (images, default <target dir>/bench-bitmaps), BENCH_RUNS (default 5), BENCH_COUNT
# (requests per run, default 50000), BENCH_CACHE (default none, i.e. O_DIRECT).
set -euo pipefail
shopt -s inherit_errexit

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dir=${QCOW_BENCH_DIR:-$target/bench-bitmaps}
runs=${BENCH_RUNS:-5}
count=${BENCH_COUNT:-50000}
cache=${BENCH_CACHE:-none}

for tool in qemu-img python3; do
    command -v "$tool" >/dev/null || { echo "bench-bitmaps: $tool not found (qemu-img: install qemu-utils)" >&2; exit 1; }
done
case $runs in '' | *[!0-9]* | 0) echo "bench-bitmaps: BENCH_RUNS must be a positive integer" >&2; exit 1 ;; esac
case $count in '' | *[!0-9]* | 0) echo "bench-bitmaps: BENCH_COUNT must be a positive integer" >&2; exit 1 ;; esac

echo "building qcow-tool (release)..." >&2
(cd "$root" && cargo build --release --quiet -p qcow-tool)
ours=$target/release/qcow-tool
mkdir -p "$dir"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

full=$dir/full-1G.qcow2
if [ ! -f "$full" ]; then
    echo "making $full (once)..." >&2
    head -c $((1 << 30)) /dev/zero | tr '\0' '\1' >"$dir/fill.raw"
    qemu-img convert -f raw -O qcow2 "$dir/fill.raw" "$full.part"
    rm -f "$dir/fill.raw"
    mv "$full.part" "$full"
fi
qemu-img bitmap --remove "$full" b0 2>/dev/null || true
scratch=$dir/scratch.qcow2

# Prints the seconds a bench run reports.
secs() {
    if ! "$@" >"$logs/out.log" 2>&1; then
        echo "bench-bitmaps: failed: $*" >&2
        cat "$logs/out.log" >&2
        return 1
    fi
    sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' "$logs/out.log"
}

# run_case NAME FRESH IMAGE ARGS...: FRESH=1 makes the image new before every run.
run_case() {
    local name=$1 fresh=$2 img=$3
    shift 3
    local results=() i who bm
    for ((i = 0; i < runs; i++)); do
        for who in "$ours" qemu-img; do
            for bm in 0 1; do
                if [ "$fresh" = 1 ]; then qemu-img create -q -f qcow2 "$img" 1G; fi
                if [ "$bm" = 1 ]; then qemu-img bitmap --add -g 64K "$img" b0; fi
                results+=("$(basename "$who"):$bm:$(secs "$who" bench -t "$cache" -c "$count" "$@" "$img")")
                if [ "$bm" = 1 ]; then qemu-img bitmap --remove "$img" b0; fi
            done
        done
    done
    python3 - "$name" "${results[@]}" <<'PY'
import statistics, sys
name, *results = sys.argv[1:]
t = {}
for r in results:
    who, bm, s = r.split(":")
    t.setdefault((who, bm), []).append(float(s))
def med(who, bm):
    return statistics.median(t[(who, bm)])
o0, o1, q0, q1 = med("qcow-tool", "0"), med("qcow-tool", "1"), med("qemu-img", "0"), med("qemu-img", "1")
spread = lambda who, bm: f"{min(t[(who, bm)]):.3f}-{max(t[(who, bm)]):.3f}"
print(f"{name:<16} ours {o0:7.3f} s -> {o1:7.3f} s with a bitmap (x{o1 / o0:5.3f}; runs {spread('qcow-tool', '0')} / "
      f"{spread('qcow-tool', '1')})   qemu-img {q0:7.3f} s -> {q1:7.3f} s (x{q1 / q0:5.3f})")
PY
}

echo "cache=$cache, $runs runs per tool and variant, alternating; $count 4 KiB requests per run"
run_case write-over-d64 0 "$full" -w -d 64 -s 4K
run_case write-alloc-d64 1 "$scratch" -w -d 64 -s 4K
run_case write-over-d1 0 "$full" -w -d 1 -s 4K
