//! Persistent dirty bitmaps maintained across QEMU and us: bitmaps QEMU made keep recording our writes and come
//! out consistent, bitmaps we add and dirty read correctly in QEMU (`qemu-nbd -B` with `nbdinfo --map`,
//! `qemu-img bitmap`, `qemu-img info`, `qemu-img check`), inconsistent and stale bitmaps are handled as QEMU
//! handles them, and a store cut by power loss at any write never leaves a bitmap that lies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "support/bitmaps.rs"]
mod bitmap_support;
#[path = "support/power_cut.rs"]
mod power_cut;
mod support;

use std::path::Path;
use std::sync::Arc;

use bitmap_support::{as_triples, qemu_bitmap_map, qemu_bitmaps, Model};
use power_cut::PowerCut;
use qcow::block::{BlockDevice, FileDevice, FileOptions, MemoryDevice};
use qcow::{BitmapRun, Config, CreateOptions, ErrorKind, Image};
use support::{assert_clean, qemu, qemu_check, qemu_create, qemu_io, run_ok, with_deadline, Rng};

fn flags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn open_rw(path: &Path) -> Image<FileDevice> {
    Image::open(FileDevice::open(path, &FileOptions::default()).unwrap(), Config { discard: true, ..Config::default() })
        .unwrap()
}

fn open_ro(path: &Path) -> Image<FileDevice> {
    Image::open(
        FileDevice::open(path, &FileOptions { read_only: true, direct: false, ..FileOptions::default() }).unwrap(),
        Config::read_only(),
    )
    .unwrap()
}

fn autoclear(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    u64::from_be_bytes(b[88..96].try_into().unwrap())
}

/// QEMU adds two bitmaps and writes; we write, zero, discard and write compressed; both writers' ranges are
/// exactly what QEMU then reads from the bitmaps, which are consistent again, in a clean image.
#[test]
fn bitmaps_qemu_made_record_our_writes_and_come_out_consistent() {
    with_deadline(120, "qemu bitmaps", || {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("q.qcow2");
        let size = 8u64 << 20;
        qemu_create(&img, "", "8M");
        run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "65536"]).arg(&img).arg("b64k"));
        run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "4096"]).arg(&img).arg("b4k"));
        run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "512"]).arg(&img).arg("frozen"));
        let mut models = [Model::new(65536, size), Model::new(4096, size), Model::new(512, size)];
        qemu_io(&img, &["write -P 1 0 4k", "write -P 2 3M 100k", "write -z 5M 8k"]);
        for m in &mut models {
            m.mark(0, 4096);
            m.mark(3 << 20, 100 << 10);
            m.mark(5 << 20, 8192);
        }
        run_ok(qemu("qemu-img").args(["bitmap", "--disable"]).arg(&img).arg("frozen"));

        let image = open_rw(&img);
        let listed: Vec<_> =
            image.list_bitmaps().unwrap().into_iter().map(|b| (b.name, b.enabled, b.consistent, b.in_use)).collect();
        assert_eq!(
            listed,
            [("b64k".into(), true, true, true), ("b4k".into(), true, true, true), ("frozen".into(), false, true, true)]
        );
        // While we hold the image open for writing, QEMU sees the bitmaps in use, as it would its own.
        assert_eq!(qemu_bitmaps(&img)[0].2, flags(&["in-use", "auto"]));
        assert_eq!(autoclear(&img) & 1, 1, "the bitmaps autoclear bit stays set");
        let ours: [(u64, u64); 5] =
            [(512, 512), (1 << 20, 70 << 10), (6 << 20, 4096), (7 << 20, 1 << 20), (2 << 20, 65536)];
        image.write_at(ours[0].0, &[7; 512]).unwrap();
        image.write_at(ours[1].0, &vec![8; ours[1].1 as usize]).unwrap();
        image.write_at(ours[2].0, &[0; 4096]).unwrap();
        image.discard(ours[3].0 / 512, ours[3].1 / 512).unwrap();
        image.write_compressed(ours[4].0, &[9; 65536]).unwrap();
        for m in &mut models[..2] {
            for (o, l) in ours {
                m.mark(o, l);
            }
        }
        assert_eq!(as_triples(0, &image.bitmap_status("b4k", 0, size).unwrap()), models[1].runs());
        assert_eq!(as_triples(0, &image.bitmap_status("frozen", 0, u64::MAX).unwrap()), models[2].runs());
        image.close().unwrap();

        assert_eq!(
            qemu_bitmaps(&img),
            [
                ("b64k".into(), 65536, flags(&["auto"])),
                ("b4k".into(), 4096, flags(&["auto"])),
                ("frozen".into(), 512, flags(&[]))
            ]
        );
        assert_clean(&img);
        for (name, m) in ["b64k", "b4k", "frozen"].iter().zip(&models) {
            assert_eq!(qemu_bitmap_map(&img, name), m.runs(), "{name}");
        }
        // QEMU goes on recording into what we stored.
        qemu_io(&img, &["write -P 3 4M 512"]);
        models[0].mark(4 << 20, 512);
        assert_eq!(qemu_bitmap_map(&img, "b64k"), models[0].runs());
        assert_eq!(as_triples(0, &open_ro(&img).bitmap_status("b64k", 0, size).unwrap()), models[0].runs());
    });
}

