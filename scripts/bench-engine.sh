#!/usr/bin/env bash
# The engine under a request load: `qcow-tool bench` against `qemu-img bench`, same image, same arguments, run
# alternately, for each case below. Prints, per case:
#   - the median run time of each (as each tool reports it: requests and flushes only, not opening or closing),
#     the ratio ours / qemu-img, and each one's peak RSS;
#   - on an indented second line, system calls per request of each and their ratio, from one extra run of each
#     tool under `strace -f -c` with a fifth of the requests (never a timed run: strace slows every call). The
#     count is every system call of the process and all its threads, opening and closing the image included,
#     divided by the requests; the three most frequent calls of each follow, also per request.
# After read64k-seq-d16, one `cpu-per-GiB` line: user+system CPU seconds per GiB moved (medians, from
# /usr/bin/time %U %S) of ours, qemu-img, qemu-img reading the raw file, and a plain pread loop
# (crates/qcow/examples/pread_loop.rs: one thread, 64 KiB reads over the whole raw file, O_DIRECT unless
# BENCH_CACHE asks for the page cache), the floor for the CPU cost of moving the data.
#
# Cases (4 KiB requests unless said otherwise):
#   read-full-d1      reads of a fully allocated 1 GiB image, one request in flight
#   read-full-d64     the same, 64 in flight
#   read-empty-d64    reads of an unallocated 1 GiB image, 64 in flight
#   write-alloc-d64   writes into an empty image (every cluster allocated by the run), 64 in flight
#   write-over-d64    writes over the fully allocated image, 64 in flight
#   write64k-flush    64 KiB sequential writes into an empty image, 16 in flight, flush every 16 requests
#   read-flusher-d64  4 KiB random reads, 64 in flight, with and without a thread that writes and flushes every
#                     millisecond (see the case itself for what is compared)
#   read-zero-d64     reads of an image whose clusters are all zero-flag clusters, 64 in flight
#   read-sparse1T-d64 reads across a 1 TiB image with data every 512 MiB (2048 L2 tables, 128 MiB of them: more
#                     than either tool's 32 MiB metadata cache holds whole; both cache 4 KiB slices), stepping
#                     512 MiB + 4 KiB, 64 in flight
#   read64k-seq-d16   64 KiB sequential reads of the fully allocated image, 16 in flight; also compared with
#                     qemu-img bench reading the same bytes of the same file raw (the physical limit), and a
#                     separate raw file of the same data
#   read64k-zlib/zstd 64 KiB sequential reads of compressed images (text-like data), in MB/s
#
# Environment:
#   QCOW_BENCH_DIR  work directory, images kept between runs (default: <target dir>/bench-engine)
#   BENCH_RUNS      runs of each tool per case (default: 5)
#   BENCH_COUNT     requests per 4 KiB run (default: 50000; the 64 KiB cases use a quarter; read-empty and
#                   read-zero, which do no data I/O, twenty times as many, so that the run is not over before
#                   the threads have started; strace'd runs a fifth of a case's count)
#   BENCH_CACHE     cache mode for both tools (default: none, i.e. O_DIRECT)
set -euo pipefail
# Command substitutions (every helper below runs in one) stop at the first failure too.
shopt -s inherit_errexit

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dir=${QCOW_BENCH_DIR:-$target/bench-engine}
runs=${BENCH_RUNS:-5}
count=${BENCH_COUNT:-50000}
cache=${BENCH_CACHE:-none}

for tool in qemu-img /usr/bin/time python3 strace; do
    if ! command -v "$tool" >/dev/null; then
        case $tool in
            qemu-img) echo "bench-engine: qemu-img not found: install qemu-utils" >&2 ;;
            /usr/bin/time) echo "bench-engine: /usr/bin/time not found: install the 'time' package" >&2 ;;
            strace) echo "bench-engine: strace not found (it counts system calls per request): install strace" >&2 ;;
            *) echo "bench-engine: $tool not found" >&2 ;;
        esac
        exit 1
    fi
