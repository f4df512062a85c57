#!/usr/bin/env bash
# The engine under a request load: `qcow-tool bench` against `qemu-img bench`, same image, same arguments, run
# alternately, for each case below. Prints, per case, the median run time of each (as each tool reports it:
# requests and flushes only, not opening or closing), the ratio ours / qemu-img, and each one's peak RSS.
#
# Cases (4 KiB requests unless said otherwise):
#   read-full-d1      reads of a fully allocated 1 GiB image, one request in flight
#   read-full-d64     the same, 64 in flight
#   read-empty-d64    reads of an unallocated 1 GiB image, 64 in flight
#   write-alloc-d64   writes into an empty image (every cluster allocated by the run), 64 in flight
#   write-over-d64    writes over the fully allocated image, 64 in flight
#   write64k-flush    64 KiB sequential writes into an empty image, 16 in flight, flush every 16 requests
#   read-zero-d64     reads of an image whose clusters are all zero-flag clusters, 64 in flight
#   read-sparse1T-d64 reads across a 1 TiB image with data every 512 MiB (2048 L2 tables: more than either
#                     tool's metadata cache holds), stepping 512 MiB + 4 KiB, 64 in flight
#   read64k-seq-d16   64 KiB sequential reads of the fully allocated image, 16 in flight; also compared with
#                     qemu-img bench reading the same data from a raw file (the physical limit)
#   read64k-zlib/zstd 64 KiB sequential reads of compressed images (text-like data), in MB/s
#
# Environment:
#   QCOW_BENCH_DIR  work directory, images kept between runs (default: <target dir>/bench-engine)
#   BENCH_RUNS      runs of each tool per case (default: 5)
#   BENCH_COUNT     requests per 4 KiB run (default: 50000; the 64 KiB case uses a quarter)
#   BENCH_CACHE     cache mode for both tools (default: none, i.e. O_DIRECT)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dir=${QCOW_BENCH_DIR:-$target/bench-engine}
runs=${BENCH_RUNS:-5}
count=${BENCH_COUNT:-50000}
cache=${BENCH_CACHE:-none}

for tool in qemu-img /usr/bin/time python3; do
    if ! command -v "$tool" >/dev/null; then
        case $tool in
            qemu-img) echo "bench-engine: qemu-img not found: install qemu-utils" >&2 ;;
            /usr/bin/time) echo "bench-engine: /usr/bin/time not found: install the 'time' package" >&2 ;;
            *) echo "bench-engine: $tool not found" >&2 ;;
        esac
        exit 1
    fi
done
case $runs in '' | *[!0-9]* | 0) echo "bench-engine: BENCH_RUNS must be a positive integer, not '$runs'" >&2; exit 1 ;; esac

echo "building qcow-tool (release)..." >&2
(cd "$root" && cargo build --release --quiet -p qcow-tool)
ours=$target/release/qcow-tool

mkdir -p "$dir"
full=$dir/full-1G.qcow2
if [ ! -f "$full" ]; then
    echo "making $full (once; later runs reuse it)..." >&2
    # Non-zero everywhere, so that every cluster is allocated and holds data.
    head -c $((1 << 30)) /dev/zero | tr '\0' '\1' >"$dir/fill.raw"
    qemu-img convert -f raw -O qcow2 "$dir/fill.raw" "$full.part"
    rm -f "$dir/fill.raw"
    mv "$full.part" "$full"
fi
empty=$dir/empty-1G.qcow2
scratch=$dir/scratch.qcow2

# Runs one bench; prints "<seconds as the tool reports them> <peak RSS KiB>".
measure() {
    local log=$dir/time.log out=$dir/out.log
    if ! /usr/bin/time -o "$log" -f '%M' "$@" >"$out" 2>&1; then
        echo "bench-engine: failed: $*" >&2
        cat "$out" >&2
        exit 1
    fi
    local secs
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' "$out")
    [ -n "$secs" ] || { echo "bench-engine: no run time from: $*" >&2; cat "$out" >&2; exit 1; }
    echo "$secs $(tail -n 1 "$log")"
}

