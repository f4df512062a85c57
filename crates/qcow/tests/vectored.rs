//! Vectored requests through an image, with QEMU on the other side.
//!
//! "QEMU writes, we read": qemu-io fills an image (data, zero and compressed clusters, unallocated clusters over
//! a backing file), and one vectored read, whose buffers have odd sector counts and cross cluster boundaries, must
//! return what `qemu-img convert -O raw` returns. "We write, QEMU judges": vectored writes across cluster
//! boundaries into such an image must leave it clean for `qemu-img check` and equal, for `qemu-img compare`, to a
//! raw file holding the same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};

use qcow::block::BlockDevice;
use qcow::{Config, Image};
use support::{assert_clean, assert_matches_model, qemu_create, qemu_io, qemu_to_raw, Rng};

/// Sector counts of the buffers of one request: odd, so they end inside clusters and pieces of them fall on
/// both sides of cluster boundaries.
const SECTOR_COUNTS: [u64; 8] = [3, 7, 1, 13, 5, 9, 11, 17];

/// How the image under test is laid out.
struct Layout {
    name: &'static str,
    /// Options for the overlay (`qemu-img create -o`), besides its backing file.
    opts: &'static str,
    cluster: u64,
    backed: bool,
}

const LAYOUTS: [Layout; 4] = [
    Layout { name: "backed-4k", opts: "cluster_size=4096", cluster: 4096, backed: true },
    Layout { name: "plain-4k", opts: "cluster_size=4096", cluster: 4096, backed: false },
    Layout { name: "backed-64k", opts: "cluster_size=65536", cluster: 65536, backed: true },
    Layout { name: "extended-l2", opts: "cluster_size=65536,extended_l2=on", cluster: 65536, backed: true },
];

/// Guest size of every image, in clusters.
const CLUSTERS: u64 = 24;

/// Makes the overlay (and its backing file) with qemu-img and fills it with qemu-io: every kind of cluster an
/// image can hold, in a fixed order, and many distinct byte patterns so that a misplaced piece shows.
fn qemu_image(dir: &Path, layout: &Layout) -> PathBuf {
    let cs = layout.cluster;
    let size = (CLUSTERS * cs).to_string();
    let top = dir.join(format!("{}.qcow2", layout.name));
    if layout.backed {
        let base = dir.join(format!("{}-base.qcow2", layout.name));
        qemu_create(&base, &format!("cluster_size={cs}"), &size);
        // Three sectors per pattern: patterns change inside sectors' neighbours and inside clusters.
        let writes: Vec<String> =
            (0..CLUSTERS * cs / 1536).map(|i| format!("write -q -P {} {} 1536", 1 + i % 250, i * 1536)).collect();
        let refs: Vec<&str> = writes.iter().map(String::as_str).collect();
        qemu_io(&base, &refs);
        // Named relative to the overlay, as the default backing policy follows.
        let name = base.file_name().unwrap().to_string_lossy().into_owned();
        let opts = format!("{},backing_file={name},backing_fmt=qcow2", layout.opts);
        qemu_create(&top, &opts, &size);
    } else {
        qemu_create(&top, layout.opts, &size);
    }
    let c = |n: u64| n * cs;
    let commands = [
        // Clusters 0..3: data, the last one only in part.
        format!("write -q -P 0x11 0 {}", c(2) + 2048),
        // Clusters 4..5: zero clusters.
        format!("write -q -z {} {}", c(4), c(2)),
        // Clusters 6 and 7: compressed, then data in the middle of one sector run.
        format!("write -q -c -P 0x22 {} {}", c(6), cs),
        format!("write -q -P 0x33 {} {}", c(7) + 512, 3 * 512),
        // Cluster 9: compressed; 10 and 11 left unallocated (backing file or zeros).
        format!("write -q -c -P 0x44 {} {}", c(9), cs),
        // Clusters 12..14: data spanning them, starting and ending inside clusters.
        format!("write -q -P 0x55 {} {}", c(12) + 1024, c(2)),
        // Cluster 16: zeroed in part (partial zero writes allocate or use subclusters).
        format!("write -q -z {} {}", c(16) + 2048, 4096),
        // Clusters 20..21: data; 22 and 23 untouched.
        format!("write -q -P 0x66 {} {}", c(20), c(2)),
    ];
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&top, &refs);
    top
}

