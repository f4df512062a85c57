//! Metadata contexts, protocol side, against qemu-nbd: `base:allocation`, `qemu:allocation-depth` and
//! `qemu:dirty-bitmap:NAME` negotiated (LIST with every kind of query, SET with several contexts) and answered
//! (one block status chunk per context, `NBD_CMD_FLAG_REQ_ONE` for each) exactly as qemu-nbd answers them.
//!
//! The bitmap engine is written elsewhere, so the export here is the engine's image of a qcow2 file plus a test
//! stand-in for its bitmaps: fixed dirty ranges, the very ranges qemu-io dirtied in the file's real bitmap. qemu-nbd
//! serves the same file with `-A -B`, and a hand-written client and libnbd's nbdinfo ask both the same.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod client;
#[path = "../../qcow/tests/support/nbd.rs"]
mod nbd;
#[path = "../../qcow/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use client::{Chunk, Client, CMD_FLAG_REQ_ONE, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, REPLY_FLAG_DONE};
use nbd::{nbdinfo, nbdinfo_contexts, nbdinfo_map, unix_uri, QemuNbd};
use qcow::block::{BlockDevice, FileDevice};
use qcow::{Config, DepthRun, Image};
use qcow_nbd::{Allocation, Bind, Export, Handle, Server, ServerConfig};
use support::{qemu, qemu_io, run_ok, with_deadline};

const SIZE: u64 = 4 << 20;

/// qemu-nbd's arguments for the fixture. It offers its `-B` bitmaps last given first, so `b2` comes before `b1`
/// on its command line to offer them in the order our server is configured with, `b1` then `b2`.
const QEMU_NBD_ARGS: [&str; 5] = ["-A", "-B", "b2", "-B", "b1"];

/// The engine's image of a file, with dirty bitmaps fixed by the test (name → dirty `start..end` ranges).
struct Bitmapped {
    image: Image<FileDevice>,
    bitmaps: BTreeMap<String, Vec<(u64, u64)>>,
}

/// Read-only: the image's own block-device methods (named in full, since `Image` has inherent ones of the same
/// names), writes refused by the server before they get here.
impl BlockDevice for Bitmapped {
    fn info(&self) -> qcow::block::Info {
        BlockDevice::info(&self.image)
    }
    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> qcow::Result<()> {
        BlockDevice::read(&self.image, sector, bufs)
    }
    fn write(&self, sector: u64, bufs: &[std::io::IoSlice<'_>]) -> qcow::Result<()> {
        BlockDevice::write(&self.image, sector, bufs)
    }
    fn flush(&self) -> qcow::Result<()> {
        BlockDevice::flush(&self.image)
    }
    fn resize(&self, sectors: u64) -> qcow::Result<()> {
        BlockDevice::resize(&self.image, sectors)
    }
    fn disconnect(&self) {
        BlockDevice::disconnect(&self.image)
    }
}

impl Export for Bitmapped {
    fn can_trim(&self) -> bool {
        false
    }

