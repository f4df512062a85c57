//! `qcow-tool serve` with real NBD clients on loopback: qemu-img, qemu-io, libnbd's nbdinfo and nbdcopy, fio's
//! nbd engine, and a hand-written client that misbehaves on purpose. QEMU judges every result (`qemu-img
//! compare`, `qemu-img check`, `qemu-img map`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../../qcow-nbd/tests/client/mod.rs"]
mod client;
#[path = "../../qcow/tests/support/nbd.rs"]
mod nbd;
#[path = "../../qcow/tests/support/mod.rs"]
mod support;

mod binary;

use binary::{show, tool, Dir};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{assert_clean, output_within, qemu, qemu_create, qemu_io, qemu_to_raw, run_ok, with_deadline};

fn need(tool: &str, package: &str) -> Command {
    let found = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "{tool} not found: install {package} (apt-get install -y {package})");
    Command::new(tool)
}

/// Runs a client with a deadline and asserts it succeeded.
fn client_ok(cmd: &mut Command) -> Output {
    let out = output_within(cmd, 60);
    assert!(out.status.success(), "{cmd:?}: {}", show(&out));
    out
}

/// A running `qcow-tool serve`, stopped with SIGTERM when dropped.
struct Served {
    child: Option<Child>,
    addr: String,
    name: String,
}

impl Served {
    fn start(file: &Path, name: &str, extra: &[&str]) -> Served {
        let mut child = tool()
            .args(["serve", "--bind", "127.0.0.1:0", "--export-name", name])
            .args(extra)
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qcow-tool serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("first line {line:?}")).to_string();
        Served { child: Some(child), addr, name: name.to_string() }
    }

    fn uri(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.name)
    }

    /// SIGTERM, then the server must flush and exit 0 within the deadline.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        for _ in 0..600 {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill().ok();
        panic!("serve did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
    let out = qemu("qemu-img").args(["compare", "-f", fa, "-F", fb]).arg(a).arg(b).output().unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare failed: {}", show(&out)),
    }
}

/// Data ranges as `qemu-img map` reports them: (start, end) of every extent with data, merged.
fn qemu_data_ranges(image: &Path, format: &str) -> Vec<(u64, u64)> {
    let out = run_ok(qemu("qemu-img").args(["map", "--output=json", "-f", format]).arg(image));
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    merge(map.as_array().unwrap().iter().filter(|e| e["data"] == true).map(|e| {
        let start = e["start"].as_u64().unwrap();
        (start, start + e["length"].as_u64().unwrap())
    }))
}

