#!/usr/bin/env bash
# Times `qcow-tool check` against `qemu-img check` on a qcow2 image with 4 KiB clusters and over a million
# allocated clusters, and reports the median wall time of each, their ratio and each one's peak RSS.
#
# Environment:
#   QCOW_BENCH_DIR   where the image is made and kept between runs (default: <target dir>/bench-check)
#   BENCH_SIZE       guest bytes written, a qemu-img size (default: 4G, i.e. 1,048,576 data clusters)
#   BENCH_RUNS       runs of each tool, alternating (default: 5)
#
# The image is made once: a raw file full of non-zero bytes, converted by qemu-img to qcow2 with 4 KiB clusters,
# so every guest cluster is allocated and holds real data. Both tools run with a warm page cache (the first pair
# of runs warms it too, and runs alternate), so the figures compare the checkers, not the disk.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dir=${QCOW_BENCH_DIR:-$target/bench-check}
size=${BENCH_SIZE:-4G}
runs=${BENCH_RUNS:-5}

for tool in qemu-img /usr/bin/time python3; do
    if ! command -v "$tool" >/dev/null; then
        case $tool in
            qemu-img) echo "bench-check: qemu-img not found: install qemu-utils" >&2 ;;
            /usr/bin/time) echo "bench-check: /usr/bin/time not found: install the 'time' package" >&2 ;;
            *) echo "bench-check: $tool not found" >&2 ;;
        esac
        exit 1
    fi
done
case $runs in '' | *[!0-9]* | 0) echo "bench-check: BENCH_RUNS must be a positive integer, not '$runs'" >&2; exit 1 ;; esac

echo "building qcow-tool (release)..." >&2
(cd "$root" && cargo build --release --quiet -p qcow-tool)
ours=$target/release/qcow-tool

mkdir -p "$dir"
image=$dir/check-4k-$size.qcow2
if [ ! -f "$image" ]; then
    echo "making $image (once; later runs reuse it)..." >&2
    raw=$dir/fill.raw
    bytes=$(qemu-img create -q -f raw "$raw" "$size" && stat -c %s "$raw")
    # Non-zero everywhere, so that qemu-img convert allocates every cluster.
    tr '\0' '\1' </dev/zero | head -c "$bytes" >"$raw"
    qemu-img convert -f raw -O qcow2 -o cluster_size=4096 "$raw" "$image.part"
    rm -f "$raw"
    mv "$image.part" "$image"
fi

# Runs a command under /usr/bin/time; prints "<wall ns> <peak RSS KiB> <user+sys CPU s> <exit code>".
measure() {
    local log=$dir/time.log start end code
    start=$(date +%s%N)
    set +e
    /usr/bin/time -o "$log" -f '%M %U %S' "$@" >/dev/null 2>&1
    code=$?
    set -e
    end=$(date +%s%N)
    read -r rss user sys < <(tail -n 1 "$log")
    echo "$(( end - start )) $rss $(python3 -c "print($user + $sys)") $code"
}

# Both must agree on the image before their times mean anything.
qemu_json=$(qemu-img check --output=json "$image") || { echo "bench-check: qemu-img check failed on $image" >&2; exit 1; }
our_json=$("$ours" check --output=json "$image") || { echo "bench-check: qcow-tool check failed on $image" >&2; exit 1; }
allocated=$(python3 - "$qemu_json" "$our_json" <<'EOF'
import json, sys
q, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
q.pop("filename"); o.pop("filename")
if q != o:
    sys.exit(f"bench-check: the two checks disagree:\n qemu-img:  {q}\n qcow-tool: {o}")
if q.get("allocated-clusters", 0) < 1_000_000:
    sys.exit(f"bench-check: only {q.get('allocated-clusters', 0)} allocated clusters; raise BENCH_SIZE")
print(q["allocated-clusters"])
EOF
)

qemu_times=() our_times=() qemu_rss=() our_rss=() qemu_cpu=() our_cpu=()
for ((i = 0; i < runs; i++)); do
    read -r t m u c < <(measure qemu-img check "$image")
    [ "$c" = 0 ] || { echo "bench-check: qemu-img check exited $c" >&2; exit 1; }
    qemu_times+=("$t") qemu_rss+=("$m") qemu_cpu+=("$u")
    read -r t m u c < <(measure "$ours" check "$image")
    [ "$c" = 0 ] || { echo "bench-check: qcow-tool check exited $c" >&2; exit 1; }
    our_times+=("$t") our_rss+=("$m") our_cpu+=("$u")
done

python3 - "$image" "$allocated" "$runs" "${qemu_times[*]}" "${our_times[*]}" "${qemu_rss[*]}" "${our_rss[*]}" \
    "${qemu_cpu[*]}" "${our_cpu[*]}" "$(cat /proc/loadavg 2>/dev/null || echo unknown)" <<'EOF'
import statistics, sys
image, allocated, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
qt, ot, qm, om = ([int(x) for x in a.split()] for a in sys.argv[4:8])
qc, oc = ([float(x) for x in a.split()] for a in sys.argv[8:10])
q, o = statistics.median(qt) / 1e9, statistics.median(ot) / 1e9
qcpu, ocpu = statistics.median(qc), statistics.median(oc)
def line(name, med, times, cpu, rss):
    runs = ", ".join(f"{t / 1e9:.3f}" for t in times)
    return f"{name} median {med:.3f} s wall (runs: {runs}), median {cpu:.2f} s CPU, peak RSS {max(rss) / 1024:.1f} MiB"
print(f"image: {image}")
print(f"allocated clusters: {allocated} (4 KiB clusters); {runs} runs of each, alternating; load average {sys.argv[10]}")
print(line("qemu-img check: ", q, qt, qcpu, qm))
print(line("qcow-tool check:", o, ot, ocpu, om))
cpu_ratio = f"{ocpu / qcpu:.2f}x" if qcpu > 0 else "n/a"
print(f"ratio qcow-tool/qemu-img: {o / q:.2f}x wall time, {cpu_ratio} CPU time, {max(om) / max(qm):.2f}x peak RSS")
EOF