/// Cuts `start..end` (bytes) into buffers of the odd sector counts, cycling from `shift`.
fn buffer_lengths(start: u64, end: u64, shift: usize) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut pos = start;
    let mut i = shift;
    while pos < end {
        let len = (SECTOR_COUNTS[i % SECTOR_COUNTS.len()] * 512).min(end - pos);
        lens.push(len as usize);
        pos += len;
        i += 1;
    }
    lens
}

/// One vectored read of `start..end` through the device interface.
fn read_vectored(image: &Image<qcow::block::FileDevice>, start: u64, end: u64, shift: usize) -> Vec<u8> {
    let mut bufs: Vec<Vec<u8>> = buffer_lengths(start, end, shift).into_iter().map(|n| vec![0xa5u8; n]).collect();
    let mut iov: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    image.read(start / 512, &mut iov).unwrap_or_else(|e| panic!("vectored read {start:#x}..{end:#x}: {e}"));
    bufs.concat()
}

#[test]
fn a_vectored_read_of_an_image_qemu_wrote_matches_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    for layout in &LAYOUTS {
        let top = qemu_image(dir.path(), layout);
        let expected = qemu_to_raw(&top, dir.path());
        let image = Image::open_path(&top, Config::read_only()).unwrap();
        let size = CLUSTERS * layout.cluster;
        assert_eq!(expected.len() as u64, size);
        // The whole disk in one request, then requests starting and ending inside clusters.
        let ranges = [(0, size, 0), (512, size - 1024, 3), (layout.cluster - 1536, 5 * layout.cluster + 512, 5)];
        for (start, end, shift) in ranges {
            let got = read_vectored(&image, start, end, shift);
            let want = &expected[start as usize..end as usize];
            if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
                panic!(
                    "{}: vectored read {start:#x}..{end:#x} differs from qemu-img convert at guest offset {:#x}",
                    layout.name,
                    start + at as u64
                );
            }
        }
    }
}

#[test]
fn vectored_writes_across_cluster_boundaries_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for layout in &LAYOUTS {
        let top = qemu_image(dir.path(), layout);
        let mut model = qemu_to_raw(&top, dir.path());
        let cs = layout.cluster;
        {
            let image = Image::open_path(&top, Config::default()).unwrap();
            let mut rng = Rng(0x5eed_0000 + cs);
            // Each request crosses clusters of every kind: in place, zero, compressed, unallocated, partial.
            let requests = [
                (512, 3 * cs),
                (3 * cs + 1024, 3 * cs + 512),
                (6 * cs - 1536, 2 * cs + 2048),
                (9 * cs + 512, 3 * cs),
                (15 * cs + 3584, 2 * cs),
                (19 * cs + 512, 4 * cs),
                (0, CLUSTERS * cs / 2 - 512),
            ];
            for (i, (start, len)) in requests.into_iter().enumerate() {
                let lens = buffer_lengths(start, start + len, i);
                let bufs: Vec<Vec<u8>> = lens.iter().map(|&n| (0..n).map(|_| rng.next() as u8 | 1).collect()).collect();
                let iov: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
                image
                    .write(start / 512, &iov)
                    .unwrap_or_else(|e| panic!("{}: vectored write {start:#x}: {e}", layout.name));
                model[start as usize..(start + len) as usize].copy_from_slice(&bufs.concat());
                // What we read back is what we wrote, before QEMU looks.
                let back = read_vectored(&image, start, start + len, i + 1);
                assert!(
                    back == model[start as usize..(start + len) as usize],
                    "{}: read back after write {i}",
                    layout.name
                );
            }
            image.close().unwrap();
        }
        assert_clean(&top);
        assert_matches_model(&top, &model);
    }
}