/// Bitmaps we add (granularities from 512 bytes to 2 MiB, at cluster sizes from 512 bytes to 2 MiB) and dirty
/// with random writes read in QEMU exactly as our model says; `qemu-img bitmap` merges and clears them.
#[test]
fn bitmaps_we_add_and_dirty_read_in_qemu_as_we_wrote_them() {
    with_deadline(300, "our bitmaps", || {
        for (cluster, seed) in [(512u64, 1u64), (4096, 2), (65536, 3), (2 << 20, 4)] {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("ours.qcow2");
            let size = 48u64 << 20;
            let mut opts = CreateOptions::new(size);
            opts.cluster_size = cluster;
            let dev = FileDevice::create(&img, &FileOptions::default()).unwrap();
            let image = Image::create(dev, &opts, Config::default()).unwrap();
            let grans = [512u64, 4096, 65536, 2 << 20];
            for g in grans {
                image.add_bitmap(&format!("g{g}"), g, true).unwrap();
            }
            image.add_bitmap("off", 65536, false).unwrap();
            let default = image.default_bitmap_granularity();
            assert_eq!(default, cluster.clamp(4096, 65536), "QEMU's default granularity");
            let mut models: Vec<Model> = grans.iter().map(|&g| Model::new(g, size)).collect();
            let mut rng = Rng(seed);
            for i in 0..40 {
                let offset = rng.below(size / 512) * 512;
                let len = ((1 + rng.below(300)) * 512).min(size - offset);
                image.write_at(offset, &vec![i as u8; len as usize]).unwrap();
                models.iter_mut().for_each(|m| m.mark(offset, len));
                if i == 20 {
                    // A store in the middle: the next write marks the bitmaps in use again first.
                    image.store_bitmaps().unwrap();
                    assert!(qemu_bitmaps(&img).iter().all(|b| !b.2.contains(&"in-use".to_string())));
                }
            }
            assert!(qemu_bitmaps(&img).iter().all(|b| b.2.contains(&"in-use".to_string())), "marked again");
            image.close().unwrap();
            assert_clean(&img);
            let info = qemu_bitmaps(&img);
            assert_eq!(info.len(), 5);
            assert_eq!(info[4], ("off".into(), 65536, flags(&[])));
            for (g, m) in grans.iter().zip(&models) {
                assert_eq!(info.iter().find(|b| b.0 == format!("g{g}")).unwrap().2, flags(&["auto"]));
                assert_eq!(qemu_bitmap_map(&img, &format!("g{g}")), m.runs(), "g{g} at {cluster}-byte clusters");
            }
            assert_eq!(qemu_bitmap_map(&img, "off"), Model::new(65536, size).runs());
            // qemu-img bitmap works on what we stored: merge a fine bitmap into the disabled one, clear another.
            run_ok(qemu("qemu-img").args(["bitmap", "--merge", "g4096"]).arg(&img).arg("off"));
            run_ok(qemu("qemu-img").args(["bitmap", "--clear"]).arg(&img).arg("g512"));
            assert_clean(&img);
            let mut merged = Model::new(65536, size);
            for (i, &d) in models[1].dirty.iter().enumerate() {
                if d {
                    merged.mark(i as u64 * 4096, 4096);
                }
            }
            assert_eq!(qemu_bitmap_map(&img, "off"), merged.runs());
            assert_eq!(qemu_bitmap_map(&img, "g512"), Model::new(512, size).runs());
            // And we read what QEMU changed.
            let back = open_ro(&img);
            assert_eq!(as_triples(0, &back.bitmap_status("off", 0, size).unwrap()), merged.runs());
            let ranges: Vec<_> = back.dirty_ranges("g2097152").unwrap().collect();
            let want: Vec<_> =
                models[3].runs().into_iter().filter(|r| r.2).map(|(o, l, _)| o..o + l).collect::<Vec<_>>();
            assert_eq!(ranges, want);
        }
    });
}