    fn allocation(&self, offset: u64, len: u64) -> qcow::Result<Vec<Allocation>> {
        Export::allocation(&self.image, offset, len)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> qcow::Result<Vec<DepthRun>> {
        self.image.allocation_depth(offset, len)
    }

    fn has_bitmap(&self, name: &str) -> bool {
        self.bitmaps.contains_key(name)
    }

    fn dirty_bitmap(&self, name: &str, offset: u64, len: u64) -> qcow::Result<Option<Vec<(u64, bool)>>> {
        let Some(dirty) = self.bitmaps.get(name) else { return Ok(None) };
        let end = offset + len;
        let mut runs = Vec::new();
        let mut at = offset;
        for &(s, e) in dirty {
            let (s, e) = (s.max(at), e.min(end));
            if s < e {
                runs.push((s - at, false));
                runs.push((e - s, true));
                at = e;
            }
        }
        runs.push((end - at, false));
        Ok(Some(runs))
    }
}

/// Our library server on a Unix socket of its own, stopped when dropped.
struct Ours {
    handle: Handle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    dir: tempfile::TempDir,
}

impl Ours {
    fn start(export: Bitmapped, bitmaps: &[&str]) -> Ours {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            read_only: true,
            bitmaps: bitmaps.iter().map(|s| s.to_string()).collect(),
            ..ServerConfig::default()
        };
        let server = Server::bind(Arc::new(export), &Bind::Unix(dir.path().join("ours.sock")), config).unwrap();
        let handle = server.handle();
        let thread = Some(std::thread::spawn(move || server.run()));
        Ours { handle, thread, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("ours.sock")
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(thread) = self.thread.take() {
            let stopped = thread.join();
            if !std::thread::panicking() {
                stopped.unwrap().unwrap();
            }
        }
    }
}

/// The dirty ranges of bitmap `b1` in the fixture.
fn b1_dirty() -> Vec<(u64, u64)> {
    vec![(64 << 10, 128 << 10), (3 << 20, (3 << 20) + (256 << 10)), (3584 << 10, 3648 << 10)]
}

/// A 4 MiB qcow2 file with data, zero clusters and holes, and two persistent bitmaps: `b1`, dirtied by the
/// writes of [`b1_dirty`] (64 KiB granularity), and `b2`, added last and clean.
fn fixture(dir: &Path) -> PathBuf {
    let image = dir.join("bitmaps.qcow2");
    run_ok(qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]).arg(&image).arg("4M"));
    qemu_io(&image, &["write -P 1 0 256k", "write -P 2 1M 512k", "write -z 2M 256k"]);
    run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "65536"]).arg(&image).arg("b1"));
    qemu_io(&image, &["write -P 3 64k 64k", "write -P 4 3M 256k", "write -z 3584k 64k"]);
    run_ok(qemu("qemu-img").args(["bitmap", "--add", "-g", "65536"]).arg(&image).arg("b2"));
    image
}

fn export_of(image: &Path) -> Bitmapped {
    let bitmaps = BTreeMap::from([("b1".to_string(), b1_dirty()), ("b2".to_string(), Vec::new())]);
    Bitmapped { image: Image::open_path(image, Config::read_only()).unwrap(), bitmaps }
}

/// The negotiation script both servers go through, with every answer written down.
fn negotiations(socket: &Path) -> Vec<String> {
    let mut log = Vec::new();
    let mut c = Client::connect(socket);
    // QEMU lists without structured replies; it only refuses SET then.
    log.push(format!("list before structured: {:?}", c.meta(OPT_LIST_META_CONTEXT, "", &[])));
    log.push(format!("set before structured: {:?}", c.meta(OPT_SET_META_CONTEXT, "", &["base:allocation"])));
    c.structured();
    let lists: [&[&str]; 8] = [
        &[],
        &["qemu:"],
        &["base:"],
        &["qemu:dirty-bitmap:"],
        &["qemu:allocation-depth", "nope:x", "qemu:dirty-bitmap:zz", "qemu:dirty-bitmap:b2"],
        &["base:allocation", "base:allocation", "qemu:dirty-bitmap:b1"],
        &["qemu:allocation-depthx", "base:allocationx", "qemu:dirty-bitmap:b"],
        &["", "qemu", "base"],
    ];
    for queries in lists {
        log.push(format!("list {queries:?}: {:?}", c.meta(OPT_LIST_META_CONTEXT, "", queries)));
    }
    log.push(format!("list unknown export: {:?}", c.meta(OPT_LIST_META_CONTEXT, "nope", &[])));
    log.push(format!("set namespaces: {:?}", c.meta(OPT_SET_META_CONTEXT, "", &["qemu:", "base:"])));
    let mut truncated = client::meta_data("", &["base:allocation"]);
    truncated.pop();
    let replies = c.option(OPT_SET_META_CONTEXT, &truncated);
    log.push(format!("set truncated: {:?}", replies.iter().map(|r| r.kind).collect::<Vec<_>>()));
    let set = ["qemu:dirty-bitmap:b2", "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1"];
    log.push(format!("set {set:?}: {:?}", c.meta(OPT_SET_META_CONTEXT, "", &set)));
    log
}