done
case $runs in '' | *[!0-9]* | 0) echo "bench-engine: BENCH_RUNS must be a positive integer, not '$runs'" >&2; exit 1 ;; esac
case $count in '' | *[!0-9]* | 0) echo "bench-engine: BENCH_COUNT must be a positive integer, not '$count'" >&2; exit 1 ;; esac

echo "building qcow-tool and the pread_loop example (release)..." >&2
(cd "$root" && cargo build --release --quiet -p qcow-tool && cargo build --release --quiet -p qcow --example pread_loop)
ours=$target/release/qcow-tool
pread_loop=$target/release/examples/pread_loop

mkdir -p "$dir"
# Logs live apart from the images, so that two runs sharing QCOW_BENCH_DIR do not read each other's.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
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

# Runs a command under /usr/bin/time; prints "<peak RSS KiB> <user+system CPU seconds>". Its output is left in
# $logs/out.log.
timed() {
    local log=$logs/time.log out=$logs/out.log
    if ! /usr/bin/time -o "$log" -f '%M %U %S' "$@" >"$out" 2>&1; then
        echo "bench-engine: failed: $*" >&2
        cat "$out" >&2
        return 1
    fi
    local rss user sys
    read -r rss user sys < <(tail -n 1 "$log")
    echo "$rss $(python3 -c 'import sys; print(float(sys.argv[1]) + float(sys.argv[2]))' "$user" "$sys")"
}

# Runs one bench; prints "<seconds as the tool reports them> <peak RSS KiB> <user+system CPU seconds>".
measure() {
    local usage secs
    usage=$(timed "$@") || return 1
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' "$logs/out.log")
    [ -n "$secs" ] || { echo "bench-engine: no run time from: $*" >&2; cat "$logs/out.log" >&2; return 1; }
    echo "$secs $usage"
}

# Runs one bench under strace -f -c; prints "<total system calls> <the three most frequent as name=calls,...>".
syscalls() {
    local log=$logs/strace.log out=$logs/out.log
    if ! strace -f -c -o "$log" "$@" >"$out" 2>&1; then
        echo "bench-engine: failed under strace: $*" >&2
        cat "$out" "$log" >&2
        return 1
    fi
    # Columns: % time, seconds, usecs/call, calls, [errors], syscall; the errors column may be empty.
    local total top
    total=$(awk '$NF == "total" { print $4 }' "$log")
    [ -n "$total" ] || { echo "bench-engine: no 'total' line in strace's summary of: $*" >&2; cat "$log" >&2; return 1; }
    top=$(awk '/^-/ { body = !body; next } body && NF >= 5 { print $4, $NF }' "$log" | sort -rn | awk 'NR <= 3' |
        awk '{ printf "%s%s=%s", (NR > 1 ? "," : ""), $2, $1 }')
    echo "$total $top"
}

# Makes IMAGE a new empty 1 GiB qcow2 when FRESH is 1.
refresh() {
    if [ "$1" = 1 ]; then qemu-img create -q -f qcow2 "$2" 1G; fi
}