/// Our merge, clear, enable and disable follow QEMU's rules, and what they leave reads the same in QEMU.
#[test]
fn merge_clear_enable_and_disable_follow_qemus_rules() {
    with_deadline(120, "bitmap operations", || {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ops.qcow2");
        let size = 4u64 << 20;
        let dev = FileDevice::create(&img, &FileOptions::default()).unwrap();
        let image = Image::create(dev, &CreateOptions::new(size), Config::default()).unwrap();
        image.add_bitmap("fine", 4096, true).unwrap();
        image.add_bitmap("coarse", 1 << 20, false).unwrap();
        let kind = |r: qcow::Result<()>| r.unwrap_err().kind();
        assert_eq!(kind(image.add_bitmap("fine", 4096, true)), ErrorKind::InvalidArgument, "names are unique");
        assert_eq!(kind(image.add_bitmap("x", 1000, true)), ErrorKind::InvalidArgument, "power of two");
        assert_eq!(kind(image.add_bitmap("x", 256, true)), ErrorKind::InvalidArgument, "at least 512");
        assert_eq!(kind(image.add_bitmap("", 4096, true)), ErrorKind::InvalidArgument, "a name");
        assert_eq!(kind(image.add_bitmap(&"n".repeat(1024), 4096, true)), ErrorKind::InvalidArgument);
        image.add_bitmap(&"n".repeat(1023), 4096, false).unwrap();
        assert_eq!(kind(image.clear_bitmap("none")), ErrorKind::InvalidArgument);
        assert_eq!(kind(image.merge_bitmap("none", "fine")), ErrorKind::InvalidArgument);
        assert_eq!(image.bitmap_status("none", 0, 1).unwrap_err().kind(), ErrorKind::InvalidArgument);

        image.write_at(0, &[1; 4096]).unwrap();
        image.write_at(3 << 20, &[1; 8192]).unwrap();
        // Disabled: the coarse bitmap saw nothing; merged, it covers the fine one's granules with its own.
        assert_eq!(image.bitmap_status("coarse", 0, size).unwrap(), [BitmapRun { len: size, dirty: false }]);
        image.merge_bitmap("fine", "coarse").unwrap();
        let mut coarse = Model::new(1 << 20, size);
        coarse.mark(0, 1);
        coarse.mark(3 << 20, 1);
        assert_eq!(as_triples(0, &image.bitmap_status("coarse", 0, size).unwrap()), coarse.runs());
        // Merging a bitmap into itself changes nothing; clearing empties; a disabled bitmap records nothing more.
        image.merge_bitmap("coarse", "coarse").unwrap();
        image.clear_bitmap("fine").unwrap();
        image.disable_bitmap("fine").unwrap();
        image.write_at(1 << 20, &[2; 512]).unwrap();
        image.enable_bitmap("coarse").unwrap();
        image.write_at(2 << 20, &[2; 512]).unwrap();
        coarse.mark(2 << 20, 1);
        let mut fine = Model::new(4096, size);
        assert_eq!(as_triples(0, &image.bitmap_status("fine", 0, size).unwrap()), fine.runs());
        image.enable_bitmap("fine").unwrap();
        image.write_at(3 << 20, &[3; 512]).unwrap();
        fine.mark(3 << 20, 512);
        coarse.mark(3 << 20, 1);
        // Status of a part of the disk is clipped to the disk and starts where asked.
        assert_eq!(
            image.bitmap_status("fine", (3 << 20) - 512, 1 << 30).unwrap(),
            [
                BitmapRun { len: 512, dirty: false },
                BitmapRun { len: 4096, dirty: true },
                BitmapRun { len: (1 << 20) - 4096, dirty: false }
            ]
        );
        assert_eq!(image.bitmap_status("fine", size, 100).unwrap(), []);
        image.remove_bitmap(&"n".repeat(1023)).unwrap();
        image.close().unwrap();
        assert_clean(&img);
        assert_eq!(qemu_bitmap_map(&img, "fine"), fine.runs());
        assert_eq!(qemu_bitmap_map(&img, "coarse"), coarse.runs());
        assert_eq!(
            qemu_bitmaps(&img),
            [("fine".into(), 4096, flags(&["auto"])), ("coarse".into(), 1 << 20, flags(&["auto"]))]
        );
        // Removing stored bitmaps frees their clusters: QEMU finds no leak, and no bitmaps.
        let image = open_rw(&img);
        image.remove_bitmap("fine").unwrap();
        image.remove_bitmap("coarse").unwrap();
        image.close().unwrap();
        assert_clean(&img);
        assert!(qemu_bitmaps(&img).is_empty());
        assert_eq!(autoclear(&img) & 1, 0, "with no bitmaps left the bit goes, as QEMU clears it");
    });
}

