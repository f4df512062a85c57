#!/bin/sh
# Regenerates the seed corpora in fuzz/corpus/ from qemu-img and qemu-io. Run from the fuzz/ directory.
# The images are tiny on purpose (512-byte and 4 KiB clusters, a few writes): libFuzzer mutates whole inputs,
# so every byte of a seed costs time on every execution.
set -eu
out=corpus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mk() { # name create-options size qemu-io-commands...
    name=$1 opts=$2 size=$3
    shift 3
    qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name" "$size"
    for c in "$@"; do
        qemu-io -f qcow2 -c "$c" "$tmp/$name" >/dev/null
    done
}

mk v3-512-empty cluster_size=512 64k
mk v3-512-writes cluster_size=512 64k "write -P 0x11 0 1536" "write -P 0x22 8k 512" "write -z 16k 1k"
mk v2-512-writes compat=0.10,cluster_size=512 64k "write -P 0x33 512 1k" "write -P 0x44 32k 512"
mk v3-4k-writes cluster_size=4k 1M "write -P 0x55 0 4k" "write -P 0x66 512k 8k" "discard 512k 4k"
mk v3-512-rc1 cluster_size=512,refcount_bits=1 64k "write -P 0x77 1k 1k"
mk v3-512-rc64 cluster_size=512,refcount_bits=64 64k "write -P 0x78 1k 1k"
mk v3-512-lazy cluster_size=512,lazy_refcounts=on 64k "write -P 0x79 0 512"
mk v3-4k-extl2 cluster_size=16k,extended_l2=on 256k "write -P 0x7a 1k 1k" "write -z 8k 2k"
mk v3-512-zstd cluster_size=512,compression_type=zstd 64k "write -c -P 0x7b 0 512"

# Internal snapshot: writes before and after it, so L2 tables are shared and then copied.
mk v3-512-snap cluster_size=512 64k "write -P 0x01 0 1k"
qemu-img snapshot -c snap1 "$tmp/v3-512-snap"
qemu-io -f qcow2 -c "write -P 0x02 512 512" "$tmp/v3-512-snap" >/dev/null

# Compressed clusters: a deflate-compressed copy of a patterned image.
mk src cluster_size=4k 64k "write -P 0x5a 0 8k" "write -P 0xa5 32k 4k"
qemu-img convert -q -c -f qcow2 -O qcow2 -o cluster_size=4k "$tmp/src" "$tmp/v3-4k-compressed"
rm "$tmp/src"

# A backing file name (the fuzz targets supply an in-memory backing) and a named external data file.
qemu-img create -q -f qcow2 -o cluster_size=512 "$tmp/base" 64k
qemu-img create -q -f qcow2 -o cluster_size=512 -b base -F qcow2 "$tmp/v3-512-backed" 64k
qemu-io -f qcow2 -c "write -P 0x0b 4k 512" "$tmp/v3-512-backed" >/dev/null
rm "$tmp/base"
(cd "$tmp" && qemu-img create -q -f qcow2 -o cluster_size=512,data_file=data.raw v3-512-datafile 64k &&
    qemu-io -f qcow2 -c "write -P 0x0d 0 1k" v3-512-datafile >/dev/null && rm data.raw)

# Deliberate inconsistencies for the checker: a leaked cluster and an over-referenced one.
mk v3-512-leak cluster_size=512 64k "write -P 0x21 0 512"
# The file gets one more cluster that nothing references but whose refcount is 1 (a leak), and the data
# cluster's refcount becomes 2 (a corruption: qemu-img check sees refcount 2, reference 1).
be64() { od -An -tx1 -j "$2" -N 8 "$1" | tr -d ' \n'; }
rt=$((0x$(be64 "$tmp/v3-512-leak" 48)))
blk=$((0x$(be64 "$tmp/v3-512-leak" "$rt")))
len=$(stat -c %s "$tmp/v3-512-leak")
last=$((len / 512 - 1))
truncate -s $((len + 512)) "$tmp/v3-512-leak"
printf '\000\002\000\001' | dd of="$tmp/v3-512-leak" bs=1 seek=$((blk + 2 * last)) conv=notrunc status=none

# For compaction: holes below data to move into, and a refcount table entry zeroed (compaction must refuse it).
mk v3-512-holes cluster_size=512 64k "write -P 0x31 0 8k" "write -P 0x32 32k 4k" "discard 1k 4k"
cp "$tmp/v3-512-holes" "$tmp/v3-512-reftable-zeroed"
rt=$((0x$(be64 "$tmp/v3-512-reftable-zeroed" 48)))
printf '\000\000\000\000\000\000\000\000' | dd of="$tmp/v3-512-reftable-zeroed" bs=1 seek="$rt" conv=notrunc status=none

for f in "$tmp"/*; do
    n=$(basename "$f")
    for t in open_read check compact; do cp "$f" "$out/$t/$n"; done
    # The header target only ever looks at cluster 0.
    head -c 4096 "$f" >"$out/header/$n"
done