# run_case NAME FRESH IMAGE COUNT ARGS...: COUNT requests per timed run; FRESH=1 makes IMAGE a new empty 1 GiB
# qcow2 before every run. Leaves the CPU seconds of the timed runs in case_ours_cpu and case_qemu_cpu.
run_case() {
    local name=$1 fresh=$2 image=$3 n=$4
    shift 4
    local ours_t=() qemu_t=() ours_rss=0 qemu_rss=0 i t rss cpu result
    case_ours_cpu=() case_qemu_cpu=()
    for ((i = 0; i < runs; i++)); do
        for who in qemu ours; do
            refresh "$fresh" "$image"
            if [ $who = ours ]; then
                result=$(measure "$ours" bench -t "$cache" -c "$n" "$@" "$image")
                read -r t rss cpu <<<"$result"
                ours_t+=("$t") case_ours_cpu+=("$cpu")
                if ((rss > ours_rss)); then ours_rss=$rss; fi
            else
                result=$(measure qemu-img bench -t "$cache" -c "$n" "$@" "$image")
                read -r t rss cpu <<<"$result"
                qemu_t+=("$t") case_qemu_cpu+=("$cpu")
                if ((rss > qemu_rss)); then qemu_rss=$rss; fi
            fi
        done
    done
    local sn=$((n / 5 > 0 ? n / 5 : 1)) ours_sc qemu_sc
    refresh "$fresh" "$image"
    qemu_sc=$(syscalls qemu-img bench -t "$cache" -c "$sn" "$@" "$image")
    refresh "$fresh" "$image"
    ours_sc=$(syscalls "$ours" bench -t "$cache" -c "$sn" "$@" "$image")
    python3 - "$name" "$ours_rss" "$qemu_rss" "${ours_t[*]}" "${qemu_t[*]}" "${BYTES:-0}" "$sn" "$ours_sc" "$qemu_sc" <<'PY'
import statistics, sys
name, ours_rss, qemu_rss, ours, qemu, nbytes, sn, ours_sc, qemu_sc = sys.argv[1:]
o = statistics.median(float(x) for x in ours.split())
q = statistics.median(float(x) for x in qemu.split())
ratio = o / q if q > 0 else float("inf")
rate = ""
if int(nbytes) > 0:
    rate = f"  ours {int(nbytes) / o / 1e6:7.0f} MB/s, qemu-img {int(nbytes) / q / 1e6:7.0f} MB/s"
print(f"{name:<18} ours {o:8.3f} s  qemu-img {q:8.3f} s  ratio {ratio:6.2f}  "
      f"peak RSS ours {int(ours_rss) // 1024} MiB, qemu-img {int(qemu_rss) // 1024} MiB{rate}")
requests = int(sn)
def parse(summary):
    total, _, top = summary.partition(" ")
    calls = [c.split("=") for c in top.split(",") if c]
    return int(total) / requests, ", ".join(f"{name} {int(k) / requests:.2f}" for name, k in calls)
os_, otop = parse(ours_sc)
qs, qtop = parse(qemu_sc)
sratio = os_ / qs if qs > 0 else float("inf")
print(f"{'':<18} syscalls/request ours {os_:6.2f}  qemu-img {qs:6.2f}  ratio {sratio:6.2f}  "
      f"(ours: {otop}; qemu-img: {qtop})")
PY
}

[ -f "$empty" ] || qemu-img create -q -f qcow2 "$empty" 1G
echo "cache=$cache, $runs runs per tool, alternating; times are each tool's own 'Run completed in' figure"
echo "syscalls/request: one more run per tool under strace -f -c with a fifth of the requests; every system call of"
echo "  the process and its threads, opening and closing the image included, divided by the requests"
run_case read-full-d1 0 "$full" "$count" -d 1 -s 4K
run_case read-full-d64 0 "$full" "$count" -d 64 -s 4K
run_case read-empty-d64 0 "$empty" $((count * 20)) -d 64 -s 4K
run_case write-alloc-d64 1 "$scratch" "$count" -w -d 64 -s 4K
run_case write-over-d64 0 "$full" "$count" -w -d 64 -s 4K
run_case write64k-flush 1 "$scratch" $((count / 4)) -w -d 16 -s 64K --flush-interval 16

# read-flusher-d64: 4 KiB random reads at depth 64 over the allocated first GiB of a 2 GiB image, alone and while
# a flusher thread writes 4 KiB into a new cluster of the second GiB and flushes every millisecond (each flush has
# metadata to write back). The figure is read IOPS with the flusher over read IOPS without it (target >= 0.9);
# "under lock" is the same with the engine's old writeback, which held the metadata lock through every flush.
# qemu-img bench cannot read while another thread flushes; its figure is the closest it measures: 4 KiB
# allocating writes at depth 64 with --flush-interval 64 --no-drain over the same writes without flushes, shown
# beside ours for the same pair. Lock hold times come from a separate run with --lock-stats.
half=$dir/half-2G.qcow2
if [ ! -f "$half" ]; then
    cp "$full" "$half.part" && qemu-img resize -q "$half.part" 2G && mv "$half.part" "$half"