fn merge(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

#[test]
fn qemu_img_reads_plain_compressed_and_overlay_images_through_the_server() {
    with_deadline(240, "read through the server", || {
        let dir = Dir::new();
        let plain = dir.path("plain.qcow2");
        qemu_create(&plain, "cluster_size=65536", "16M");
        qemu_io(&plain, &["write -P 0xa5 0 1M", "write -P 0x3c 3M 64k", "write -z 5M 1M", "write -P 0x11 15M 1M"]);
        let compressed = dir.path("compressed.qcow2");
        run_ok(qemu("qemu-img").args(["convert", "-c", "-f", "qcow2", "-O", "qcow2"]).arg(&plain).arg(&compressed));
        let overlay = dir.path("overlay.qcow2");
        run_ok(
            qemu("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "plain.qcow2"]).arg(&overlay),
        );
        qemu_io(&overlay, &["write -P 0x77 512k 1M", "write -z 15M 64k"]);

        for image in [&plain, &compressed, &overlay] {
            let served = Served::start(image, "disk", &["--read-only"]);
            let out = dir.path("out.raw");
            client_ok(qemu("qemu-img").args(["convert", "-f", "raw", &served.uri()]).arg(&out));
            assert_eq!(std::fs::read(&out).unwrap(), qemu_to_raw(image, dir.0.path()), "{}", image.display());

            let info = client_ok(qemu("qemu-img").args(["info", "--output=json", &served.uri()]));
            let info: Value = serde_json::from_slice(&info.stdout).unwrap();
            assert_eq!(info["virtual-size"], 16 << 20, "{info}");

            let pattern = if image == &overlay { "read -P 0x77 512k 1M" } else { "read -P 0xa5 0 1M" };
            let io = client_ok(qemu("qemu-io").args([
                "-r",
                "-f",
                "raw",
                "-c",
                pattern,
                "-c",
                "read -P 0 5M 1M",
                &served.uri(),
            ]));
            assert!(!String::from_utf8_lossy(&io.stdout).contains("Pattern verification failed"), "{}", show(&io));
            served.stop();
        }
    });
}

#[test]
fn writes_through_qemu_io_and_nbdcopy_land_in_the_image() {
    with_deadline(240, "write through the server", || {
        let dir = Dir::new();
        let source = dir.path("source.raw");
        run_ok(qemu("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&source).arg("16M"));
        let patterns = ["write -P 0x21 0 3M", "write -P 0x42 4M 64k", "write -P 0x63 8M 4M", "write -P 0x84 15M 512"];
        let mut cmd = qemu("qemu-io");
        cmd.args(["-f", "raw"]);
        for p in patterns {
            cmd.args(["-c", p]);
        }
        run_ok(cmd.arg(&source));

        let image = dir.path("image.qcow2");
        qemu_create(&image, "cluster_size=65536", "16M");
        // Several connections: nbdcopy uses multi-conn when the server offers it.
        let served = Served::start(&image, "disk", &["--shared", "4"]);
        client_ok(need("nbdcopy", "libnbd-bin").arg(&source).arg(served.uri()));
        // Then qemu-io on top: a FUA write, zeroes that may unmap (no NO_HOLE) and zeroes that must stay
        // allocated (NO_HOLE), and a discard; the same edits go into the source.
        let edits = ["write -f -P 0x99 1M 64k", "write -z -u 8M 1M", "write -z 10M 1M", "discard 2M 512k"];
        let mut through = qemu("qemu-io");
        through.args(["-f", "raw"]);
        let mut direct = qemu("qemu-io");
        direct.args(["-f", "raw"]);
        for e in edits {
            through.args(["-c", e]);
            // The source is a plain file: a discard there reads back as zeros too, written explicitly here.
            direct.args(["-c", if e.starts_with("discard") { "write -z 2M 512k" } else { e }]);
        }
        client_ok(through.arg(served.uri()));
        run_ok(direct.arg(&source));
        served.stop();

        assert_clean(&image);
        assert!(qemu_compare(&image, "qcow2", &source, "raw"), "the image differs from the source");
        let data = qemu_data_ranges(&image, "qcow2");
        let is_data = |at: u64| data.iter().any(|&(s, e)| s <= at && at < e);
        assert!(!is_data(8 << 20), "write -z -u left 8M allocated: {data:?}");
        assert!(is_data(10 << 20), "write -z without -u (NO_HOLE) did not keep 10M allocated: {data:?}");
    });
}

/// With --reclaim the background reclaimer compacts the file online once enough has been trimmed: data written
/// at the end moves down into the trimmed space and the file gets shorter while the export stays served.
#[test]
fn the_reclaimer_compacts_the_file_while_it_is_served() {
    with_deadline(240, "reclaim while served", || {
        let dir = Dir::new();
        let image = dir.path("reclaim.qcow2");
        qemu_create(&image, "cluster_size=65536", "16M");
        let served = Served::start(&image, "r", &["--reclaim", "--compact-after", "1M"]);
        client_ok(qemu("qemu-io").args(["-f", "raw", "-c", "write -P 0x5b 0 8M", "-c", "flush"]).arg(served.uri()));
        let written = std::fs::metadata(&image).unwrap().len();
        client_ok(qemu("qemu-io").args(["-f", "raw", "-c", "discard 0 7M"]).arg(served.uri()));
        let mut len = written;
        for _ in 0..600 {
            len = std::fs::metadata(&image).unwrap().len();
            if len < 3 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(len < 3 << 20, "the file stayed at {len} bytes after 7 of its 8 MiB were trimmed ({written} before)");
        let io = client_ok(
            qemu("qemu-io").args(["-f", "raw", "-c", "read -P 0 0 7M", "-c", "read -P 0x5b 7M 1M"]).arg(served.uri()),
        );
        assert!(!String::from_utf8_lossy(&io.stdout).contains("Pattern verification failed"), "{}", show(&io));
        served.stop();
        assert_clean(&image);
        let expected = dir.path("expected.raw");
        run_ok(qemu("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&expected).arg("16M"));
        run_ok(qemu("qemu-io").args(["-f", "raw", "-c", "write -P 0x5b 7M 1M"]).arg(&expected));
        assert!(qemu_compare(&image, "qcow2", &expected, "raw"), "the compacted image differs");
    });
}

#[test]
fn nbdinfo_map_agrees_with_qemu_img_map() {
    with_deadline(120, "nbdinfo --map", || {
        let dir = Dir::new();
        let image = dir.path("map.qcow2");
        qemu_create(&image, "cluster_size=65536", "32M");
        qemu_io(
            &image,
            &["write -P 1 0 128k", "write -P 2 1M 1M", "write -z 4M 2M", "write -P 3 20M 64k", "write -P 4 31M 1M"],
        );
        let served = Served::start(&image, "m", &["--read-only"]);
        let out = client_ok(need("nbdinfo", "libnbd-bin").args(["--map", "--json", &served.uri()]));
        served.stop();
        let map: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ours = merge(map.as_array().unwrap().iter().filter(|e| e["type"].as_u64().unwrap() & 1 == 0).map(|e| {
            let start = e["offset"].as_u64().unwrap();
            (start, start + e["length"].as_u64().unwrap())
        }));
        let zeros: Vec<u64> = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"].as_u64().unwrap() & 2 != 0)
            .map(|e| e["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(ours, qemu_data_ranges(&image, "qcow2"), "nbdinfo: {map}");
        assert!(!ours.is_empty() && !zeros.is_empty(), "{map}");
    });
}

#[test]
fn several_clients_at_once_and_fio_with_many_requests_in_flight() {
    with_deadline(240, "several clients", || {
        let dir = Dir::new();
        let image = dir.path("multi.qcow2");
        qemu_create(&image, "cluster_size=65536", "32M");
        let served = Served::start(&image, "disk", &["--shared", "6"]);
        // A client that has finished its handshake and sits idle must not hold the others up.
        let mut idle = Handshake::connect(&served.addr);
        idle.go(&served.name);

        let writers: Vec<Child> = (0..4u64)
            .map(|i| {
                let cmd = format!("write -P {} {}M 2M", 0x10 + i, 4 * i);
                qemu("qemu-io").args(["-f", "raw", "-c", &cmd, &served.uri()]).stdout(Stdio::null()).spawn().unwrap()
            })
            .collect();
        let fio = need("fio", "fio")
            .args(["--name=qd", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=64", "--size=8M"])
            .args(["--offset=16M", "--verify=crc32c", "--do_verify=1", "--randrepeat=1"])
            .arg(format!("--uri={}", served.uri()))
            // fio saves its verify state in the working directory: keep it in the test's directory.
            .current_dir(dir.0.path())
            .output()
            .unwrap();
        assert!(fio.status.success(), "fio: {}", show(&fio));
        // The verify pass reads back all 8 MiB (a mismatch would have failed fio).
        let text = String::from_utf8_lossy(&fio.stdout);
        assert!(text.contains("READ: bw=") && text.contains("io=8192KiB"), "fio did not verify: {}", show(&fio));
        for mut w in writers {
            assert!(w.wait().unwrap().success());
        }
        // The idle client is still served.
        let data = idle.read(4 << 20, 4096);
        assert!(data.iter().all(|&b| b == 0x11));
        for i in 0..4u64 {
            let cmd = format!("read -P {} {}M 2M", 0x10 + i, 4 * i);
            let io = client_ok(qemu("qemu-io").args(["-f", "raw", "-c", &cmd, &served.uri()]));
            assert!(!String::from_utf8_lossy(&io.stdout).contains("Pattern verification failed"), "{}", show(&io));
        }
        drop(idle);
        served.stop();
        assert_clean(&image);
    });
}

#[test]
fn a_unix_socket_and_the_metrics_endpoint() {
    with_deadline(120, "unix socket", || {
        let dir = Dir::new();
        let image = dir.path("u.qcow2");
        qemu_create(&image, "cluster_size=65536", "4M");
        qemu_io(&image, &["write -P 0x5e 0 64k"]);
        let socket = dir.path("nbd.sock");
        let metrics_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut child = tool()
            .args(["serve", "--export-name", "u", "--metrics", &format!("127.0.0.1:{metrics_port}"), "--socket"])
            .arg(&socket)
            .arg(&image)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let served = Served { child: Some(child), addr: String::new(), name: "u".into() };
        let uri = format!("nbd+unix:///u?socket={}", socket.display());
        let io = client_ok(qemu("qemu-io").args(["-f", "raw", "-c", "read -P 0x5e 0 64k", &uri]));
        assert!(!String::from_utf8_lossy(&io.stdout).contains("Pattern verification failed"), "{}", show(&io));

        let mut http = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        http.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(text.contains("read_bytes"), "{text}");
        served.stop();
        assert!(!socket.exists(), "the socket file is removed on exit");
    });
}

/// A hand-written client: the handshake and requests, byte by byte, so it can also send what real clients never
/// would.
struct Handshake {
    s: TcpStream,
}

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

impl Handshake {
    fn connect(addr: &str) -> Handshake {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(greet[8..16].try_into().unwrap()), IHAVEOPT);
        Handshake { s }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.send(&out);
    }

    /// One option reply: (type, data).
    fn reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(u64::from_be_bytes(head[..8].try_into().unwrap()), REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(head[8..12].try_into().unwrap()), option);
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
        self.s.read_exact(&mut data).unwrap();
        (kind, data)
    }

    /// Reads replies up to the ACK (or an error), returning their types.
    fn replies(&mut self, option: u32) -> Vec<u32> {
        let mut kinds = Vec::new();
        loop {
            let (kind, _) = self.reply(option);
            kinds.push(kind);
            if kind == 1 || kind & (1 << 31) != 0 {
                return kinds;
            }
        }
    }

    /// Fixed newstyle without zeroes, then `NBD_OPT_GO` with no information requests.
    fn go(&mut self, name: &str) {
        self.send(&3u32.to_be_bytes());
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &data);
        assert_eq!(*self.replies(7).last().unwrap(), 1, "GO acknowledged");
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        self.send(&out);
    }

    /// A simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(u32::from_be_bytes(head[..4].try_into().unwrap()), 0x6744_6698);
        (u32::from_be_bytes(head[4..8].try_into().unwrap()), u64::from_be_bytes(head[8..16].try_into().unwrap()))
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, 0, 42, offset, len);
        assert_eq!(self.simple_reply(), (0, 42));
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        data
    }

    /// Whether the server closed the connection (reads end-of-file or a reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn misbehaving_clients_are_answered_or_dropped_while_others_are_served() {
    with_deadline(120, "robustness", || {
        let dir = Dir::new();
        let image = dir.path("r.qcow2");
        qemu_create(&image, "cluster_size=65536", "8M");
        qemu_io(&image, &["write -P 0x6b 0 1M"]);
        let served = Served::start(&image, "r", &["--shared", "8"]);
        let mut good = Handshake::connect(&served.addr);
        good.go("r");

        // Unknown client flags: dropped.
        let mut c = Handshake::connect(&served.addr);
        c.send(&0x8000_0001u32.to_be_bytes());
        assert!(c.closed());
        // A wrong option magic: dropped.
        let mut c = Handshake::connect(&served.addr);
        c.send(&1u32.to_be_bytes());
        c.send(&[0x55; 16]);
        assert!(c.closed());
        // An option longer than any real one: dropped.
        let mut c = Handshake::connect(&served.addr);
        c.send(&1u32.to_be_bytes());
        let mut head = IHAVEOPT.to_be_bytes().to_vec();
        head.extend_from_slice(&99u32.to_be_bytes());
        head.extend_from_slice(&u32::MAX.to_be_bytes());
        c.send(&head);
        assert!(c.closed());
        // A truncated option, then the client vanishes.
        let mut c = Handshake::connect(&served.addr);
        c.send(&1u32.to_be_bytes());
        c.send(&IHAVEOPT.to_be_bytes()[..5]);
        drop(c);

        // Errors the specification answers, after which haggling goes on.
        let mut c = Handshake::connect(&served.addr);
        c.send(&1u32.to_be_bytes());
        c.option(99, b"whatever");
        assert_eq!(c.replies(99), vec![(1 << 31) + 1], "unknown option: NBD_REP_ERR_UNSUP");
        c.option(3, b"x");
        assert_eq!(c.replies(3), vec![(1 << 31) + 3], "LIST with data: NBD_REP_ERR_INVALID");
        c.option(3, &[]);
        assert_eq!(c.replies(3), vec![2, 1], "LIST: one NBD_REP_SERVER, then ACK");
        c.option(7, &[0, 0, 0, 9, b'x']);
        assert_eq!(c.replies(7), vec![(1 << 31) + 3], "GO with a short name: NBD_REP_ERR_INVALID");
        c.option(6, &[0, 0, 0, 4, b'n', b'o', b'p', b'e', 0, 0]);
        assert_eq!(c.replies(6), vec![(1 << 31) + 6], "INFO for an unknown export: NBD_REP_ERR_UNKNOWN");
        let mut meta = vec![0, 0, 0, 1, b'r', 0, 0, 0, 1, 0, 0, 0, 15];
        meta.extend_from_slice(b"base:allocation");
        c.option(10, &meta);
        assert_eq!(c.replies(10), vec![(1 << 31) + 3], "meta context before structured replies: INVALID");
        c.option(6, &[0, 0, 0, 1, b'r', 0, 0]);
        assert_eq!(c.replies(6), vec![3, 3, 1], "INFO: export and block size, then ACK");
        c.option(7, &[0, 0, 0, 1, b'r', 0, 0]);
        assert_eq!(c.replies(7), vec![3, 3, 1]);
        // Transmission, simple replies: out-of-range, misaligned and unknown requests get their errors.
        c.request(0, 0, 1, 8 << 20, 512);
        assert_eq!(c.simple_reply(), (22, 1), "read past the end: EINVAL");
        c.request(1, 0, 2, 8 << 20, 512);
        c.send(&[0u8; 512]);
        assert_eq!(c.simple_reply(), (28, 2), "write past the end: ENOSPC");
        c.request(0, 0, 3, 100, 512);
        assert_eq!(c.simple_reply(), (22, 3), "misaligned read: EINVAL");
        c.request(42, 0, 4, 0, 0);
        assert_eq!(c.simple_reply(), (22, 4), "unknown command: EINVAL");
        c.request(7, 0, 5, 0, 512);
        assert_eq!(c.simple_reply(), (22, 5), "block status without a context: EINVAL");
        assert!(c.read(0, 4096).iter().all(|&b| b == 0x6b));
        // An oversized write: dropped.
        c.request(1, 0, 6, 0, 64 << 20);
        assert!(c.closed());
        // A truncated request header, then gone.
        let mut c = Handshake::connect(&served.addr);
        c.go("r");
        c.send(&0x2560_9513u32.to_be_bytes());
        drop(c);
        // A bad request magic: dropped.
        let mut c = Handshake::connect(&served.addr);
        c.go("r");
        c.send(&[0u8; 28]);
        assert!(c.closed());

        // The well-behaved client was served throughout, and new ones still are.
        assert!(good.read(512 << 10, 8192).iter().all(|&b| b == 0x6b));
        let io = client_ok(qemu("qemu-io").args(["-f", "raw", "-c", "read -P 0x6b 0 1M", &served.uri()]));
        assert!(!String::from_utf8_lossy(&io.stdout).contains("Pattern verification failed"), "{}", show(&io));
        drop(good);
        served.stop();
        assert_clean(&image);
    });
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    with_deadline(60, "read-only", || {
        let dir = Dir::new();
        let image = dir.path("ro.qcow2");
        qemu_create(&image, "cluster_size=65536", "1M");
        let served = Served::start(&image, "ro", &["--read-only"]);
        let mut c = Handshake::connect(&served.addr);
        c.go("ro");
        c.request(1, 0, 9, 0, 512);
        c.send(&[1u8; 512]);
        assert_eq!(c.simple_reply(), (1, 9), "write to a read-only export: EPERM");
        c.request(6, 0, 10, 0, 512);
        assert_eq!(c.simple_reply(), (1, 10), "write zeroes to a read-only export: EPERM");
        drop(c);
        let out = output_within(qemu("qemu-io").args(["-f", "raw", "-c", "write 0 512", &served.uri()]), 60);
        assert!(!out.status.success() || String::from_utf8_lossy(&out.stderr).contains("ermission"), "{}", show(&out));
        served.stop();
        let (a, b) = (dir.path("ro.qcow2"), dir.path("zero.raw"));
        std::fs::write(&b, vec![0u8; 1 << 20]).unwrap();
        assert!(qemu_compare(&a, "qcow2", &b, "raw"), "a read-only export changed the image");
    });
}

#[test]
fn a_client_that_vanishes_mid_request_loses_nothing_it_flushed() {
    with_deadline(60, "vanishing client", || {
        let dir = Dir::new();
        let image = dir.path("v.qcow2");
        qemu_create(&image, "cluster_size=65536", "4M");
        let mut served = Served::start(&image, "v", &[]);
        let mut c = Handshake::connect(&served.addr);
        c.go("v");
        c.request(1, 0, 1, 64 << 10, 128 << 10);
        c.send(&[0xc3u8; 128 << 10]);
        assert_eq!(c.simple_reply(), (0, 1), "write");
        c.request(3, 0, 2, 0, 0);
        assert_eq!(c.simple_reply(), (0, 2), "flush");
        // Half a write payload, then the client is gone.
        c.request(1, 0, 3, 1 << 20, 64 << 10);
        c.send(&[0x11u8; 1000]);
        drop(c);
        // The server dies without its clean stop: what was flushed must be in the file regardless.
        let mut child = served.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        drop(served);
        let io = client_ok(
            qemu("qemu-io")
                .args(["-f", "qcow2", "-r", "-c", "read -P 0xc3 64k 128k", "-c", "read -P 0 1M 64k"])
                .arg(&image),
        );
        assert!(!String::from_utf8_lossy(&io.stdout).contains("Pattern verification failed"), "{}", show(&io));
        let check = output_within(qemu("qemu-img").args(["check", "-f", "qcow2"]).arg(&image), 60);
        assert_eq!(check.status.code(), Some(0), "qemu-img check after the server was killed: {}", show(&check));
    });
}

#[test]
fn a_raw_file_is_served_and_written_as_is() {
    with_deadline(60, "raw file", || {
        let dir = Dir::new();
        let raw = dir.path("disk.raw");
        run_ok(qemu("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&raw).arg("4M"));
        run_ok(qemu("qemu-io").args(["-f", "raw", "-c", "write -P 0x4d 1M 1M"]).arg(&raw));
        let expected = dir.path("expected.raw");
        std::fs::copy(&raw, &expected).unwrap();
        run_ok(
            qemu("qemu-io").args(["-f", "raw", "-c", "write -P 0x2e 3M 4k", "-c", "write -z 1M 64k"]).arg(&expected),
        );

        let served = Served::start(&raw, "raw", &["-f", "raw"]);
        let out = dir.path("out.raw");
        client_ok(qemu("qemu-img").args(["convert", "-f", "raw", &served.uri()]).arg(&out));
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&raw).unwrap());
        client_ok(qemu("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x2e 3M 4k",
            "-c",
            "write -z 1M 64k",
            &served.uri(),
        ]));
        served.stop();
        assert!(qemu_compare(&raw, "raw", &expected, "raw"), "the raw file differs from qemu-io's edit of a copy");
    });
}

/// A chain as backup tools meet it: a raw base of odd length, a qcow2 over it (data, zero clusters, a discard,
/// a compressed cluster) twice its size, and an overlay larger still (data, zero clusters, a discard, holes).
/// Returns the overlay.
fn overlay_chain(dir: &Dir) -> std::path::PathBuf {
    std::fs::write(dir.path("base.raw"), vec![0x11u8; (3 << 20) + 1000]).unwrap();
    let create = |name: &str, backing: &str, format: &str, size: &str| {
        run_ok(
            dir.here(
                qemu("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
                    .args(["-b", backing, "-F", format, name, size]),
            ),
        );
    };
    create("mid.qcow2", "base.raw", "raw", "6M");
    qemu_io(&dir.path("mid.qcow2"), &["write -P 2 1M 512k", "write -z 2M 256k", "discard 0 64k", "write -c 2560k 64k"]);
    create("top.qcow2", "mid.qcow2", "qcow2", "8M");
    qemu_io(&dir.path("top.qcow2"), &["write -P 3 4M 128k", "write -z 5M 64k", "discard 1M 64k", "write -P 5 7M 512"]);
    dir.path("top.qcow2")
}

#[test]
fn nbdinfo_allocation_depth_maps_equal_qemu_nbds_for_a_chain_a_single_image_and_a_raw_file() {
    with_deadline(240, "allocation depth through serve", || {
        let dir = Dir::new();
        let top = overlay_chain(&dir);
        let single = dir.path("single.qcow2");
        qemu_create(&single, "cluster_size=65536", "4M");
        qemu_io(&single, &["write -P 1 0 256k", "write -z 1M 64k", "write -c -P 2 2M 64k", "discard 128k 64k"]);
        let raw = dir.path("disk.raw");
        run_ok(qemu("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&raw).arg("2M"));
        run_ok(qemu("qemu-io").args(["-f", "raw", "-c", "write -P 7 64k 64k"]).arg(&raw));

        for (image, format) in [(&top, "qcow2"), (&single, "qcow2"), (&raw, "raw")] {
            let served = Served::start(image, "d", &["--read-only", "-f", format]);
            let theirs = nbd::QemuNbd::start(image, format, &["-A"]);
            let what = image.display().to_string();
            let mut maps = vec![
                vec!["--map=qemu:allocation-depth"],
                vec!["--map=qemu:allocation-depth", "--totals"],
                vec!["--map=qemu:allocation-depth", "--json"],
            ];
            if image == &single {
                // base:allocation equals qemu-nbd's where neither a backing file nor host holes are involved.
                maps.push(vec!["--map"]);
                maps.push(vec!["--map", "--totals"]);
            }
            for args in maps {
                let ours = nbd::nbdinfo(&args, &served.uri());
                assert_eq!(ours, nbd::nbdinfo(&args, &theirs.uri()), "nbdinfo {args:?} of {what}");
                assert!(!ours.is_empty());
            }
            // LIST with no query lists what is offered, as qemu-nbd -A lists it.
            let contexts = nbd::nbdinfo_contexts(&served.uri());
            assert_eq!(contexts, ["base:allocation", "qemu:allocation-depth"], "{what}");
            assert_eq!(contexts, nbd::nbdinfo_contexts(&theirs.uri()), "{what}");
            served.stop();
        }
        // The chain's map holds every depth from 1 to 3 (past the raw base's end: 3, past mid's end: 2).
        let served = Served::start(&top, "d", &["--read-only"]);
        let depths: std::collections::BTreeSet<u64> =
            nbd::nbdinfo_map("qemu:allocation-depth", &served.uri()).iter().map(|e| e.2).collect();
        assert_eq!(depths.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
        served.stop();
    });
}

/// One connection's block status replies for `requests` after selecting `contexts`.
fn statuses(mut c: client::Client, contexts: &[&str], requests: &[(u64, u32, u16)]) -> Vec<Vec<client::Chunk>> {
    c.structured();
    let ids = c.meta(client::OPT_SET_META_CONTEXT, "d", contexts).unwrap();
    assert_eq!(ids, [(0, contexts[0].to_string()), (1, contexts[1].to_string())]);
    c.go("d");
    requests.iter().zip(1..).map(|(&(offset, len, flags), cookie)| c.block_status(cookie, offset, len, flags)).collect()
}

#[test]
fn base_allocation_and_allocation_depth_in_one_block_status_request_with_and_without_req_one() {
    with_deadline(240, "two contexts at once", || {
        let dir = Dir::new();
        let top = overlay_chain(&dir);
        let served = Served::start(&top, "d", &["--read-only"]);
        let theirs = nbd::QemuNbd::start(&top, "qcow2", &["-A", "-x", "d"]);
        let contexts = ["base:allocation", "qemu:allocation-depth"];
        let mut requests = Vec::new();
        for (offset, len) in [(0, 8 << 20), ((1 << 20) - 4096, 1 << 20), (3 << 20, 2 << 20), ((6 << 20) + 512, 4096)] {
            requests.push((offset, len, 0));
            requests.push((offset, len, client::CMD_FLAG_REQ_ONE));
        }
        let ours = statuses(client::Client::connect_tcp(&served.addr), &contexts, &requests);
        let qemus = statuses(client::Client::connect(&theirs.socket()), &contexts, &requests);
        served.stop();
        for ((reply, qemu_reply), &(offset, len, flags)) in ours.iter().zip(&qemus).zip(&requests) {
            let what = format!("{offset:#x}+{len:#x} flags {flags}: ours {reply:?}, qemu-nbd's {qemu_reply:?}");
            assert_eq!(reply.len(), 2, "{what}");
            assert_eq!(reply.iter().map(|c| c.flags).collect::<Vec<_>>(), [0, client::REPLY_FLAG_DONE], "{what}");
            let (base_id, base) = reply[0].block_status();
            assert_eq!(base_id, 0, "{what}");
            let total: u64 = base.iter().map(|d| u64::from(d.0)).sum();
            assert!(!base.is_empty() && total <= u64::from(len), "{what}");
            // The depth chunk is qemu-nbd's exactly; base:allocation differs over a backing file by design (data
            // where qemu-nbd looks down the chain), so only its shape is checked.
            assert_eq!(reply[1], qemu_reply[1], "{what}");
            if flags != 0 {
                assert_eq!(base.len(), 1, "{what}");
                assert_eq!(reply[1].block_status().1.len(), 1, "{what}");
            }
        }
    });
}

#[test]
fn serve_refuses_a_bitmap_the_image_does_not_offer_in_qemu_nbds_words() {
    with_deadline(60, "unknown bitmap", || {
        let dir = Dir::new();
        let image = dir.path("b.qcow2");
        qemu_create(&image, "cluster_size=65536", "4M");
        for names in [&["nope"][..], &["nope1", "nope2"]] {
            let mut ours = tool();
            ours.args(["serve", "--read-only", "--bind", "127.0.0.1:0"]);
            let mut theirs = qemu("qemu-nbd");
            theirs.args(["-r", "-f", "qcow2"]);
            for name in names {
                ours.args(["-B", name]);
                theirs.args(["--bitmap", name]);
            }
            let ours = output_within(ours.arg(&image), 30);
            let theirs = output_within(theirs.arg(&image), 30);
            assert_eq!(ours.status.code(), Some(1), "{}", show(&ours));
            assert_eq!(theirs.status.code(), Some(1), "{}", show(&theirs));
            assert!(ours.stdout.is_empty(), "nothing listened: {}", show(&ours));
            let words = |out: &Output, program: &str| {
                String::from_utf8_lossy(&out.stderr).trim().strip_prefix(program).map(str::to_string)
            };
            let expected = format!("Bitmap '{}' is not found", names.last().unwrap());
            assert_eq!(words(&ours, "qcow-tool: "), Some(expected.clone()), "{}", show(&ours));
            assert_eq!(words(&theirs, "qemu-nbd: "), Some(expected), "{}", show(&theirs));
        }
    });
}

/// What a backup tool reads: `qemu:dirty-bitmap:NAME` through our server, for a bitmap QEMU made and one we made,
/// both dirtied by QEMU's writes and by ours (some through the server itself), equals what qemu-nbd `-B` gives
/// for the same file.
#[test]
fn dirty_bitmaps_read_through_serve_equal_qemu_nbds() {
    with_deadline(240, "dirty bitmaps through serve", || {
        let dir = Dir::new();
        let image = dir.path("b.qcow2");
        qemu_create(&image, "cluster_size=65536", "8M");
        run_ok(qemu("qemu-img").args(["bitmap", "--add"]).arg(&image).arg("qemu-made"));
        qemu_io(&image, &["write -P 1 0 64k", "write -P 2 1M 512"]);
        run_ok(tool().args(["write"]).arg(&image).args(["--sector", "6000", "--text", "ours"]));
        run_ok(tool().args(["bitmap", "--add", "-g", "128k"]).arg(&image).arg("ours"));
        run_ok(tool().args(["write"]).arg(&image).args(["--sector", "12000", "--text", "again"]));
        // Writes and a zero write through the server itself dirty both bitmaps too.
        let served = Served::start(&image, "d", &[]);
        run_ok(
            qemu("qemu-io").args(["-f", "raw", "-c", "write -P 3 5M 4k", "-c", "write -z 7M 64k"]).arg(served.uri()),
        );
        served.stop();
        for bitmap in ["qemu-made", "ours"] {
            let context = format!("qemu:dirty-bitmap:{bitmap}");
            let served = Served::start(&image, "d", &["--read-only", "-B", bitmap]);
            let theirs = nbd::QemuNbd::start(&image, "qcow2", &["-r", "-B", bitmap]);
            for args in [vec![format!("--map={context}")], vec![format!("--map={context}"), "--totals".into()]] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let ours = nbd::nbdinfo(&args, &served.uri());
                assert_eq!(ours, nbd::nbdinfo(&args, &theirs.uri()), "nbdinfo {args:?}");
            }
            let dirty: u64 = nbd::nbdinfo_map(&context, &served.uri()).iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
            assert!(dirty > 0, "{bitmap}: something is dirty");
            served.stop();
        }
    });
}
