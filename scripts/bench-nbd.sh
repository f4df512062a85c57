#!/usr/bin/env bash
# NBD serving: `qcow-tool serve` against `qemu-nbd` on the same qcow2 image, with the same client and the same
# settings, alternating server by server in each run. Prints per-workload medians, the ratio ours/qemu-nbd
# (above 1.0: we are faster), each server's peak RSS and its CPU time (user + system, median per run): on a
# shared, loaded machine the CPU a server burns for the same work is steadier than its throughput.
#
# Workloads:
#   randread   fio (ioengine=nbd) 4 KiB random reads, queue depth 64, on a 1 GiB image full of data
#   randwrite  fio 4 KiB random writes, queue depth 64, into a fully preallocated 1 GiB image
#   nbdcopy    nbdcopy of the 1 GiB data image to null: (one connection, its default 64 requests in flight)
#
# Both servers use the page cache (qemu-nbd --cache=writeback, its default; ours has no O_DIRECT) and serve one
# connection; nbdcopy is pinned to one connection so multi-conn advertising cannot tip the balance.
#
# Environment:
#   QCOW_BENCH_DIR  work directory (default: <target dir>/bench-nbd)
#   BENCH_RUNS      runs of each workload per server (default: 3)
#   BENCH_RUNTIME   seconds per fio run (default: 10)
#   BENCH_THREADS   worker threads per connection for ours (default: qcow-tool's default)
#   BENCH_WORKLOADS the workloads to run (default: "randread randwrite nbdcopy")
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dir=${QCOW_BENCH_DIR:-$target/bench-nbd}
runs=${BENCH_RUNS:-3}
runtime=${BENCH_RUNTIME:-10}
workloads=${BENCH_WORKLOADS:-randread randwrite nbdcopy}
for t in qemu-img qemu-nbd:qemu-utils fio nbdcopy:libnbd-bin /usr/bin/time:time python3; do
    cmd=${t%%:*}; pkg=${t#*:}
    command -v "$cmd" >/dev/null || { echo "bench-nbd: $cmd not found: install $pkg" >&2; exit 1; }
done

echo "building qcow-tool (release)..." >&2
cargo build --release -q -p qcow-tool --manifest-path "$root/Cargo.toml"
tool=$target/release/qcow-tool
mkdir -p "$dir"

data=$dir/data.qcow2
prealloc=$dir/prealloc.qcow2
if [ ! -f "$data" ]; then
    echo "making a 1 GiB qcow2 image full of random data..." >&2
    head -c 1G /dev/urandom > "$dir/data.raw"
    qemu-img convert -f raw -O qcow2 "$dir/data.raw" "$data"
    rm -f "$dir/data.raw"
fi
if [ ! -f "$prealloc" ]; then
    qemu-img create -q -f qcow2 -o preallocation=full "$prealloc" 1G
fi

port_file=$dir/port
server_pid=
# Starts a server on a free port: $1 = ours|qemu, $2 = image. Sets $uri; RSS goes to $dir/$1.rss.
start() {
    local which=$1 image=$2 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    if [ "$which" = ours ]; then
        /usr/bin/time -f '%M %U %S' -o "$dir/$which.rss" "$tool" serve --bind "127.0.0.1:$port" --export-name disk \
            ${BENCH_THREADS:+--threads "$BENCH_THREADS"} "$image" >/dev/null 2>"$dir/$which.log" &
    else
        /usr/bin/time -f '%M %U %S' -o "$dir/$which.rss" qemu-nbd -f qcow2 --cache=writeback --aio=threads -b 127.0.0.1 \
            -p "$port" -x disk --persistent "$image" >/dev/null 2>"$dir/$which.log" &
    fi
    server_pid=$!
    uri=nbd://127.0.0.1:$port/disk
    for _ in $(seq 100); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "bench-nbd: $which did not start: $(cat "$dir/$which.log")" >&2
    exit 1
}
stop() {
    # /usr/bin/time's child is the server: signal it, then wait for time to write the RSS.
    pkill -TERM -P "$server_pid" || true
    wait "$server_pid" || true
    server_pid=
}
trap '[ -n "$server_pid" ] && stop' EXIT

# fio's IOPS for a workload: $1 = rw mode.
fio_iops() {
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$1" --bs=4k --iodepth=64 --size=1G --runtime="$runtime" \
        --time_based --randrepeat=0 --norandommap --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(j["read"]["iops"]+j["write"]["iops"])'
}
copy_mbs() {
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy --connections=1 "$uri" null:
    t1=$(date +%s.%N)
    echo "1073.741824 / ($t1 - $t0)" | bc -l
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
max() { sort -g | tail -1; }

declare -A results rss cpu
for run in $(seq "$runs"); do
    for which in ours qemu; do
        for workload in $workloads; do
            image=$data
            [ "$workload" = randwrite ] && image=$prealloc
            start "$which" "$image"
            case $workload in
                randread|randwrite) value=$(fio_iops "$workload") ;;
                nbdcopy) value=$(copy_mbs) ;;
            esac
            stop
            results[$which.$workload]+="$value "
            read -r kib user sys < <(tail -1 "$dir/$which.rss")
            rss[$which.$workload]+="$kib "
            cpu[$which.$workload]+="$(echo "$user + $sys" | bc -l) "
            echo "run $run $which $workload: $value" >&2
        done
    done
done

printf 'qcow-tool serve vs qemu-nbd (%s); %s runs each, alternating; fio %s s per run; load average %s\n' \
    "$(qemu-nbd --version | head -1)" "$runs" "$runtime" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %-6s %10s %10s %7s %13s %13s %9s %9s\n' workload unit ours qemu-nbd ratio "ours RSS KiB" "qemu RSS KiB" "ours CPU" "qemu CPU"
for workload in $workloads; do
    unit=IOPS; [ "$workload" = nbdcopy ] && unit=MB/s
    o=$(echo "${results[ours.$workload]}" | tr ' ' '\n' | grep . | median)
    q=$(echo "${results[qemu.$workload]}" | tr ' ' '\n' | grep . | median)
    ro=$(echo "${rss[ours.$workload]}" | tr ' ' '\n' | grep . | max)
    rq=$(echo "${rss[qemu.$workload]}" | tr ' ' '\n' | grep . | max)
    co=$(echo "${cpu[ours.$workload]}" | tr ' ' '\n' | grep . | median)
    cq=$(echo "${cpu[qemu.$workload]}" | tr ' ' '\n' | grep . | median)
    printf '%-10s %-6s %10.0f %10.0f %7.2f %13s %13s %8.2fs %8.2fs\n' "$workload" "$unit" "$o" "$q" "$(echo "$o / $q" | bc -l)" \
        "$ro" "$rq" "$co" "$cq"
done
for workload in $workloads; do
    printf '  %s runs: ours %s| qemu-nbd %s\n' "$workload" "${results[ours.$workload]}" "${results[qemu.$workload]}"
done