#[test]
fn list_and_set_meta_context_answer_as_qemu_nbd_does() {
    with_deadline(120, "meta negotiation", || {
        let dir = tempfile::tempdir().unwrap();
        let image = fixture(dir.path());
        let qemu_nbd = QemuNbd::start(&image, "qcow2", &QEMU_NBD_ARGS);
        let ours = Ours::start(export_of(&image), &["b1", "b2"]);
        let theirs = negotiations(&qemu_nbd.socket());
        let mine = negotiations(&ours.socket());
        assert_eq!(mine, theirs);
        // And what that is, so that a change in both is noticed too.
        let all = r#"Ok([(0, "base:allocation"), (0, "qemu:allocation-depth"), (0, "qemu:dirty-bitmap:b1"), (0, "qemu:dirty-bitmap:b2")])"#;
        assert_eq!(mine[0], format!("list before structured: {all}"));
        assert_eq!(mine[1], "set before structured: Err(2147483651)");
        assert_eq!(mine[2], format!("list []: {all}"));
        assert_eq!(
            mine.last().unwrap(),
            r#"set ["qemu:dirty-bitmap:b2", "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1"]: Ok([(0, "base:allocation"), (1, "qemu:allocation-depth"), (2, "qemu:dirty-bitmap:b1"), (3, "qemu:dirty-bitmap:b2")])"#
        );
    });
}

/// Block status of the requests both servers are asked, after selecting `contexts`, as the raw chunks.
fn block_statuses(socket: &Path, contexts: &[&str]) -> Vec<(u64, u32, u16, Vec<Chunk>)> {
    let mut c = Client::connect(socket);
    c.structured();
    let selected = c.meta(OPT_SET_META_CONTEXT, "", contexts).unwrap();
    assert_eq!(selected.len(), contexts.len(), "{selected:?}");
    c.go("");
    let requests: [(u64, u32); 6] = [
        (0, SIZE as u32),
        ((64 << 10) + 512, 3 << 20),
        (1 << 20, 4096),
        ((3 << 20) + 512, (1 << 20) - 512),
        (SIZE - 65536, 65536),
        (2 << 20, 512),
    ];
    let mut out = Vec::new();
    let mut cookie = 1;
    for (offset, len) in requests {
        for flags in [0, CMD_FLAG_REQ_ONE] {
            cookie += 1;
            out.push((offset, len, flags, c.block_status(cookie, offset, len, flags)));
        }
    }
    out
}

/// What the protocol asks of every reply, whoever sent it: one chunk per selected context with its id, in
/// order, only the last marked done, descriptors inside the request, exactly one each with `REQ_ONE`.
fn assert_well_formed(replies: &[(u64, u32, u16, Vec<Chunk>)], ids: &[u32]) {
    for (offset, len, flags, chunks) in replies {
        let what = format!("{offset:#x}+{len:#x} flags {flags}: {chunks:?}");
        assert_eq!(chunks.iter().map(|c| c.block_status().0).collect::<Vec<_>>(), ids, "{what}");
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(chunk.flags & REPLY_FLAG_DONE != 0, i + 1 == chunks.len(), "{what}");
            let (_, descriptors) = chunk.block_status();
            let total: u64 = descriptors.iter().map(|d| u64::from(d.0)).sum();
            assert!(!descriptors.is_empty() && total <= u64::from(*len), "{what}");
            if flags & CMD_FLAG_REQ_ONE != 0 {
                assert_eq!(descriptors.len(), 1, "{what}");
            }
        }
    }
}

#[test]
fn block_status_answers_one_chunk_per_context_and_req_one_for_each_as_qemu_nbd_does() {
    with_deadline(180, "block status contexts", || {
        let dir = tempfile::tempdir().unwrap();
        let image = fixture(dir.path());
        let qemu_nbd = QemuNbd::start(&image, "qcow2", &QEMU_NBD_ARGS);
        let ours = Ours::start(export_of(&image), &["b1", "b2"]);
        let three = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1"];
        let mine = block_statuses(&ours.socket(), &three);
        assert_well_formed(&mine, &[0, 1, 2]);
        assert_eq!(mine, block_statuses(&qemu_nbd.socket(), &three));
        // The bitmap chunk of the whole disk is the fixture's dirty ranges.
        let (_, whole) = mine[0].3[2].block_status();
        let mut at = 0u64;
        let dirty: Vec<(u64, u64)> = whole
            .iter()
            .filter_map(|&(n, flags)| {
                at += u64::from(n);
                (flags == 1).then(|| (at - u64::from(n), at))
            })
            .collect();
        assert_eq!(dirty, b1_dirty());

        let two = ["qemu:dirty-bitmap:b2", "qemu:allocation-depth"];
        let mine = block_statuses(&ours.socket(), &two);
        assert_well_formed(&mine, &[1, 3]);
        assert_eq!(mine, block_statuses(&qemu_nbd.socket(), &two));
    });
}