/// A bitmap QEMU left in use (it was killed with the image open) is inconsistent: listed, never changed or used,
/// stored as it was, removable; a resize is refused while it exists.
#[test]
fn a_bitmap_left_in_use_stays_inconsistent_until_removed() {
    with_deadline(120, "in-use bitmap", || {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("killed.qcow2");
        qemu_create(&img, "", "4M");
        run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("lost"));
        // qemu-io dies by SIGKILL with the image open: the bitmap stays in use on disk.
        let _ = qemu("qemu-io").args(["-f", "qcow2", "-c", "write 0 64k", "-c", "sigraise 9"]).arg(&img).output();
        assert_eq!(qemu_bitmaps(&img), [("lost".into(), 65536, flags(&["in-use", "auto"]))]);
        let before = qemu_check(&img);
        let image = open_rw(&img);
        image.add_bitmap("fresh", 65536, true).unwrap();
        let listed = image.list_bitmaps().unwrap();
        assert_eq!((listed[0].consistent, listed[0].in_use, listed[0].enabled), (false, true, false));
        for refused in [image.clear_bitmap("lost"), image.enable_bitmap("lost"), image.merge_bitmap("lost", "fresh")] {
            assert_eq!(refused.unwrap_err().kind(), ErrorKind::InvalidArgument);
        }
        assert_eq!(image.merge_bitmap("fresh", "lost").unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(image.bitmap_status("lost", 0, 1).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(image.resize(8 << 20, false).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(image.virtual_size(), 4 << 20);
        image.write_at(1 << 20, &[5; 4096]).unwrap();
        image.close().unwrap();
        assert_eq!(
            qemu_bitmaps(&img),
            [("lost".into(), 65536, flags(&["in-use", "auto"])), ("fresh".into(), 65536, flags(&["auto"]))]
        );
        let after = qemu_check(&img);
        assert_eq!((after.corruptions(), after.leaks()), (before.corruptions(), before.leaks()));
        let image = open_rw(&img);
        image.remove_bitmap("lost").unwrap();
        image.resize(8 << 20, false).unwrap();
        image.close().unwrap();
        assert_clean(&img);
        assert_eq!(qemu_bitmaps(&img), [("fresh".into(), 65536, flags(&["auto"]))]);
        let mut m = Model::new(65536, 8 << 20);
        m.mark(1 << 20, 4096);
        assert_eq!(qemu_bitmap_map(&img, "fresh"), m.runs());
    });
}

/// Bitmaps an old writer left stale (autoclear bit 0 cleared, as a program without bitmap support clears it):
/// a read-write open drops their extension as QEMU's does, and QEMU then counts the same leaks in both copies.
#[test]
fn stale_bitmaps_are_dropped_on_a_read_write_open_as_qemu_drops_them() {
    with_deadline(120, "stale bitmaps", || {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("stale.qcow2");
        qemu_create(&img, "", "4M");
        run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("b"));
        qemu_io(&img, &["write 0 64k"]);
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[95] &= !1;
        std::fs::write(&img, &bytes).unwrap();
        let theirs = dir.path().join("theirs.qcow2");
        std::fs::write(&theirs, &bytes).unwrap();
        assert!(open_ro(&img).list_bitmaps().unwrap().is_empty(), "QEMU ignores stale bitmaps, and so do we");
        assert_eq!(std::fs::read(&img).unwrap(), bytes, "a read-only open changes nothing");
        let image = open_rw(&img);
        image.write_at(0, &[1; 512]).unwrap();
        image.close().unwrap();
        qemu_io(&theirs, &["write 0 512"]);
        let (ours, qemus) = (qemu_check(&img), qemu_check(&theirs));
        assert_eq!((ours.corruptions(), ours.leaks()), (qemus.corruptions(), qemus.leaks()));
        assert!(ours.leaks() > 0, "the stale bitmap's clusters leak");
        assert_eq!(std::fs::read(&img).unwrap()[..512], std::fs::read(&theirs).unwrap()[..512], "same header");
    });
}

/// A read-only open lists and answers from the bitmaps and changes nothing; refusals change nothing either.
#[test]
fn read_only_opens_list_and_query_bitmaps_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.qcow2");
    qemu_create(&img, "", "4M");
    run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "8192"]).arg(&img).arg("b"));
    qemu_io(&img, &["write 8k 8k"]);
    let before = std::fs::read(&img).unwrap();
    let image = open_ro(&img);
    let listed = image.list_bitmaps().unwrap();
    assert_eq!(
        (listed[0].granularity, listed[0].in_use, listed[0].auto, listed[0].consistent),
        (8192, false, true, true)
    );
    assert_eq!(
        image.bitmap_status("b", 0, 3 * 8192).unwrap(),
        [
            BitmapRun { len: 8192, dirty: false },
            BitmapRun { len: 8192, dirty: true },
            BitmapRun { len: 8192, dirty: false }
        ]
    );
    assert_eq!(image.add_bitmap("c", 65536, true).unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(image.clear_bitmap("b").unwrap_err().kind(), ErrorKind::ReadOnly);
    image.close().unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// Resizing carries the bitmaps along: QEMU reads them at the new size, dirty where written, clean where new.
#[test]
fn resized_images_keep_bitmaps_that_qemu_reads_at_the_new_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("resized.qcow2");
    qemu_create(&img, "", "4M");
    run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("b"));
    qemu_io(&img, &["write 0 64k", "write 3M 64k"]);
    let image = open_rw(&img);
    image.resize(2 << 20, true).unwrap();
    image.resize(40 << 20, false).unwrap();
    image.write_at(30 << 20, &[1; 4096]).unwrap();
    image.close().unwrap();
    assert_clean(&img);
    let mut m = Model::new(65536, 40 << 20);
    m.mark(0, 65536);
    m.mark(30 << 20, 4096);
    assert_eq!(qemu_bitmap_map(&img, "b"), m.runs());
    // And QEMU's own resize of our image keeps them readable by us.
    run_ok(qemu("qemu-img").args(["resize", "-f", "qcow2"]).arg(&img).arg("48M"));
    let back = open_ro(&img);
    let mut m48 = Model::new(65536, 48 << 20);
    m48.mark(0, 65536);
    m48.mark(30 << 20, 4096);
    assert_eq!(as_triples(0, &back.bitmap_status("b", 0, 48 << 20).unwrap()), m48.runs());
}