fi
reads=$((count * 2))
plain_t=() flusher_t=() locked_t=() qw_t=() qwf_t=() ow_t=() owf_t=()
for ((i = 0; i < runs; i++)); do
    cp "$half" "$scratch"
    read -r t _ _ <<<"$(measure "$ours" bench -t "$cache" -c "$reads" -d 64 -s 4K --random --span 1G "$scratch")"
    plain_t+=("$t")
    read -r t _ _ <<<"$(measure "$ours" bench -t "$cache" -c "$reads" -d 64 -s 4K --random --span 1G \
        --flusher-ms 1 --flusher-offset 1G "$scratch")"
    flusher_t+=("$t")
    read -r t _ _ <<<"$(measure "$ours" bench -t "$cache" -c "$reads" -d 64 -s 4K --random --span 1G \
        --flusher-ms 1 --flusher-offset 1G --writeback-under-lock "$scratch")"
    locked_t+=("$t")
    for who in qemu ours; do
        tool=qemu-img
        [ $who = ours ] && tool=$ours
        refresh 1 "$scratch"
        read -r t _ _ <<<"$(measure "$tool" bench -t "$cache" -c "$count" -w -d 64 -s 4K "$scratch")"
        if [ $who = ours ]; then ow_t+=("$t"); else qw_t+=("$t"); fi
        refresh 1 "$scratch"
        read -r t _ _ <<<"$(measure "$tool" bench -t "$cache" -c "$count" -w -d 64 -s 4K --flush-interval 64 \
            --no-drain "$scratch")"
        if [ $who = ours ]; then owf_t+=("$t"); else qwf_t+=("$t"); fi
    done
done
cp "$half" "$scratch"
"$ours" bench -t "$cache" -c "$reads" -d 64 -s 4K --random --span 1G --flusher-ms 1 --flusher-offset 1G \
    --lock-stats "$scratch" | sed -n 's/^Lock held for /  after (writeback queue): /p'
cp "$half" "$scratch"
"$ours" bench -t "$cache" -c "$reads" -d 64 -s 4K --random --span 1G --flusher-ms 1 --flusher-offset 1G \
    --writeback-under-lock --lock-stats "$scratch" | sed -n 's/^Lock held for /  before (under lock):    /p'
python3 - "${plain_t[*]}" "${flusher_t[*]}" "${locked_t[*]}" "${ow_t[*]}" "${owf_t[*]}" "${qw_t[*]}" "${qwf_t[*]}" <<'PY'
import statistics, sys
plain, flusher, locked, ow, owf, qw, qwf = (statistics.median(float(x) for x in a.split()) for a in sys.argv[1:])
print(f"{'read-flusher-d64':<18} read IOPS with the flusher / without: ours {plain / flusher:5.2f} "
      f"(target >= 0.9), ours with the writeback under the lock {plain / locked:5.2f}")
print(f"{'':<18} 4k allocating writes, IOPS with --flush-interval 64 --no-drain / without: "
      f"ours {ow / owf:5.2f}, qemu-img {qw / qwf:5.2f}")
PY

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

