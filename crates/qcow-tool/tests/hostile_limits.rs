//! Hostile images under a memory limit: every command that reads an image runs under `prlimit --as` (1 GiB of
//! address space) on qcow2 images made by qemu-img and then patched so that their sizes, read naively, would need
//! terabytes: a sparse file of terabytes, a huge `l1_size`, a huge `refcount_table_clusters`, a bitmap with a huge
//! table, a huge snapshot count and a header extension with a huge length. No command may die by a signal (an
//! abort on a failed allocation, SIGKILL, SIGSEGV, SIGBUS); each either refuses the image with a clear message or,
//! where the image is usable, does its job as qemu-img does; read-only commands leave the file as it was.
//!
//! Also: a raw source truncated by another process while `convert` copies it stops the copy with an error, never
//! a signal (convert once mapped its source, and a truncation under a mapping is SIGBUS).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../../qcow/tests/support/mod.rs"]
mod support;

mod binary;

use binary::{show, Dir};

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::{output_within, qemu, qemu_create, qemu_io};

/// Address space every command may use. The tool's own start-up takes about 30 MiB, its two convert workers
/// (one per core on the test machine) and their malloc arenas well under 256 MiB (measured: a 1 GiB convert
/// runs under `--as=64M`); 1 GiB leaves room for more cores without letting any allocation sized by the
/// image's claims through.
const ADDRESS_SPACE: u64 = 1 << 30;
/// Seconds any one command may take.
const DEADLINE: u64 = 120;
/// The bytes of a file compared before and after a read-only command (all its metadata is in them).
const HEAD: usize = 4 << 20;

/// Header fields (qcow2 specification).
const OFF_L1_SIZE: u64 = 36;
const OFF_RT_CLUSTERS: u64 = 56;
const OFF_NB_SNAPSHOTS: u64 = 60;
const OFF_HEADER_LENGTH: u64 = 100;

fn prlimit_available() {
    let ok = Command::new("prlimit").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "prlimit not found: install util-linux (apt-get install -y util-linux)");
}

/// Runs `qcow-tool ARGS` under the address-space limit, in `dir`.
fn limited(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--as={ADDRESS_SPACE}")).arg("--").arg(env!("CARGO_BIN_EXE_qcow-tool")).args(args);
    output_within(cmd.current_dir(dir).stdin(Stdio::null()), DEADLINE)
}

fn be_at(path: &Path, offset: u64, bytes: &[u8]) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

fn read_be32(path: &Path, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u32::from_be_bytes(b)
}

fn read_be64(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// A 64 MiB image with 1 MiB of data, made by qemu-img and qemu-io.
fn base(path: &Path) {
    qemu_create(path, "", "64M");
    qemu_io(path, &["write -P 0xab 0 1M"]);
}

/// The largest length the file system takes for a sparse file, from 1 EiB down (ext4 stops just short of
/// 16 TiB, tmpfs takes 1 EiB).
fn largest_sparse_length(dir: &Path) -> u64 {
    let probe = dir.join("probe");
    let file = std::fs::File::create(&probe).unwrap();
    let sizes = [1u64 << 60, 1 << 50, (16 << 40) - 4096, 8 << 40, 1 << 40];
    let len = sizes.into_iter().find(|&n| file.set_len(n).is_ok()).expect("no sparse length of a TiB or more works");
    drop(file);
    std::fs::remove_file(&probe).unwrap();
    len
}

/// Where the first bitmap's directory entry is: the bitmaps extension is found among the header extensions.
fn bitmap_directory(path: &Path) -> u64 {
    let mut at = u64::from(read_be32(path, OFF_HEADER_LENGTH));
    loop {
        let (ty, len) = (read_be32(path, at), read_be32(path, at + 4));
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            return read_be64(path, at + 8 + 16);
        }
        at += 8 + u64::from(len).next_multiple_of(8);
    }
}

/// One hostile image: how it is made, and what we say of it.
struct Case {
    name: &'static str,
    make: fn(&Path, u64),
    /// Words every refusal must hold (the field that is too large); `None` for an image that is usable.
    refusal: Option<&'static str>,
    /// Commands that may still succeed on a refused image: they never read what is broken.
    unaffected: &'static [&'static str],
}

