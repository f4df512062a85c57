//! `qcow-tool convert` and `qcow-tool stream-decode` with QEMU on the other side: sources made by qemu-img,
//! outputs judged by `qemu-img compare` and `qemu-img check` (or compared byte for byte with `qemu-img convert
//! -O raw`), overlays, snapshots and existing targets as qemu-img's options mean them, and images decoded from a
//! real pipe.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../../qcow/tests/support/mod.rs"]
mod support;

mod binary;

use binary::{show, tool, Dir};

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::{assert_clean, qemu, qemu_create, qemu_io, qemu_to_raw, run_ok, with_deadline};

/// Runs `cmd`, insists it fails with exit code 1 and exactly one line on stderr, and returns that line.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert_eq!(out.status.code(), Some(1), "{cmd:?}:\n{}", show(&out));
    let stderr = String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8");
    assert_eq!(stderr.lines().count(), 1, "{cmd:?} must print one line:\n{}", show(&out));
    assert!(stderr.starts_with("qcow-tool: ") && !stderr.contains("panicked"), "{}", show(&out));
    stderr
}

/// Bytes that do not compress (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A 24 MiB disk with incompressible data, compressible text, written zeros and holes, in and across clusters,
/// ending with a partial cluster: as a sparse raw file, and as the qcow2 image `qemu-img convert` makes of it.
fn source(dir: &Dir) -> (PathBuf, PathBuf) {
    let raw = dir.path("source.raw");
    let len: u64 = (24 << 20) + 4096 + 512;
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(len).unwrap();
    use std::os::unix::fs::FileExt;
    let text: Vec<u8> = b"qcow2 streams and converts; ".iter().copied().cycle().take(3 << 20).collect();
    for (at, data) in [
        (0u64, noise(70_000, 1)),
        (1 << 20, text.clone()),
        ((5 << 20) + 512, vec![0u8; 1 << 20]),
        (9 << 20, noise(2 << 20, 2)),
        ((15 << 20) + 4096, text[..200_000].to_vec()),
        (len - 10_000, noise(10_000, 3)),
    ] {
        file.write_all_at(&data, at).unwrap();
    }
    drop(file);
    let qcow2 = dir.path("source.qcow2");
    run_ok(qemu("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2));
    (raw, qcow2)
}

/// `qemu-img compare` says the two images hold the same guest data.
fn assert_same(a: &Path, b: &Path) {
    let out = qemu("qemu-img").arg("compare").arg(a).arg(b).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "qemu-img compare {} {}:\n{}", a.display(), b.display(), show(&out));
}

fn check_json(path: &Path) -> Value {
    let out = qemu("qemu-img").args(["check", "--output=json"]).arg(path).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_output_variant_reads_back_identically_in_qemu() {
    let dir = Dir::new();
    let (raw, qcow2) = source(&dir);
    // (options, whether clusters are compressed)
    let cases: &[(&[&str], bool)] = &[
        (&["-O", "raw"], false),
        (&["-O", "qcow2"], false),
        (&["-O", "qcow2", "-c"], true),
        (&["-O", "qcow2", "-c", "-o", "compression_type=zstd"], true),
        (&["-O", "qcow2", "-c", "-o", "compression_level=1"], true),
        (&["-O", "qcow2", "-c", "-o", "compression_type=zstd,compression_level=19"], true),
        (&["-O", "qcow2", "-c", "-o", "compat=0.10"], true),
        (&["-O", "qcow2", "-c", "-o", "cluster_size=512"], true),
        (&["-O", "qcow2", "-c", "-o", "cluster_size=2M", "-m", "1"], true),
        (&["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", "-W", "-m", "3"], false),
        (&["-O", "qcow2", "-o", "extended_l2=on"], false),
    ];
    for (i, &(opts, compressed)) in cases.iter().enumerate() {
        for (name, src) in [("raw", &raw), ("qcow2", &qcow2)] {
            let out = dir.path(&format!("out{i}-{name}"));
            run_ok(tool().arg("convert").args(opts).arg(src).arg(&out));
            assert_same(src, &out);
            if opts.contains(&"qcow2") {
                assert_clean(&out);
                let count = check_json(&out)["compressed-clusters"].as_u64().unwrap_or(0);
                assert_eq!(count > 0, compressed, "case {i} from {name}: {count} compressed clusters");
            }
        }
    }
}

#[test]
fn compressed_output_is_no_larger_than_qemu_img_s_by_more_than_two_percent() {
    let dir = Dir::new();
    let (raw, _) = source(&dir);
    for kind in ["zlib", "zstd"] {
        let (ours, theirs) = (dir.path(&format!("ours-{kind}.qcow2")), dir.path(&format!("qemu-{kind}.qcow2")));
        let option = format!("compression_type={kind}");
        run_ok(tool().args(["convert", "-c", "-O", "qcow2", "-o", &option]).arg(&raw).arg(&ours));
        run_ok(qemu("qemu-img").args(["convert", "-c", "-O", "qcow2", "-o", &option]).arg(&raw).arg(&theirs));
        let (a, b) = (std::fs::metadata(&ours).unwrap().len(), std::fs::metadata(&theirs).unwrap().len());
        assert!(a as f64 <= b as f64 * 1.02, "{kind}: ours {a} bytes, qemu-img's {b}");
    }
}

#[test]
fn the_same_input_gives_the_same_file_whatever_the_thread_count() {
    let dir = Dir::new();
    let (raw, qcow2) = source(&dir);
    for opts in [&["-O", "qcow2"][..], &["-O", "qcow2", "-c"], &["-O", "qcow2", "-c", "-o", "compression_type=zstd"]] {
        let mut files = Vec::new();
        for (i, threads) in ["1", "2", "5"].iter().enumerate() {
            for (name, src) in [("raw", &raw), ("qcow2", &qcow2)] {
                let out = dir.path(&format!("det{i}-{name}.qcow2"));
                run_ok(tool().arg("convert").args(opts).args(["-m", threads]).arg(src).arg(&out));
                files.push(std::fs::read(&out).unwrap());
            }
        }
        assert!(files.iter().all(|f| f == &files[0]), "{opts:?}: outputs differ between runs");
    }
}

#[test]
fn raw_output_is_sparse_and_equal_to_qemu_img_s() {
    let dir = Dir::new();
    let (_, qcow2) = source(&dir);
    let ours = dir.path("ours.raw");
    run_ok(tool().args(["convert", "-O", "raw"]).arg(&qcow2).arg(&ours));
    let expected = qemu_to_raw(&qcow2, dir.0.path());
    assert!(std::fs::read(&ours).unwrap() == expected);
    let meta = std::fs::metadata(&ours).unwrap();
    // Data is about 6.4 MiB of the 24 MiB: holes and the written zeros are not allocated.
    assert!(meta.blocks() * 512 < 8 << 20, "{} bytes allocated of {}", meta.blocks() * 512, meta.len());
}

/// qemu-img map's JSON entries of `path`.
fn map(path: &Path) -> Vec<Value> {
    let out = run_ok(qemu("qemu-img").args(["map", "--output=json"]).arg(path));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

#[test]
fn an_overlay_stores_only_what_differs_from_its_backing_file() {
    let dir = Dir::new();
    let base = dir.path("base.qcow2");
    qemu_create(&base, "", "16M");
    qemu_io(&base, &["write -P 0x11 0 4M", "write -P 0x22 8M 2M"]);
    let src = dir.path("src.qcow2");
    run_ok(qemu("qemu-img").args(["convert", "-O", "qcow2"]).arg(&base).arg(&src));
    // One cluster changes, one range becomes zeros over base data, and new data appears where the base has none.
    qemu_io(&src, &["write -P 0x33 1M 64k", "write -z 8M 1M", "write -P 0x44 12M 64k"]);
    for flag in ["-B", "-b"] {
        let overlay = dir.path(&format!("overlay{flag}.qcow2"));
        run_ok(tool().args(["convert", "-O", "qcow2", flag, "base.qcow2", "-F", "qcow2"]).arg(&src).arg(&overlay));
        assert_clean(&overlay);
        assert_same(&src, &overlay);
        let info: Value =
            serde_json::from_slice(&run_ok(qemu("qemu-img").args(["info", "--output=json"]).arg(&overlay)).stdout)
                .unwrap();
        assert_eq!(info["backing-filename"], "base.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
        // Everything equal to the base comes from the base: the overlay holds 64k + 1M + 64k of its own.
        let own: u64 = map(&overlay)
            .iter()
            .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true) && e["present"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(own, (64 << 10) + (1 << 20) + (64 << 10), "{:?}", map(&overlay));
    }
    // A raw backing file, probed when -F is not given.
    let raw_base = dir.path("base.raw");
    run_ok(qemu("qemu-img").args(["convert", "-O", "raw"]).arg(&base).arg(&raw_base));
    let overlay = dir.path("over-raw.qcow2");
    run_ok(tool().args(["convert", "-O", "qcow2", "-c", "-B", "base.raw"]).arg(&src).arg(&overlay));
    assert_clean(&overlay);
    assert_same(&src, &overlay);
}

#[test]
fn a_snapshot_converts_as_qemu_img_converts_it() {
    let dir = Dir::new();
    let (_, qcow2) = source(&dir);
    run_ok(qemu("qemu-img").args(["snapshot", "-c", "before"]).arg(&qcow2));
    qemu_io(&qcow2, &["write -P 0x55 0 2M", "write -z 9M 1M"]);
    let expected = dir.path("expected.raw");
    run_ok(qemu("qemu-img").args(["convert", "-O", "raw", "-l", "snapshot.name=before"]).arg(&qcow2).arg(&expected));
    let expected = std::fs::read(&expected).unwrap();
    for spec in ["snapshot.name=before", "before", "snapshot.id=1"] {
        let out = dir.path("snap.raw");
        run_ok(tool().args(["convert", "-O", "raw", "-l", spec]).arg(&qcow2).arg(&out));
        assert!(std::fs::read(&out).unwrap() == expected, "-l {spec}");
        let img = dir.path("snap.qcow2");
        run_ok(tool().args(["convert", "-O", "qcow2", "-c", "-l", spec]).arg(&qcow2).arg(&img));
        assert_clean(&img);
        assert!(qemu_to_raw(&img, dir.0.path()) == expected, "-l {spec} to qcow2");
    }
    let err = fails(tool().args(["convert", "-O", "raw", "-l", "snapshot.name=nope"]).arg(&qcow2).arg(dir.path("x")));
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn n_writes_into_an_existing_target_and_zeroes_what_the_source_does_not_hold() {
    let dir = Dir::new();
    let (_, qcow2) = source(&dir);
    let size = std::fs::metadata(dir.path("source.raw")).unwrap().len().to_string();
    // A qcow2 target full of other data.
    let target = dir.path("target.qcow2");
    qemu_create(&target, "cluster_size=4k", &size);
    qemu_io(&target, &["write -P 0xee 0 24M"]);
    run_ok(tool().args(["convert", "-n", "-O", "qcow2"]).arg(&qcow2).arg(&target));
    assert_clean(&target);
    assert_same(&qcow2, &target);
    // A raw target full of other data.
    let raw_target = dir.path("target.raw");
    std::fs::write(&raw_target, vec![0xeeu8; size.parse().unwrap()]).unwrap();
    run_ok(tool().args(["convert", "-n", "-O", "raw"]).arg(&qcow2).arg(&raw_target));
    assert!(std::fs::read(&raw_target).unwrap() == qemu_to_raw(&qcow2, dir.0.path()));
    // A missing target is not created.
    let err = fails(tool().args(["convert", "-n", "-O", "qcow2"]).arg(&qcow2).arg(dir.path("missing.qcow2")));
    assert!(err.contains("missing.qcow2"), "{err}");
    assert!(!dir.path("missing.qcow2").exists());
}

#[test]
fn progress_goes_to_the_descriptor_as_json_lines() {
    let dir = Dir::new();
    let (_, qcow2) = source(&dir);
    let out = run_ok(Command::new("sh").arg("-c").arg(format!(
        "'{}' convert -p --progress-fd 3 -O qcow2 -c '{}' '{}' 3>&1 1>/dev/null",
        env!("CARGO_BIN_EXE_qcow-tool"),
        qcow2.display(),
        dir.path("p.qcow2").display()
    )));
    let values: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["progress"].as_u64().unwrap())
        .collect();
    assert!(values.len() >= 2 && values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert_eq!(values.last(), Some(&100));
}

#[test]
fn misuses_are_one_clear_line() {
    let dir = Dir::new();
    let (raw, qcow2) = source(&dir);
    let out = dir.path("out");
    for (args, needle) in [
        (&["-O", "raw", "-c"][..], "-c needs -O qcow2"),
        (&["-O", "raw", "-B", "base.qcow2"], "-B needs -O qcow2"),
        (&["-O", "qcow2", "-o", "compression_level=1"], "only applies with -c"),
        (&["-O", "qcow2", "-c", "-o", "compression_level=99"], "compression_level=99"),
        (&["-O", "qcow2", "-o", "cluster_size=3k"], "cluster"),
        (&["-O", "qcow2", "-B", "missing.qcow2", "-F", "qcow2"], "missing.qcow2"),
    ] {
        let err = fails(tool().arg("convert").args(args).arg(&qcow2).arg(&out));
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left an output behind");
    }
    let err = fails(tool().args(["convert", "-O", "raw", "-l", "s"]).arg(&raw).arg(&out));
    assert!(err.contains("only qcow2 images have snapshots"), "{err}");
}

/// Runs `qcow-tool stream-decode OUT` with `image` written into its standard input through a pipe.
fn stream_decode(image: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut child = tool()
        .arg("stream-decode")
        .args(extra)
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let bytes = std::fs::read(image).unwrap();
    let feeder = std::thread::spawn(move || {
        // The decoder may stop reading early on an error; a broken pipe then is expected.
        let _ = stdin.write_all(&bytes);
    });
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    output
}

fn assert_streams(image: &Path, dir: &Dir, what: &str) {
    let image = image.to_path_buf();
    let out = dir.path("streamed.raw");
    let expected = qemu_to_raw(&image, dir.0.path());
    let what = what.to_string();
    with_deadline(60, &what.clone(), move || {
        let result = stream_decode(&image, &out, &[]);
        assert!(result.status.success(), "{what}: {}", show(&result));
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), expected.len(), "{what}");
        assert!(got == expected, "{what}: differs from qemu-img convert -O raw");
        let meta = std::fs::metadata(&out).unwrap();
        assert!(meta.blocks() * 512 < meta.len() / 2, "{what}: not sparse ({} bytes allocated)", meta.blocks() * 512);
    });
}

#[test]
fn stream_decode_reads_what_qemu_img_convert_lays_out() {
    let dir = Dir::new();
    let (raw, _) = source(&dir);
    for opts in [
        "",
        "-c",
        "-c -o compression_type=zstd",
        "-o compat=0.10",
        "-c -o compat=0.10",
        "-o cluster_size=512",
        "-c -o cluster_size=512",
        "-o cluster_size=2M",
        "-c -o cluster_size=2M,compression_type=zstd",
        "-o extended_l2=on",
    ] {
        let img = dir.path("qemu-made.qcow2");
        run_ok(
            qemu("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .args(opts.split_whitespace())
                .arg(&raw)
                .arg(&img),
        );
        assert_streams(&img, &dir, &format!("qemu-img convert {opts}"));
    }
}

#[test]
fn stream_decode_reads_what_our_convert_lays_out() {
    let dir = Dir::new();
    let (raw, _) = source(&dir);
    for opts in ["", "-c", "-c -o compression_type=zstd", "-o cluster_size=512", "-c -o cluster_size=2M"] {
        let img = dir.path("ours.qcow2");
        run_ok(tool().args(["convert", "-f", "raw", "-O", "qcow2"]).args(opts.split_whitespace()).arg(&raw).arg(&img));
        assert_streams(&img, &dir, &format!("qcow-tool convert {opts}"));
        // Our layout needs no spool file: every table comes before the data it maps, so at most the refcount
        // structures and a few partly used clusters of compressed data are kept (a few clusters).
        let out = dir.path("nospool.raw");
        let result = stream_decode(&img, &out, &["--no-spool", "--memory", "8M"]);
        assert!(result.status.success(), "{opts}: {}", show(&result));
    }
}

#[test]
fn a_layout_with_tables_after_the_data_is_spooled_correctly_or_refused_by_name() {
    let dir = Dir::new();
    let (raw, _) = source(&dir);
    let img = dir.path("grown.qcow2");
    run_ok(qemu("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2", "-c"]).arg(&raw).arg(&img));
    // Growing the disk moves the L1 table to the end of the file, after every L2 table and data cluster.
    run_ok(qemu("qemu-img").args(["resize"]).arg(&img).arg("100G"));
    let out = dir.path("refused.raw");
    let result = stream_decode(&img, &out, &["--no-spool", "--memory", "64K"]);
    assert_eq!(result.status.code(), Some(1), "{}", show(&result));
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("cannot be streamed") && err.lines().count() == 1, "{err}");
    assert!(!out.exists(), "a refused decode leaves no output");
    // With a spool file (past a small memory bound) the result is exact.
    let out = dir.path("spooled.raw");
    let result = stream_decode(&img, &out, &["--memory", "64K", "--spool-dir"]);
    assert!(!result.status.success(), "--spool-dir needs a value");
    let spool = dir.path("spool");
    std::fs::create_dir(&spool).unwrap();
    let result = stream_decode(&img, &out, &["--memory", "64K", "--spool-dir", spool.to_str().unwrap()]);
    assert!(result.status.success(), "{}", show(&result));
    let expected = dir.path("expected.raw");
    run_ok(qemu("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&expected));
    let cmp = qemu("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&out).arg(&expected).output().unwrap();
    assert_eq!(cmp.status.code(), Some(0), "{}", show(&cmp));
}

#[test]
fn stream_decode_refuses_what_is_not_in_the_stream_by_name() {
    let dir = Dir::new();
    let base = dir.path("base.qcow2");
    qemu_create(&base, "", "1M");
    let overlay = dir.path("overlay.qcow2");
    run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"]).arg(&overlay));
    let data_file = dir.path("external.qcow2");
    // An absolute name: qemu-img creates a relative one in its working directory, which is the source tree here.
    qemu_create(&data_file, &format!("data_file={}", dir.path("external.data").display()), "1M");
    let not_qcow2 = dir.path("plain.raw");
    std::fs::write(&not_qcow2, vec![7u8; 4096]).unwrap();
    for (img, needle) in
        [(&overlay, "backing file 'base.qcow2'"), (&data_file, "external data file"), (&not_qcow2, "magic")]
    {
        let out = dir.path("x.raw");
        let result = stream_decode(img, &out, &[]);
        assert_eq!(result.status.code(), Some(1), "{}", show(&result));
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(err.contains(needle) && err.lines().count() == 1, "{needle}: {err}");
    }
}