# case NAME FRESH IMAGE ARGS...: FRESH=1 makes IMAGE a new empty 1 GiB qcow2 before every run.
run_case() {
    local name=$1 fresh=$2 image=$3
    shift 3
    local ours_t=() qemu_t=() ours_rss=0 qemu_rss=0 i t rss
    for ((i = 0; i < runs; i++)); do
        for who in qemu ours; do
            if [ "$fresh" = 1 ]; then qemu-img create -q -f qcow2 "$image" 1G; fi
            if [ $who = ours ]; then
                read -r t rss < <(measure "$ours" bench -t "$cache" "$@" "$image")
                ours_t+=("$t"); ((rss > ours_rss)) && ours_rss=$rss
            else
                read -r t rss < <(measure qemu-img bench -t "$cache" "$@" "$image")
                qemu_t+=("$t"); ((rss > qemu_rss)) && qemu_rss=$rss
            fi
        done
    done
    python3 - "$name" "$ours_rss" "$qemu_rss" "${ours_t[*]}" "${qemu_t[*]}" "${BYTES:-0}" <<'PY'
import statistics, sys
name, ours_rss, qemu_rss, ours, qemu, nbytes = sys.argv[1:]
o = statistics.median(float(x) for x in ours.split())
q = statistics.median(float(x) for x in qemu.split())
ratio = o / q if q > 0 else float("inf")
rate = ""
if int(nbytes) > 0:
    rate = f"  ours {int(nbytes) / o / 1e6:7.0f} MB/s, qemu-img {int(nbytes) / q / 1e6:7.0f} MB/s"
print(f"{name:<18} ours {o:8.3f} s  qemu-img {q:8.3f} s  ratio {ratio:6.2f}  "
      f"peak RSS ours {int(ours_rss) // 1024} MiB, qemu-img {int(qemu_rss) // 1024} MiB{rate}")
PY
}

[ -f "$empty" ] || qemu-img create -q -f qcow2 "$empty" 1G
echo "cache=$cache, $runs runs per tool, alternating; times are each tool's own 'Run completed in' figure"
run_case read-full-d1 0 "$full" -c "$count" -d 1 -s 4K
run_case read-full-d64 0 "$full" -c "$count" -d 64 -s 4K
run_case read-empty-d64 0 "$empty" -c "$count" -d 64 -s 4K
run_case write-alloc-d64 1 "$scratch" -w -c "$count" -d 64 -s 4K
run_case write-over-d64 0 "$full" -w -c "$count" -d 64 -s 4K
run_case write64k-flush 1 "$scratch" -w -c $((count / 4)) -d 16 -s 64K --flush-interval 16

zero=$dir/zero-1G.qcow2
if [ ! -f "$zero" ]; then
    qemu-img create -q -f qcow2 "$zero.part" 1G && qemu-io -f qcow2 -c "write -z 0 1G" "$zero.part" >/dev/null
    mv "$zero.part" "$zero"
fi
sparse=$dir/sparse-1T.qcow2
if [ ! -f "$sparse" ]; then
    qemu-img create -q -f qcow2 "$sparse.part" 1T
    cmds=()
    for ((g = 0; g < 2048; g++)); do cmds+=(-c "write -P 0x5a $((g * 512))M 64k"); done
    qemu-io -f qcow2 "${cmds[@]}" "$sparse.part" >/dev/null
    mv "$sparse.part" "$sparse"
fi
raw=$dir/full-1G.raw
[ -f "$raw" ] || qemu-img convert -f qcow2 -O raw "$full" "$raw"
text=$dir/text-256M.raw
[ -f "$text" ] || head -c $((192 << 20)) /dev/urandom | base64 -w 0 | head -c $((256 << 20)) >"$text"
for codec in zlib zstd; do
    [ -f "$dir/text-$codec.qcow2" ] || qemu-img convert -c -f raw -O qcow2 -o compression_type=$codec "$text" "$dir/text-$codec.qcow2"
done

run_case read-zero-d64 0 "$zero" -c "$count" -d 64 -s 4K
run_case read-sparse1T-d64 0 "$sparse" -c "$count" -d 64 -s 4K -S $(((512 << 20) + 4096))
seq=$((count / 4))
BYTES=$((seq * 65536)) run_case read64k-seq-d16 0 "$full" -c "$seq" -d 16 -s 64K
raw_t=()
for ((i = 0; i < runs; i++)); do
    read -r t _ < <(measure qemu-img bench -t "$cache" -f raw -c "$seq" -d 16 -s 64K "$raw")
    raw_t+=("$t")
done
python3 - "${raw_t[*]}" "$((seq * 65536))" <<'PY'
import statistics, sys
t = statistics.median(float(x) for x in sys.argv[1].split())
print(f"{'raw-file 64k-seq':<18} qemu-img bench -f raw {t:8.3f} s, {int(sys.argv[2]) / t / 1e6:7.0f} MB/s: the physical limit for read64k-seq-d16")
PY
small=$(((256 << 20) / 65536))
BYTES=$((small * 65536)) run_case read64k-zlib 0 "$dir/text-zlib.qcow2" -c "$small" -d 16 -s 64K
BYTES=$((small * 65536)) run_case read64k-zstd 0 "$dir/text-zstd.qcow2" -c "$small" -d 16 -s 64K
qemu-img check -q "$full" && qemu-img check -q "$scratch" && echo "qemu-img check: both images clean"
