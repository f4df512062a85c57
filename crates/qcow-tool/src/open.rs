//! Opening the files the user names: probing whether a file is qcow2, and opening it as a file device or a
//! qcow2 image (with its backing chain) with errors that name the file.
//!
//! Backing files are followed under the library's default [`BackingPolicy`]: relative names only (resolved
//! against the overlay's directory), formats taken from the image and never probed. `--allow-absolute-backing`
//! also lets absolute names through; it is set once, before any command runs.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use qcow::block::{FileDevice, FileOptions, MemoryDevice};
use qcow::format::FormatError;
use qcow::{Backing, BackingPolicy, BackingResolver, Config, Image};

use crate::error::{Context, Error, Result};

/// Whether backing files named by absolute paths are followed (`--allow-absolute-backing`).
static ALLOW_ABSOLUTE: AtomicBool = AtomicBool::new(false);

/// Lets backing chains follow absolute names too.
pub fn allow_absolute_backing(allow: bool) {
    ALLOW_ABSOLUTE.store(allow, Ordering::Relaxed);
}

/// The policy every image is opened under.
pub fn policy() -> BackingPolicy {
    BackingPolicy { allow_absolute: ALLOW_ABSOLUTE.load(Ordering::Relaxed), ..BackingPolicy::default() }
}

/// An image format, as `-f` and `-O` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A plain disk image: the guest's bytes, as they are.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Whether the file starts with the qcow2 magic. A file too short to hold it is not qcow2.
pub fn probe(path: &Path) -> Result<Format> {
    let mut file = std::fs::File::open(path).context(|| format!("could not open '{}'", path.display()))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        let Some(rest) = magic.get_mut(got..) else { break };
        match file.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context(|| format!("could not read '{}'", path.display())),
        }
    }
    Ok(if got == magic.len() && u32::from_be_bytes(magic) == qcow::format::MAGIC { Format::Qcow2 } else { Format::Raw })
}

/// Opens a file as a device.
pub fn file(path: &Path, read_only: bool) -> Result<FileDevice> {
    FileDevice::open(path, &FileOptions { read_only, direct: false })
        .context(|| format!("could not open '{}'", path.display()))
}

fn config(read_only: bool) -> Config {
    if read_only {
        Config::read_only()
    } else {
        Config::default()
    }
}

/// Opens a qcow2 image and its backing chain.
pub fn image(path: &Path, read_only: bool) -> Result<Image<FileDevice>> {
    Image::open_path_with(path, config(read_only), policy()).map_err(|e| open_error(path, e))
}

/// Opens a qcow2 image read-write with `config` (for commands that need discard or other runtime settings).
pub fn image_with(path: &Path, config: Config) -> Result<Image<FileDevice>> {
    Image::open_path_with(path, config, policy()).map_err(|e| open_error(path, e))
}

/// A failure while working on an open image, naming the file.
pub fn io_error(path: &Path, e: qcow::Error) -> Error {
    if matches!(e, qcow::Error::Untrusted { .. }) {
        // The library names what is wrong; the way out is a command of ours.
        let shown = path.display();
        return Error::wrap(format!("'{shown}' needs a repair first (qcow-tool check -r all '{shown}')"), e);
    }
    Error::wrap(format!("'{}'", path.display()), e)
}

/// Stands in for a backing file that is not opened: for commands that only look at the image's own metadata,
/// as `qemu-img info` does (it opens images without their backing files).
struct NotOpened;

impl BackingResolver for NotOpened {
    fn open_backing(&self, _name: &str, _format: Option<&str>) -> qcow::Result<Backing> {
        Ok(Backing::new(Box::new(MemoryDevice::new(0)), 0))
    }

    fn open_data_file(&self, _name: &str, _read_only: bool) -> qcow::Result<Box<dyn qcow::block::BlockDevice>> {
        Ok(Box::new(MemoryDevice::new(0)))
    }
}

/// Opens a qcow2 image read-only for its metadata only: the backing file and the external data file are named
/// but never opened, so guest data must not be read through this image.
pub fn image_metadata(path: &Path) -> Result<Image<FileDevice>> {
    let dev = file(path, true)?;
    Image::open_with(dev, Config::read_only(), &NotOpened).map_err(|e| open_error(path, e))
}

/// Opens no backing file, yet opens the external data file for real: for a read-write open that rewrites the
/// header only.
struct BackingNotOpened(qcow::FileResolver);

impl BackingResolver for BackingNotOpened {
    fn open_backing(&self, _name: &str, _format: Option<&str>) -> qcow::Result<Backing> {
        Ok(Backing::new(Box::new(MemoryDevice::new(0)), 0))
    }

    fn open_data_file(&self, name: &str, read_only: bool) -> qcow::Result<Box<dyn qcow::block::BlockDevice>> {
        self.0.open_data_file(name, read_only)
    }
}

/// Opens a qcow2 image read-write without its backing file, which need not exist (`rebase -u` repairs a name
/// that no longer opens): guest data must not be read through this image, only its header rewritten.
pub fn image_without_backing(path: &Path) -> Result<Image<FileDevice>> {
    let dev = file(path, false)?;
    let resolver = BackingNotOpened(qcow::FileResolver::new(path, policy()));
    Image::open_with(dev, Config::default(), &resolver).map_err(|e| open_error(path, e))
}

/// The name QEMU gives an encryption method.
fn crypt_method_name(method: u32) -> String {
    match method {
        1 => "AES".into(),
        2 => "LUKS".into(),
        other => format!("method {other}"),
    }
}

/// What the user can do about an error, where the library's words do not say it: empty for most errors.
pub fn hint(e: &qcow::Error) -> String {
    match e {
        qcow::Error::Format(FormatError::EncryptionUnsupported { method }) => {
            format!(": it is encrypted with {}, and encrypted images are not supported", crypt_method_name(*method))
        }
        qcow::Error::Unsupported { feature } if feature.contains("absolute path") => {
            " (pass --allow-absolute-backing to follow absolute backing file names)".into()
        }
        _ => String::new(),
    }
}

/// An open failure, naming the file.
pub fn open_error(path: &Path, e: qcow::Error) -> Error {
    Error::wrap(format!("could not open '{}' as qcow2{}", path.display(), hint(&e)), e)
}

/// Parses a size as qemu-img does, or says what a size looks like.
pub fn size(text: &str) -> Result<u64> {
    qcow::parse_size(text).ok_or_else(|| {
        crate::error::Error::msg(format!(
            "invalid size '{text}': expected a number of bytes, optionally with a K, M, G, T, P or E suffix"
        ))
    })
}

/// Refuses to overwrite the source: creating the destination truncates it.
pub fn refuse_same_file(src: &Path, dst: &Path) -> Result<()> {
    let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) else {
        return Ok(());
    };
    if a.dev() == b.dev() && a.ino() == b.ino() {
        return Err(Error::msg(format!(
            "'{}' and '{}' are the same file: the source would be overwritten",
            src.display(),
            dst.display()
        )));
    }
    Ok(())
}