const CASES: [Case; 6] = [
    // Valid qcow2 content at the start of a sparse file of terabytes: usable (qemu-img check agrees, where it
    // has the memory to check a file that long).
    Case {
        name: "huge-sparse-file",
        make: |p, len| {
            base(p);
            OpenOptions::new().write(true).open(p).unwrap().set_len(len).unwrap();
        },
        refusal: None,
        unaffected: &[],
    },
    // qemu-img: "Could not open 'IMG': Active L1 table too large".
    Case {
        name: "huge-l1-size",
        make: |p, _| {
            base(p);
            be_at(p, OFF_L1_SIZE, &0x7fff_ffffu32.to_be_bytes());
        },
        refusal: Some("L1 table too large"),
        unaffected: &[],
    },
    // qemu-img: "Could not open 'IMG': Reference count table too large".
    Case {
        name: "huge-refcount-table",
        make: |p, _| {
            base(p);
            be_at(p, OFF_RT_CLUSTERS, &0xffff_ffffu32.to_be_bytes());
        },
        refusal: Some("refcount table too large"),
        unaffected: &[],
    },
    // qemu-img: "Could not open 'IMG': Bitmap 'bm0' doesn't satisfy the constraints", for every command. A
    // read-only open of ours reads bitmap tables only when a bitmap is used, so the commands that use none (info
    // lists the directory) work; the check, and every read-write open, refuse it by the bitmap's name.
    Case {
        name: "huge-bitmap-table",
        make: |p, _| {
            base(p);
            let mut cmd = qemu("qemu-img");
            support::run_ok(cmd.args(["bitmap", "--add"]).arg(p).arg("bm0"));
            be_at(p, bitmap_directory(p) + 8, &0xffff_ffffu32.to_be_bytes());
        },
        refusal: Some("bitmap 'bm0' does not satisfy the constraints: bitmap table has more than"),
        unaffected: &["snapshot", "info", "map", "convert", "sha"],
    },
    // qemu-img: "Could not open 'IMG': Snapshot table too large".
    Case {
        name: "huge-snapshot-count",
        make: |p, _| {
            base(p);
            be_at(p, OFF_NB_SNAPSHOTS, &0xffff_ffffu32.to_be_bytes());
        },
        refusal: Some("too many snapshots"),
        unaffected: &[],
    },
    // An unknown extension right after the header, claiming 4 GiB. qemu-img: "Could not open 'IMG': ERROR:
    // ext_unknown: Invalid extension length".
    Case {
        name: "huge-extension-length",
        make: |p, _| {
            base(p);
            let at = u64::from(read_be32(p, OFF_HEADER_LENGTH));
            be_at(p, at, &[0x12, 0x34, 0x56, 0x78, 0xff, 0xff, 0xff, 0xf8]);
        },
        refusal: Some("extension"),
        unaffected: &[],
    },
];

/// What must stay the same under a read-only command: the length, the modification time and the first bytes.
fn fingerprint(path: &Path) -> (u64, i64, i64, Vec<u8>) {
    let meta = std::fs::metadata(path).unwrap();
    let mut head = vec![0u8; HEAD.min(meta.len() as usize)];
    std::fs::File::open(path).unwrap().read_exact_at(&mut head, 0).unwrap();
    (meta.len(), meta.mtime(), meta.mtime_nsec(), head)
}

/// The commands run on every image: arguments (IMG stands for the image, COPY for a fresh copy of it, OUT for an
/// output file) and whether the command only reads.
const COMMANDS: [(&[&str], bool); 8] = [
    (&["info", "IMG"], true),
    (&["info", "--output=json", "IMG"], true),
    (&["check", "IMG"], true),
    (&["check", "-r", "all", "COPY"], false),
    (&["map", "IMG"], true),
    (&["convert", "-O", "raw", "IMG", "OUT"], true),
    (&["sha", "IMG"], true),
    (&["compact", "COPY"], false),
];

