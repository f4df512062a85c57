//! The README's first command: create an image, write, read back, print its info, and let QEMU judge it.
//!
//! Runs on built-in defaults with nothing prepared: `cargo run --release --example demo [DIR]`.

use std::process::Command;

use qcow::block::{FileDevice, FileOptions};
use qcow::{Config, CreateOptions, Image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("qcow-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("demo.qcow2");
    println!("creating {} (1 GiB, qcow2 v3, 64 KiB clusters)", path.display());
    let image = Image::create(
        FileDevice::create(&path, &FileOptions::default())?,
        &CreateOptions::new(1 << 30),
        Config::default(),
    )?;

    let pattern: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    for (i, offset) in [0u64, 64 << 10, 300 << 20, (1 << 30) - (256 << 10)].into_iter().enumerate() {
        image.write_at(offset, &pattern)?;
        let mut back = vec![0u8; pattern.len()];
        image.read_at(offset, &mut back)?;
        assert_eq!(back, pattern, "read-back mismatch at {offset:#x}");
        println!("write {}: 256 KiB at {offset:#x} read back identical", i + 1);
    }
    image.flush()?;
    let info = image.info();
    println!(
        "info: virtual size {} bytes, cluster size {}, compat {}, refcount bits {}, file length {}",
        info.virtual_size, info.cluster_size, info.compat, info.refcount_bits, info.file_length
    );
    let report = image.check()?;
    println!(
        "our check (exit {}): {} corruptions, {} leaks, {}/{} clusters allocated, image end offset {}",
        report.exit_code(),
        report.corruptions,
        report.leaks,
        report.allocated_clusters,
        report.total_clusters,
        report.image_end_offset
    );
    image.close()?;

    match Command::new("qemu-img").args(["check", "--output=json"]).arg(&path).output() {
        Ok(out) => {
            println!("qemu-img check (exit {}):", out.status.code().unwrap_or(-1));
            print!("{}", String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                return Err("qemu-img check found problems".into());
            }
        }
        Err(_) => println!("qemu-img not found: install qemu-utils to have QEMU check the image"),
    }
    Ok(())
}