/// Writers on many threads while bitmaps are stored again and again: no write is ever missing from the bitmap
/// QEMU reads afterwards.
#[test]
fn concurrent_writers_and_stores_lose_no_dirty_bit() {
    with_deadline(120, "concurrent stores", || {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("busy.qcow2");
        let size = 64u64 << 20;
        let dev = FileDevice::create(&img, &FileOptions::default()).unwrap();
        let image = Arc::new(Image::create(dev, &CreateOptions::new(size), Config::default()).unwrap());
        image.add_bitmap("b", 65536, true).unwrap();
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let image = image.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(t + 11);
                    let mut done = Vec::new();
                    for _ in 0..200 {
                        let offset = rng.below(size / 4096) * 4096;
                        image.write_at(offset, &[t as u8 + 1; 4096]).unwrap();
                        done.push(offset);
                    }
                    done
                })
            })
            .collect();
        for _ in 0..20 {
            image.store_bitmaps().unwrap();
        }
        let mut m = Model::new(65536, size);
        for w in writers {
            for offset in w.join().unwrap() {
                m.mark(offset, 4096);
            }
        }
        Arc::try_unwrap(image).ok().unwrap().close().unwrap();
        assert_clean(&img);
        assert_eq!(qemu_bitmap_map(&img, "b"), m.runs());
    });
}

