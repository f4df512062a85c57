#!/usr/bin/env bash
# Builds the hostile-image corpus: small qcow2 images made by qemu-img and qemu-io, then broken on purpose with
# byte pokes and truncations modelled on QEMU's iotests 060 (overlapping metadata), 080 (header input
# validation), 108 (refcount structures that cannot be trusted), 112 (refcount widths), 138 (a data cluster
# at 32 PB), 214 (compressed descriptors with a bad sector count) and 261 (snapshot table extra data).
#
# Usage: make-corpus.sh OUTDIR
# Each image is named after what it breaks. Only qemu-img, qemu-io, printf and dd are used, so the corpus can be
# rebuilt anywhere QEMU is installed.
#
# Offsets: header fields are at the fixed offsets of the qcow2 specification. Everything else (L1, L2 and
# refcount tables, data clusters, the snapshot table) is found by reading the header and the tables with
# `peek`, never assumed from qemu-img's layout, except where a comment says so.
set -euo pipefail
export LC_ALL=C

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
if [ ! -d "$OUT" ]; then
    echo "$0: $OUT is not a directory" >&2
    exit 2
fi

# Header field offsets (qcow2 specification).
OFF_VERSION=4
OFF_BACKING_OFFSET=8
OFF_BACKING_SIZE=16
OFF_CLUSTER_BITS=20
OFF_SIZE=24
OFF_CRYPT=32
OFF_L1_SIZE=36
OFF_L1_OFFSET=40
OFF_RT_OFFSET=48
OFF_RT_CLUSTERS=56
OFF_NB_SNAPSHOTS=60
OFF_SNAPSHOTS_OFFSET=64
OFF_INCOMPAT=72
OFF_AUTOCLEAR=88
OFF_REFCOUNT_ORDER=96
OFF_HEADER_LENGTH=100
# Host offset bits of an L1 or standard L2 entry.
OFFSET_MASK=$((0x00fffffffffffe00))

# peek FILE OFFSET LEN: the big-endian unsigned value of LEN bytes (bash arithmetic: 8-byte values with the top
# bit set come out negative, which masking handles). A byte is read as a character; NUL reads as empty, which
# printf turns into 0.
peek() {
    local value=0 c
    while IFS= read -r -d '' -n 1 c; do
        value=$((value * 256 + $(printf '%d' "'$c")))
    done < <(dd if="$1" bs=1 skip="$2" count="$3" status=none)
    echo "$value"
}