#[test]
fn block_status_without_a_selected_context_is_refused_with_einval_as_by_qemu_nbd() {
    with_deadline(120, "block status without contexts", || {
        let dir = tempfile::tempdir().unwrap();
        let image = fixture(dir.path());
        let qemu_nbd = QemuNbd::start(&image, "qcow2", &["-A", "-B", "b1"]);
        let ours = Ours::start(export_of(&image), &["b1"]);
        let answer = |socket: &Path| {
            let mut c = Client::connect(socket);
            c.structured();
            // A SET selecting something, then one selecting nothing: the second replaces the first.
            c.meta(OPT_SET_META_CONTEXT, "", &["base:allocation"]).unwrap();
            assert_eq!(c.meta(OPT_SET_META_CONTEXT, "", &["qemu:dirty-bitmap:nope"]), Ok(vec![]));
            c.go("");
            let chunks = c.block_status(9, 0, 4096, 0);
            assert_eq!(chunks.len(), 1, "{chunks:?}");
            chunks[0].error()
        };
        assert_eq!(answer(&ours.socket()), 22);
        assert_eq!(answer(&qemu_nbd.socket()), 22);
    });
}

#[test]
fn nbdinfo_reads_the_dirty_bitmap_context_as_it_reads_qemu_nbds() {
    with_deadline(120, "nbdinfo dirty bitmap", || {
        let dir = tempfile::tempdir().unwrap();
        let image = fixture(dir.path());
        let qemu_nbd = QemuNbd::start(&image, "qcow2", &QEMU_NBD_ARGS);
        let ours = Ours::start(export_of(&image), &["b1", "b2"]);
        let uri = unix_uri(&ours.socket(), "");
        // The fixture is what the test export says: QEMU's own bitmap has exactly those dirty ranges.
        let dirty: Vec<(u64, u64)> = nbdinfo_map("qemu:dirty-bitmap:b1", &qemu_nbd.uri())
            .into_iter()
            .filter(|e| e.2 == 1)
            .map(|(s, l, _)| (s, s + l))
            .collect();
        assert_eq!(dirty, b1_dirty());
        for args in [
            &["--map=qemu:dirty-bitmap:b1"][..],
            &["--map=qemu:dirty-bitmap:b1", "--totals"],
            &["--map=qemu:dirty-bitmap:b2"],
            &["--map=qemu:allocation-depth", "--totals"],
            &["--map"],
        ] {
            assert_eq!(nbdinfo(args, &uri), nbdinfo(args, &qemu_nbd.uri()), "nbdinfo {args:?}");
        }
        assert_eq!(
            nbdinfo_contexts(&uri),
            ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b2"]
        );
        assert_eq!(nbdinfo_contexts(&uri), nbdinfo_contexts(&qemu_nbd.uri()));
    });
}

#[test]
fn a_bitmap_the_export_lacks_is_refused_at_bind_in_qemu_nbds_words() {
    with_deadline(120, "unknown bitmap", || {
        let dir = tempfile::tempdir().unwrap();
        let image = fixture(dir.path());
        let config = ServerConfig { bitmaps: vec!["b1".into(), "nope".into()], ..ServerConfig::default() };
        let Err(refused) = Server::bind(Arc::new(export_of(&image)), &Bind::Unix(dir.path().join("x.sock")), config)
        else {
            panic!("a server offering a bitmap the export lacks was bound")
        };
        assert_eq!(refused.kind(), std::io::ErrorKind::NotFound);
        let out = qemu("qemu-nbd").args(["-r", "-f", "qcow2", "-B", "b1", "-B", "nope"]).arg(&image).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let words = String::from_utf8_lossy(&out.stderr);
        assert_eq!(words.trim().strip_prefix("qemu-nbd: "), Some(refused.to_string().as_str()), "{words}");

        // A name given twice is offered once, in the order given.
        let ours = Ours::start(export_of(&image), &["b2", "b1", "b2"]);
        let mut c = Client::connect(&ours.socket());
        c.structured();
        let listed = c.meta(OPT_LIST_META_CONTEXT, "", &["qemu:dirty-bitmap:"]).unwrap();
        assert_eq!(listed, [(0, "qemu:dirty-bitmap:b2".to_string()), (0, "qemu:dirty-bitmap:b1".to_string())]);
        let set = c.meta(OPT_SET_META_CONTEXT, "", &["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b2"]).unwrap();
        assert_eq!(set, [(2, "qemu:dirty-bitmap:b2".to_string()), (3, "qemu:dirty-bitmap:b1".to_string())]);
    });
}
