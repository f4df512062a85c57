//! The server as a library: any block device, served in-process, used by qemu-io over loopback. What qemu-io
//! wrote must be in the device afterwards, and what the device holds must be what qemu-io reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;
use std::sync::Arc;

use qcow::block::{BlockDevice, MemoryDevice};
use qcow_nbd::{AllData, Bind, Server, ServerConfig};

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let found = Command::new("qemu-io").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "qemu-io not found: install qemu-utils (apt-get install -y qemu-utils)");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(uri).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !stdout.contains("verification failed"),
        "qemu-io {commands:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn any_block_device_is_served_to_qemu() {
    let mut initial = vec![0u8; 1 << 20];
    initial[..64 << 10].fill(0x3a);
    let device = Arc::new(AllData(MemoryDevice::from_bytes(initial)));
    let config = ServerConfig { export_name: "mem".into(), max_connections: 2, ..ServerConfig::default() };
    let server = Server::bind(Arc::clone(&device), &Bind::Tcp("127.0.0.1:0".parse().unwrap()), config).unwrap();
    let Bind::Tcp(addr) = server.local_addr().unwrap() else { panic!("bound to TCP") };
    let handle = server.handle();
    let running = std::thread::spawn(move || server.run());

    let uri = format!("nbd://{addr}/mem");
    qemu_io(&uri, &["read -P 0x3a 0 64k", "read -P 0 64k 64k", "write -P 0x71 512k 128k", "write -z 0 4k"]);
    handle.shutdown();
    running.join().unwrap().unwrap();

    let mut bytes = vec![0u8; 1 << 20];
    device.read_at(0, &mut bytes).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert!(bytes[4096..64 << 10].iter().all(|&b| b == 0x3a));
    assert!(bytes[512 << 10..640 << 10].iter().all(|&b| b == 0x71));
    assert!(bytes[640 << 10..].iter().all(|&b| b == 0));
}