#[test]
fn every_command_on_every_hostile_image_exits_cleanly_within_a_gibibyte_of_address_space() {
    prlimit_available();
    let dir = Dir::new();
    let len = largest_sparse_length(dir.0.path());
    eprintln!("sparse files here reach {len:#x} bytes");
    let mut failures = Vec::new();
    let mut extra: Vec<(&[&str], bool)> = vec![(&["snapshot", "-l", "IMG"], true)];
    extra.extend(COMMANDS);
    for case in &CASES {
        let img = dir.path(&format!("{}.qcow2", case.name));
        (case.make)(&img, len);
        for (args, read_only) in &extra {
            let copy = dir.path(&format!("{}.copy.qcow2", case.name));
            let out_file = dir.path("out.raw");
            let _ = std::fs::remove_file(&out_file);
            if args.contains(&"COPY") {
                // A copy made the way the image was: copying terabytes of holes byte by byte would take hours.
                let _ = std::fs::remove_file(&copy);
                (case.make)(&copy, len);
            }
            let target: PathBuf = if args.contains(&"COPY") { copy.clone() } else { img.clone() };
            let argv: Vec<String> = args
                .iter()
                .map(|a| match *a {
                    "IMG" | "COPY" => target.display().to_string(),
                    "OUT" => out_file.display().to_string(),
                    other => other.to_string(),
                })
                .collect();
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let before = fingerprint(&target);
            let out = limited(dir.0.path(), &argv);
            let what = format!("{} `{}`", case.name, args.join(" "));
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!("{what}: {:?}: {}", out.status, stderr.lines().next().unwrap_or(""));
            if let Some(sig) = out.status.signal() {
                failures.push(format!("{what}: killed by signal {sig}\n{}", show(&out)));
                continue;
            }
            if *read_only && fingerprint(&target) != before {
                failures.push(format!("{what}: a read-only command changed the image"));
            }
            match case.refusal {
                Some(_) if out.status.success() && case.unaffected.contains(&args[0]) => {}
                Some(words) => {
                    if out.status.success() {
                        failures.push(format!("{what}: accepted an image qemu-img refuses\n{}", show(&out)));
                    } else if !stderr.to_lowercase().contains(&words.to_lowercase()) {
                        failures.push(format!("{what}: the error does not say '{words}'\n{}", show(&out)));
                    }
                }
                None => {
                    if !out.status.success() {
                        failures.push(format!("{what}: failed on a usable image\n{}", show(&out)));
                    }
                }
            }
        }
        if case.refusal.is_none() {
            // qemu-img check agrees that the image is clean, where it can count a file that long (its check holds
            // a refcount per cluster of the file: 512 MiB for 16 TiB, too much for 1 EiB).
            let out = output_within(qemu("qemu-img").args(["check", "--output=json"]).arg(&img), DEADLINE);
            eprintln!("qemu-img check {}: {:?}: {}", case.name, out.status, String::from_utf8_lossy(&out.stderr));
            if serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok() {
                assert!(out.status.success(), "qemu-img check finds {} unclean: {}", case.name, show(&out));
            }
        }
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(dir.path(&format!("{}.copy.qcow2", case.name)));
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn a_raw_source_truncated_during_a_convert_stops_it_with_an_error_not_a_signal() {
    let dir = Dir::new();
    let src = dir.path("src.raw");
    // 256 MiB of data (no holes: every chunk is read), truncated by this process while the tool copies it.
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut shrank = 0;
    for attempt in 0..5 {
        let f = std::fs::File::create(&src).unwrap();
        for i in 0..256u64 {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        drop(f);
        let out_file = dir.path("out.qcow2");
        let _ = std::fs::remove_file(&out_file);
        let child = Command::new(env!("CARGO_BIN_EXE_qcow-tool"))
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&src)
            .arg(&out_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Truncate once the copy is under way: the output has grown past a few MiB.
        let started = std::time::Instant::now();
        while std::fs::metadata(&out_file).map_or(0, |m| m.len()) < (8 << 20) << attempt.min(2)
            && started.elapsed().as_secs() < 30
        {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        std::fs::File::options().write(true).open(&src).unwrap().set_len(1 << 20).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.signal(), None, "convert died by a signal: {}", show(&out));
        if out.status.success() {
            // The copy finished before the truncation: nothing to learn from this attempt.
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("src.raw") && stderr.contains("shrank from 268435456 to 1048576 bytes"),
            "the error names neither the source nor what happened: {}",
            show(&out)
        );
        assert!(stderr.contains("at byte offset 0x"), "the error does not say where: {}", show(&out));
        shrank += 1;
        break;
    }
    assert!(shrank > 0, "every copy finished before the truncation");
}