/// Power loss at every write of a session that opens an image with bitmaps (marking them in use), writes, and
/// closes (storing them), keeping none, all or part of the unflushed writes: QEMU finds no corruption, and every
/// bitmap is either ignored (the autoclear bit was clear at the cut), in use (inconsistent), or holds exactly the
/// old or the new truth; never a bitmap that lies. We read the same.
#[test]
fn power_loss_during_a_bitmap_store_never_leaves_a_bitmap_that_lies() {
    with_deadline(900, "bitmap store power loss", || {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        // The stored image everything starts from: two bitmaps, with data.
        let base = {
            let dev = Arc::new(MemoryDevice::new(0));
            let image = Image::create(dev.clone(), &CreateOptions::new(size), Config::default()).unwrap();
            image.add_bitmap("a", 65536, true).unwrap();
            image.add_bitmap("b", 4096, true).unwrap();
            image.write_at(0, &[1; 8192]).unwrap();
            image.close().unwrap();
            dev.snapshot()
        };
        let truths = |g: u64| {
            let mut old = Model::new(g, size);
            old.mark(0, 8192);
            let mut new = old.clone();
            new.mark(2 << 20, 512);
            new.mark(3 << 20, 65536);
            (old.runs(), new.runs())
        };
        let run = |dev: &Arc<PowerCut>| -> qcow::Result<()> {
            let image = Image::open(dev.clone(), Config::default())?;
            image.write_at(2 << 20, &[2; 512])?;
            image.write_at(3 << 20, &[3; 65536])?;
            image.flush()?;
            image.close()
        };
        // Power lost at write `cut`, keeping none (0), all (1) or part (2) of the unflushed writes.
        let device = |cut: Option<u64>, keep: u64| {
            let dev = Arc::new(PowerCut::new(base.clone()));
            if let Some(cut) = cut {
                dev.arm(cut, move |i, _| match keep {
                    0 => false,
                    1 => true,
                    s => (i as u64 * 7 + s) % 3 != 0,
                });
            }
            dev
        };
        let total = {
            let dev = device(None, 0);
            run(&dev).unwrap();
            dev.faulty.write_count()
        };
        assert!(total > 10, "marking and storing write data, tables, directories and headers: {total}");
        let mut outcomes = [0usize; 3];
        for cut in 0..total {
            for keep in 0..3u64 {
                let what = format!("cut at write {cut} of {total}, keep {keep}");
                let dev = device(Some(cut), keep);
                assert!(run(&dev).is_err(), "{what}: the run went through");
                let bytes = dev.faulty.inner().snapshot();
                let path = dir.path().join("cut.qcow2");
                std::fs::write(&path, &bytes).unwrap();
                let check = qemu_check(&path);
                assert_eq!((check.corruptions(), check.check_errors()), (0, 0), "{what}: {:#}", check.json);
                // The old bitmaps are the truth only as long as none of the new writes reached the disk.
                let written = {
                    let image = Image::open(MemoryDevice::from_bytes(bytes.clone()), Config::read_only()).unwrap();
                    let mut got = vec![0u8; 65536];
                    image.read_at(2 << 20, &mut got[..512]).unwrap();
                    let first = got[..512].iter().any(|&b| b != 0);
                    image.read_at(3 << 20, &mut got).unwrap();
                    first || got.iter().any(|&b| b != 0)
                };
                let truthful = |got: &[(u64, u64, bool)], g: u64| {
                    let (old, new) = truths(g);
                    got == new || (got == old && !written)
                };
                for (name, g) in [("a", 65536u64), ("b", 4096)] {
                    match qemu_bitmaps(&path).into_iter().find(|b| b.0 == name) {
                        None => outcomes[0] += 1,
                        Some(b) if b.2.contains(&"in-use".to_string()) => outcomes[1] += 1,
                        Some(_) => {
                            outcomes[2] += 1;
                            let got = qemu_bitmap_map(&path, name);
                            assert!(truthful(&got, g), "{what}: QEMU reads a lie from {name}: {got:?}");
                        }
                    }
                }
                let image = Image::open(MemoryDevice::from_bytes(bytes), Config::default())
                    .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
                for b in image.list_bitmaps().unwrap().into_iter().filter(|b| b.consistent) {
                    let got = as_triples(0, &image.bitmap_status(&b.name, 0, size).unwrap());
                    assert!(truthful(&got, b.granularity), "{what}: we read a lie from {}", b.name);
                }
                image.close().unwrap();
            }
        }
        eprintln!("{total} writes, outcomes {outcomes:?}");
        assert!(outcomes.iter().all(|&n| n > 0), "every outcome was met: {outcomes:?}");
    });
}