# poke FILE OFFSET BYTES: writes printf-escaped BYTES (e.g. '\xff\x00') at OFFSET, as iotests' poke_file does.
poke() {
    printf "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# poke_be FILE OFFSET LEN VALUE: writes VALUE as LEN big-endian bytes.
poke_be() {
    local bytes="" i
    for ((i = $3 - 1; i >= 0; i--)); do
        bytes+=$(printf '\\x%02x' $((($4 >> (8 * i)) & 255)))
    done
    poke "$1" "$2" "$bytes"
}

# truncate_to FILE LEN: cuts (or extends with a hole) FILE to LEN bytes.
truncate_to() {
    dd if=/dev/null of="$1" bs=1 seek="$2" status=none
}

l1_offset() { peek "$1" $OFF_L1_OFFSET 8; }
rt_offset() { peek "$1" $OFF_RT_OFFSET 8; }
snapshots_offset() { peek "$1" $OFF_SNAPSHOTS_OFFSET 8; }
# l1_entry_at FILE INDEX: where L1 entry INDEX is stored.
l1_entry_at() { echo $(($(l1_offset "$1") + 8 * $2)); }
# l2_table FILE L1_INDEX: host offset of the L2 table that L1 entry L1_INDEX points at.
l2_table() { echo $(($(peek "$1" "$(l1_entry_at "$1" "$2")" 8) & OFFSET_MASK)); }
# l2_entry_at FILE INDEX: where the L2 entry of guest cluster INDEX (in the first L2 table) is stored.
l2_entry_at() { echo $(($(l2_table "$1" 0) + 8 * $2)); }
# data_cluster FILE INDEX: host offset of guest cluster INDEX (first L2 table, standard cluster).
data_cluster() { echo $(($(peek "$1" "$(l2_entry_at "$1" "$2")" 8) & OFFSET_MASK)); }
# refblock0 FILE: host offset of the first refcount block.
refblock0() { echo $(($(peek "$1" "$(rt_offset "$1")" 8) & ~511)); }

# make NAME CREATE_OPTS SIZE [QEMU_IO_COMMAND...]: a fresh image, optionally with data written by qemu-io. The
# path is left in $IMG.
make() {
    local name=$1 opts=$2 size=$3
    shift 3
    IMG="$OUT/$name.qcow2"
    rm -f "$IMG"
    if [ -n "$opts" ]; then
        qemu-img create -q -f qcow2 -o "$opts" "$IMG" "$size"
    else
        qemu-img create -q -f qcow2 "$IMG" "$size"
    fi
    if [ $# -gt 0 ]; then
        local args=() c
        for c in "$@"; do
            args+=(-c "$c")
        done
        qemu-io -f qcow2 "${args[@]}" "$IMG" >/dev/null
    fi
}

# A small image with data in two L2 tables' worth of guest space; the shape most pokes start from.
make_data() {
    make "$1" "${2:-}" 16M 'write -P 0x11 0 64k' 'write -P 0x22 64k 64k' 'write -P 0x33 1M 64k'
}

# ---- Header fields (iotest 080) ----

make header_length_huge "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $OFF_HEADER_LENGTH '\xff\xff\xff\xff'

make header_length_int_max "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $OFF_HEADER_LENGTH '\x7f\xff\xff\xff'

make header_length_zero "" 16M
poke "$IMG" $OFF_HEADER_LENGTH '\x00\x00\x00\x00'

make header_length_below_v3 "" 16M
poke_be "$IMG" $OFF_HEADER_LENGTH 4 96

make extension_length_huge "" 16M
poke_be "$IMG" $OFF_BACKING_OFFSET 8 0
# The first extension starts right after the 104-byte v3 header when there is no feature-name table move; put
# an unknown extension there whose length runs far past the header cluster.
header_len=$(peek "$IMG" $OFF_HEADER_LENGTH 4)
poke "$IMG" "$header_len" '\x12\x34\x56\x78\x7f\xff\xff\xff'

make extension_length_past_cluster "" 16M
header_len=$(peek "$IMG" $OFF_HEADER_LENGTH 4)
poke "$IMG" "$header_len" '\x12\x34\x56\x78'
poke_be "$IMG" $((header_len + 4)) 4 65536

make extension_backing_offset_huge "" 16M
poke "$IMG" $OFF_BACKING_OFFSET '\xff\xff\xff\xff\xff\xff\xff\xff'
poke "$IMG" $OFF_BACKING_SIZE '\x00\x00\x00\x10'

make refcount_table_clusters_huge "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $OFF_RT_CLUSTERS '\xff\xff\xff\xff'

make refcount_table_clusters_overflow "" 16M
poke "$IMG" $OFF_RT_CLUSTERS '\x00\x02\x00\x01'

make refcount_table_clusters_zero "" 16M 'write -P 0x11 0 64k'
poke "$IMG" $OFF_RT_CLUSTERS '\x00\x00\x00\x00'

make refcount_table_misaligned "" 16M
poke "$IMG" $OFF_RT_OFFSET '\x12\x34\x56\x78\x90\xab\xcd\xef'

make refcount_table_offset_huge "" 16M
poke "$IMG" $OFF_RT_OFFSET '\xff\xff\xff\xff\xff\xff\x00\x00'
poke "$IMG" $OFF_RT_CLUSTERS '\x00\x00\x00\x7f'

make nb_snapshots_huge "" 16M
poke "$IMG" $OFF_NB_SNAPSHOTS '\xff\xff\xff\xff'

make nb_snapshots_int_max "" 16M
poke "$IMG" $OFF_NB_SNAPSHOTS '\x7f\xff\xff\xff'

make snapshots_offset_huge "" 16M
poke "$IMG" $OFF_SNAPSHOTS_OFFSET '\xff\xff\xff\xff\xff\xff\x00\x00'
poke "$IMG" $OFF_NB_SNAPSHOTS '\x00\x00\xff\xff'

make snapshots_offset_misaligned "" 16M
poke "$IMG" $OFF_SNAPSHOTS_OFFSET '\x12\x34\x56\x78\x90\xab\xcd\xef'
poke "$IMG" $OFF_NB_SNAPSHOTS '\x00\x00\x00\x01'

make l1_size_huge "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $OFF_L1_SIZE '\xff\xff\xff\xff'

make l1_size_int_max "" 16M
poke "$IMG" $OFF_L1_SIZE '\x7f\xff\xff\xff'

make l1_offset_huge "" 16M
poke "$IMG" $OFF_L1_OFFSET '\x7f\xff\xff\xff\xff\xff\x00\x00'
poke "$IMG" $OFF_L1_SIZE '\x00\x00\xff\xff'

make l1_offset_misaligned "" 16M
poke "$IMG" $OFF_L1_OFFSET '\x12\x34\x56\x78\x90\xab\xcd\xef'
poke "$IMG" $OFF_L1_SIZE '\x00\x00\x00\x01'

make l1_size_zero "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $OFF_L1_SIZE '\x00\x00\x00\x00'

make l1_size_zero_with_snapshot "" 64M 'write -P 0x11 0 4k'
qemu-img snapshot -c foo "$IMG"
poke "$IMG" $OFF_L1_SIZE '\x00\x00\x00\x00'

make virtual_size_huge "" 16M
poke "$IMG" $OFF_SIZE '\x01\x00\x00\x00\x00\x00\x00\x00'

make backing_name_length_huge "" 16M
poke "$IMG" $OFF_BACKING_OFFSET '\x00\x00\x00\x00\x00\x00\x10\x00'
poke "$IMG" $OFF_BACKING_SIZE '\xff\xff\xff\xff'

make backing_name_past_cluster "" 16M
poke_be "$IMG" $OFF_BACKING_OFFSET 8 $((65536 - 16))
poke_be "$IMG" $OFF_BACKING_SIZE 4 64

make incompatible_unknown_bit "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $((OFF_INCOMPAT + 7)) '\x80'

make incompatible_bit_63 "" 16M
poke "$IMG" $OFF_INCOMPAT '\x80'

make autoclear_unknown_bit "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $((OFF_AUTOCLEAR + 7)) '\x40'

make corrupt_bit_set "" 16M 'write -P 0x11 0 4k'
poke "$IMG" $((OFF_INCOMPAT + 7)) '\x02'

make version_4 "" 16M
poke "$IMG" $OFF_VERSION '\x00\x00\x00\x04'

make bad_magic "" 16M
poke "$IMG" 0 'QFI\x00'

make cluster_bits_huge "" 16M
poke "$IMG" $OFF_CLUSTER_BITS '\x00\x00\x00\x20'

make cluster_bits_tiny "" 16M
poke "$IMG" $OFF_CLUSTER_BITS '\x00\x00\x00\x08'

make refcount_order_huge "" 16M
poke "$IMG" $OFF_REFCOUNT_ORDER '\x00\x00\x00\x07'

make crypt_method_unknown "" 16M
poke "$IMG" $OFF_CRYPT '\x00\x00\x00\x03'

# ---- Overlapping and self-referencing metadata (iotest 060) ----

# The first L1 entry points at the L1 table itself (COPIED set, so the refcount should be 1).
make l1_points_at_l1 "" 16M
poke_be "$IMG" "$(l1_entry_at "$IMG" 0)" 8 $(((1 << 63) | $(l1_offset "$IMG")))

# An L2 table is made by hand: L1 points at a cluster past the end that is marked used, and its first entry
# points at the first refcount block.
make l2_points_at_refblock "" 16M
l1=$(l1_offset "$IMG")
rb=$(refblock0 "$IMG")
rt=$(rt_offset "$IMG")
# The first cluster past all of a fresh image's metadata (64 KiB clusters), where QEMU would put an L2 table.
l2=$(((l1 > rb ? (l1 > rt ? l1 : rt) : (rb > rt ? rb : rt)) + 65536))
truncate_to "$IMG" $((l2 + 65536))
poke_be "$IMG" "$l1" 8 $(((1 << 63) | l2))
poke_be "$IMG" $((rb + 2 * (l2 / 65536))) 2 1
poke_be "$IMG" "$l2" 8 $(((1 << 63) | rb))

make_data l2_points_at_reftable
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 $(((1 << 63) | $(rt_offset "$IMG")))

make_data l2_points_at_l1
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 $(((1 << 63) | $(l1_offset "$IMG")))

make_data l2_points_at_itself
l2=$(l2_table "$IMG" 0)
poke_be "$IMG" "$l2" 8 $(((1 << 63) | l2))

make_data l2_points_at_header_misaligned
poke_be "$IMG" "$(l2_entry_at "$IMG" 1)" 8 $(((1 << 63) | 512))

make_data l1_points_at_header
poke_be "$IMG" "$(l1_entry_at "$IMG" 0)" 8 $(((1 << 63) | 0))

make_data l1_points_at_refblock
poke_be "$IMG" "$(l1_entry_at "$IMG" 0)" 8 $(((1 << 63) | $(refblock0 "$IMG")))

make_data reftable_points_at_itself
rt=$(rt_offset "$IMG")
poke_be "$IMG" "$rt" 8 "$rt"

make_data two_l2_entries_share_a_cluster
poke_be "$IMG" "$(l2_entry_at "$IMG" 1)" 8 $(((1 << 63) | $(data_cluster "$IMG" 0)))

# A data cluster referenced from the inactive (snapshot) L2 table is also given to the active one.
make snapshot_l2_shared_with_data "" 16M 'write -P 1 0 512'
qemu-img snapshot -c foo "$IMG"
qemu-io -f qcow2 -c 'write -P 2 0 512' "$IMG" >/dev/null
snap_l1=$(peek "$IMG" "$(snapshots_offset "$IMG")" 8)
snap_l2=$(($(peek "$IMG" "$snap_l1" 8) & OFFSET_MASK))
poke_be "$IMG" "$(l2_entry_at "$IMG" 1)" 8 $(((1 << 63) | snap_l2))

# ---- Entries out of the file or misaligned (iotests 060, 080, 138) ----

make_data l2_offset_huge
poke "$IMG" "$(l2_entry_at "$IMG" 0)" '\x80\x00\x00\xff\xff\xff\x00\x00'

make_data l2_compressed_offset_huge
poke "$IMG" "$(l2_entry_at "$IMG" 0)" '\xbf\xff\xff\xff\xff\xff\x00\x00'

make_data l2_entry_misaligned
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 $(((1 << 63) | ($(data_cluster "$IMG" 0) + 512)))

make_data l1_entry_misaligned
poke_be "$IMG" "$(l1_entry_at "$IMG" 0)" 8 $(((1 << 63) | ($(l2_table "$IMG" 0) + 512)))

make_data l1_entry_past_eof
poke "$IMG" "$(l1_entry_at "$IMG" 0)" '\x80\x00\x00\x00\x40\x00\x00\x00'

make_data l2_entry_past_eof
poke "$IMG" "$(l2_entry_at "$IMG" 1)" '\x80\x00\x00\x00\x40\x00\x00\x00'

make_data reftable_entry_misaligned
rt=$(rt_offset "$IMG")
poke_be "$IMG" "$rt" 8 $(($(refblock0 "$IMG") + 512))

# iotest 138: a data cluster at 32 PB, so a checker sizing its refcount array by the largest offset seen would
# need terabytes.
make data_cluster_at_32pb cluster_size=512 512 'write 0 512'
poke "$IMG" "$(l2_entry_at "$IMG" 0)" '\x80\x80\x00\x00\x00\x00\x00\x00'

# ---- Refcount structures (iotests 108, 112) ----

make_data reftable_offset_zero
poke "$IMG" $OFF_RT_OFFSET '\x00\x00\x00\x00\x00\x00\x00\x00'
poke "$IMG" $OFF_RT_CLUSTERS '\x00\x00\x00\x00'

# A second refcount block past the end of the file, marked used in the first block (108, "otherwise clean").
make refblock_beyond_end "" 16M
rt=$(rt_offset "$IMG")
poke_be "$IMG" $((rt + 8)) 8 $((0x100000))
poke_be "$IMG" $(($(refblock0 "$IMG") + 2 * 16)) 2 1

make refblock_unallocated "" 16M
poke_be "$IMG" $(($(rt_offset "$IMG") + 8)) 8 $((0x100000))

make refblock_signed_overflow "" 16M
poke "$IMG" $(($(rt_offset "$IMG") + 8)) '\x7f\xff\xff\xff\xff\xff\x00\x00'

make refblock_unsigned_overflow "" 16M
poke "$IMG" $(($(rt_offset "$IMG") + 8)) '\xff\xff\xff\xff\xff\xff\x00\x00'

make_data refcount_of_data_zero
poke_be "$IMG" $(($(refblock0 "$IMG") + 2 * ($(data_cluster "$IMG" 0) / 65536))) 2 0

make_data refcount_of_l2_zero
poke_be "$IMG" $(($(refblock0 "$IMG") + 2 * ($(l2_table "$IMG" 0) / 65536))) 2 0

make_data refcount_of_header_zero
poke_be "$IMG" "$(refblock0 "$IMG")" 2 0

make_data refcount_too_high
poke_be "$IMG" $(($(refblock0 "$IMG") + 2 * ($(data_cluster "$IMG" 1) / 65536))) 2 7

# A refcount for cluster 200, far past the end of the file. qemu-img check only compares clusters inside the
# file, so QEMU calls this image fine; a checker must not call it leaked.
make_data refcount_leak_past_end
poke_be "$IMG" $(($(refblock0 "$IMG") + 2 * 200)) 2 1

make msb_set_64bit_refcount refcount_bits=64 16M 'write 0 512'
poke "$IMG" $(($(refblock0 "$IMG") + 8 * ($(data_cluster "$IMG" 0) / 65536))) '\x80\x00\x00\x00\x00\x00\x00\x00'
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 "$(data_cluster "$IMG" 0)"

make max_64bit_refcount refcount_bits=64 16M 'write 0 512'
poke "$IMG" $(($(refblock0 "$IMG") + 8 * ($(data_cluster "$IMG" 0) / 65536))) '\xff\xff\xff\xff\xff\xff\xff\xff'
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 "$(data_cluster "$IMG" 0)"

# Two references to one cluster that a 1-bit refcount cannot count: qemu-img wants amend, not repair.
make refcount1_two_references refcount_bits=1 16M 'write 0 64k'
poke_be "$IMG" "$(l2_entry_at "$IMG" 1)" 8 $(((1 << 63) | $(data_cluster "$IMG" 0)))

# 2-bit refcounts: the data cluster's count (2 bits in the first byte of its group of four) cleared. The byte
# holding cluster N's count is N / 4; cluster N's bits sit at (N % 4) * 2 counting from the low bit.
make refcount2_data_cleared refcount_bits=2 16M 'write -P 0x5a 0 64k'
dc=$(($(data_cluster "$IMG" 0) / 65536))
rb=$(refblock0 "$IMG")
byte=$(peek "$IMG" $((rb + dc / 4)) 1)
poke_be "$IMG" $((rb + dc / 4)) 1 $((byte & ~(3 << ((dc % 4) * 2))))

# A cluster inside the file that nothing references, counted 3 (8-bit refcounts: one byte per cluster). The
# data cluster is the last one qemu-io allocated, so the file ends right after it; one cluster is added.
make refcount8_leak refcount_bits=8 16M 'write -P 0x5a 0 64k'
end=$(($(data_cluster "$IMG" 0) + 65536))
truncate_to "$IMG" $((end + 65536))
poke_be "$IMG" $(($(refblock0 "$IMG") + end / 65536)) 1 3

make copied_flag_missing "" 16M 'write -P 0x5a 0 64k'
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 "$(data_cluster "$IMG" 0)"

# ---- Compressed clusters (iotest 214) ----

# 2 MiB clusters, two compressed clusters. qemu-img places the L2 table at 0x800000 for this layout; it is read
# from L1 here anyway. Sector-count field: bits 49..61 for 2 MiB clusters (62 - (21 - 8)).
make compressed_sectors_short cluster_size=2M 8M 'write -c -P 0x11 0 2M' 'write -c -P 0x11 2M 2M'
poke "$IMG" "$(l2_entry_at "$IMG" 0)" '\x40\x06'

make compressed_sectors_max_past_eof cluster_size=2M 8M 'write -c -P 0x11 0 2M' 'write -c -P 0x11 2M 2M'
poke "$IMG" "$(l2_entry_at "$IMG" 0)" '\x7f\xfe'
poke "$IMG" "$(l2_entry_at "$IMG" 1)" '\x7f\xfe'

make compressed_sectors_max cluster_size=2M 8M 'write -c -P 0x11 0 2M' 'write -c -P 0x11 2M 2M' \
    'write -P 0x22 4M 4M'
poke "$IMG" "$(l2_entry_at "$IMG" 0)" '\x7f\xfe'
poke "$IMG" "$(l2_entry_at "$IMG" 1)" '\x7f\xfe'

# 64 KiB clusters: the offset field is bits 0..53; a descriptor pointing at the header, 1 sector.
make compressed_points_at_header "" 16M 'write -c -P 0x11 0 64k'
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 $(((1 << 62) | 0))

make compressed_points_at_l1 "" 16M 'write -c -P 0x11 0 64k'
poke_be "$IMG" "$(l2_entry_at "$IMG" 0)" 8 $(((1 << 62) | (3 << 54) | $(l1_offset "$IMG")))

make compressed_garbage_data "" 16M 'write -c -P 0x11 0 64k'
desc=$(peek "$IMG" "$(l2_entry_at "$IMG" 0)" 8)
poke "$IMG" $((desc & ((1 << 54) - 1))) '\xde\xad\xbe\xef\xde\xad\xbe\xef'

# ---- Snapshot tables (iotests 080, 261) ----

make snapshot_l1_offset_misaligned "" 16M 'write 0 512'
qemu-img snapshot -c test "$IMG"
poke "$IMG" "$(snapshots_offset "$IMG")" '\x00\x00\x00\x00\x00\x40\x02\x00'

make snapshot_l1_size_huge "" 16M 'write 0 512'
qemu-img snapshot -c test "$IMG"
poke "$IMG" $(($(snapshots_offset "$IMG") + 8)) '\x10\x00\x00\x00'

make snapshot_extra_data_huge "" 16M 'write 0 512'
qemu-img snapshot -c sn0 "$IMG"
qemu-img snapshot -c sn1 "$IMG"
# The extra-data length of the last entry; entries are 40 bytes + extra + id + name, padded to 8.
so=$(snapshots_offset "$IMG")
entry_len() {
    local n=$((40 + $(peek "$1" $(($2 + 36)) 4) + $(peek "$1" $(($2 + 12)) 2) + $(peek "$1" $(($2 + 14)) 2)))
    echo $(((n + 7) / 8 * 8))
}
sn1=$((so + $(entry_len "$IMG" "$so")))
poke "$IMG" $((sn1 + 36)) '\x00\x01\x00\x00'

# A v2 image with a snapshot (16-byte extra data), relabelled v3 with its extra data cut to none: v3 requires
# the disk-size field, so the entry no longer conforms (261, "botched v3").
make v2_snapshot_relabelled_v3 compat=0.10 16M 'write 0 512'
qemu-img snapshot -c sn0 "$IMG"
so=$(snapshots_offset "$IMG")
poke_be "$IMG" $((so + 36)) 4 0
poke "$IMG" $OFF_VERSION '\x00\x00\x00\x03'
poke_be "$IMG" $OFF_HEADER_LENGTH 4 104
poke_be "$IMG" $OFF_REFCOUNT_ORDER 4 4

make snapshot_id_length_huge "" 16M 'write 0 512'
qemu-img snapshot -c sn0 "$IMG"
poke "$IMG" $(($(snapshots_offset "$IMG") + 12)) '\xff\xff\xff\xff'

# ---- Truncated files ----

make truncated_header "" 16M
truncate_to "$IMG" 50

make truncated_empty "" 16M
truncate_to "$IMG" 0

make_data truncated_in_reftable
truncate_to "$IMG" $(($(rt_offset "$IMG") + 4))

make_data truncated_in_l2
truncate_to "$IMG" $(($(l2_table "$IMG" 0) + 4096))

make_data truncated_data
truncate_to "$IMG" $(($(data_cluster "$IMG" 1) + 100))

# ---- Other layouts ----

make extended_l2_alloc_and_zero "extended_l2=on" 16M 'write -P 0x11 0 64k'
# Extended L2 entries are 16 bytes: the bitmap word follows the offset word. Setting a subcluster both allocated
# (low 32 bits) and zero (high 32 bits) is invalid.
l2e=$(($(l2_table "$IMG" 0)))
poke "$IMG" $((l2e + 8)) '\x00\x00\x00\x01\xff\xff\xff\xff'

make dirty_with_stale_refcounts lazy_refcounts=on 16M
# qemu-io kills itself before closing the image; the subshell keeps the shell's "Killed" notice quiet.
(qemu-io -f qcow2 -c 'write -P 0x22 64k 192k' -c 'write -P 0x33 1M 64k' -c 'sigraise 9' "$IMG" >/dev/null 2>&1 ||
    true) 2>/dev/null

make_data clean_with_data
make clean_with_snapshot_and_compressed "" 16M 'write -P 0x11 0 64k' 'write -c -P 0x22 1M 64k'
qemu-img snapshot -c s1 "$IMG"
qemu-io -f qcow2 -c 'write -P 0x44 0 4k' "$IMG" >/dev/null