run_case read-zero-d64 0 "$zero" $((count * 20)) -d 64 -s 4K
run_case read-sparse1T-d64 0 "$sparse" "$count" -d 64 -s 4K -S $(((512 << 20) + 4096))
seq=$((count / 4))
BYTES=$((seq * 65536)) run_case read64k-seq-d16 0 "$full" "$seq" -d 16 -s 64K
seq_ours_cpu=("${case_ours_cpu[@]}") seq_qemu_cpu=("${case_qemu_cpu[@]}")
# The physical limit is the same bytes of the same file read raw: a separate raw file of the same data may sit
# elsewhere on the disk and in the host's cache (here it read twice as fast at depth 1), so it is shown too but
# is not the limit.
data_at=$(qemu-img map --output=json "$full" | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["offset"])')
raw_t=() raw_cpu=() same_t=()
for ((i = 0; i < runs; i++)); do
    result=$(measure qemu-img bench -t "$cache" -f raw -c "$seq" -d 16 -s 64K "$raw")
    read -r t _ cpu <<<"$result"
    raw_t+=("$t") raw_cpu+=("$cpu")
    result=$(measure qemu-img bench -t "$cache" -f raw -c "$seq" -d 16 -s 64K -o "$data_at" "$full")
    read -r t _ _ <<<"$result"
    same_t+=("$t")
done
python3 - "${raw_t[*]}" "${same_t[*]}" "$((seq * 65536))" "$data_at" <<'PY'
import statistics, sys
raw = statistics.median(float(x) for x in sys.argv[1].split())
same = statistics.median(float(x) for x in sys.argv[2].split())
n = int(sys.argv[3])
print(f"{'same-file 64k-seq':<18} qemu-img bench -f raw -o {sys.argv[4]} over the qcow2 file {same:8.3f} s, "
      f"{n / same / 1e6:7.0f} MB/s: the physical limit for read64k-seq-d16 (the same bytes of the same file)")
print(f"{'raw-file 64k-seq':<18} qemu-img bench -f raw on a separate raw file of the same data {raw:8.3f} s, "
      f"{n / raw / 1e6:7.0f} MB/s (not the limit: another file, placed and cached differently)")
PY
# The pread loop goes through the page cache exactly when the benches do (every mode but none and directsync).
case $cache in
    none | directsync) pread_mode=() pread_label="O_DIRECT" ;;
    *) pread_mode=(--buffered) pread_label="buffered" ;;
esac
pread_cpu=() pread_bytes=0
for ((i = 0; i < runs; i++)); do
    result=$(timed "$pread_loop" "$raw" 65536 "${pread_mode[@]}")
    read -r _ cpu <<<"$result"
    pread_cpu+=("$cpu")
    pread_bytes=$(sed -n 's/^bytes \([0-9]*\) seconds .*/\1/p' "$logs/out.log")
    [ -n "$pread_bytes" ] || { echo "bench-engine: no byte count from pread_loop:" >&2; cat "$logs/out.log" >&2; exit 1; }
done
python3 - "${seq_ours_cpu[*]}" "${seq_qemu_cpu[*]}" "${raw_cpu[*]}" "${pread_cpu[*]}" "$((seq * 65536))" "$pread_bytes" "$pread_label" <<'PY'
import statistics, sys
ours, qemu, raw, pread, nbytes, pread_bytes, label = sys.argv[1:]
gib = 1 << 30
def per_gib(cpus, moved):
    return statistics.median(float(x) for x in cpus.split()) / (int(moved) / gib)
print(f"cpu-per-GiB 64k-seq: ours {per_gib(ours, nbytes):.3f} s, qemu-img {per_gib(qemu, nbytes):.3f} s, "
      f"pread loop {per_gib(pread, pread_bytes):.3f} s ({label}) (user+sys; qemu-img -f raw "
      f"{per_gib(raw, nbytes):.3f} s; the benches' figures include opening and closing)")
PY
small=$(((256 << 20) / 65536))
BYTES=$((small * 65536)) run_case read64k-zlib 0 "$dir/text-zlib.qcow2" "$small" -d 16 -s 64K
BYTES=$((small * 65536)) run_case read64k-zstd 0 "$dir/text-zstd.qcow2" "$small" -d 16 -s 64K
qemu-img check -q "$full" && qemu-img check -q "$scratch" && echo "qemu-img check: both images clean"