/// Autoclear bits as QEMU's read-write open leaves them: unknown ones cleared, the bitmaps bit kept (with a
/// bitmap, and without one, where QEMU keeps it too). QEMU opens its copy read-write only to read: with the bit
/// set and no bitmaps extension, its overlap check takes an empty directory at offset 0 for one covering every
/// offset, and refuses any write.
#[test]
fn a_read_write_open_leaves_the_autoclear_bits_as_qemu_leaves_them() {
    let dir = tempfile::tempdir().unwrap();
    for with_bitmap in [false, true] {
        let img = dir.path().join("bits.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_create(&img, "", "4M");
        if with_bitmap {
            run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("b"));
        }
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[95] |= 0x81;
        std::fs::write(&img, &bytes).unwrap();
        let theirs = dir.path().join("theirs.qcow2");
        std::fs::write(&theirs, &bytes).unwrap();
        qemu_io(&theirs, &["read 0 512"]);
        let image = open_rw(&img);
        image.write_at(0, &[0; 512]).unwrap();
        image.close().unwrap();
        assert_eq!(autoclear(&img), autoclear(&theirs), "with a bitmap: {with_bitmap}");
        assert_eq!(autoclear(&img), 1);
        assert_clean(&img);
    }
}

/// Compaction (offline and online) and junk erasing move no guest data: they set no bit, and the bitmaps they
/// leave (whose clusters they must not move or lose) read in QEMU as before.
#[test]
fn compaction_and_the_reclaimer_set_no_bits_and_keep_the_bitmaps() {
    with_deadline(120, "compaction with bitmaps", || {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("compact.qcow2");
        let size = 32u64 << 20;
        let dev = FileDevice::create(&img, &FileOptions::default()).unwrap();
        let config = Config { discard: true, ..Config::default() };
        let image = Image::create(dev, &CreateOptions::new(size), config.clone()).unwrap();
        image.add_bitmap("b", 65536, true).unwrap();
        let mut m = Model::new(65536, size);
        for i in 0..64u64 {
            image.write_at(i * (256 << 10), &[i as u8 + 1; 65536]).unwrap();
            m.mark(i * (256 << 10), 65536);
        }
        image.discard(0, (8 << 20) / 512).unwrap();
        m.mark(0, 8 << 20);
        image.close().unwrap();
        let image = Image::open(FileDevice::open(&img, &FileOptions::default()).unwrap(), config).unwrap();
        let before = image.bitmap_status("b", 0, size).unwrap();
        let summary = image.compact(&mut |_| true).unwrap();
        assert!(summary.clusters_copied > 0, "something moved: {summary:?}");
        image.erase_junk(1000).unwrap();
        image.compact_online(1000, &|| false).unwrap();
        assert_eq!(image.bitmap_status("b", 0, size).unwrap(), before, "compaction set or lost bits");
        image.close().unwrap();
        assert_clean(&img);
        assert_eq!(qemu_bitmap_map(&img, "b"), m.runs());
    });
}

/// Dropping the image and disconnecting it store the bitmaps as closing does: QEMU reads them consistent, with
/// the writes made before.
#[test]
fn drop_and_disconnect_store_the_bitmaps_as_close_does() {
    let dir = tempfile::tempdir().unwrap();
    for how in ["drop", "disconnect"] {
        let img = dir.path().join(format!("{how}.qcow2"));
        qemu_create(&img, "", "4M");
        run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&img).arg("b"));
        let image = open_rw(&img);
        image.write_at(2 << 20, &[1; 4096]).unwrap();
        match how {
            "drop" => drop(image),
            _ => {
                BlockDevice::disconnect(&image);
                assert!(image.write_at(0, &[1; 512]).is_err(), "disconnected");
            }
        }
        assert_eq!(qemu_bitmaps(&img), [("b".into(), 65536, flags(&["auto"]))], "{how}");
        assert_clean(&img);
        let mut m = Model::new(65536, 4 << 20);
        m.mark(2 << 20, 4096);
        assert_eq!(qemu_bitmap_map(&img, "b"), m.runs(), "{how}");
    }
}
