//! Opening the files the user names: probing whether a file is qcow2, and opening it as a file device or a
//! qcow2 image (with its backing chain) with errors that name the file.
//!
//! Backing files are followed under the library's default [`BackingPolicy`]: relative names only (resolved
//! against the overlay's directory), formats taken from the image and never probed. `--allow-absolute-backing`
//! also lets absolute names through; it is set once, before any command runs.
//!
//! Files are locked as QEMU locks them, so that a running QEMU and this tool refuse each other's writes.
//! `-U`/`--force-share` (also set once) opens what is only read without asking others to stop writing, as
//! qemu-img's `-U` does, and is refused where the command would write the image.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use qcow::block::{FileDevice, FileOptions, Locking, MemoryDevice};
use qcow::format::FormatError;
use qcow::{Backing, BackingPolicy, BackingResolver, Config, Image};

use crate::error::{Context, Error, Result};

/// Whether backing files named by absolute paths are followed (`--allow-absolute-backing`).
static ALLOW_ABSOLUTE: AtomicBool = AtomicBool::new(false);

/// Lets backing chains follow absolute names too.
pub fn allow_absolute_backing(allow: bool) {
    ALLOW_ABSOLUTE.store(allow, Ordering::Relaxed);
}

/// Whether what is only read is opened sharing everything (`-U`, `--force-share`).
static FORCE_SHARE: AtomicBool = AtomicBool::new(false);

/// Opens what is only read without QEMU's lock against writers.
pub fn force_share(on: bool) {
    FORCE_SHARE.store(on, Ordering::Relaxed);
}

/// Whether `-U` was given.
pub fn forced_share() -> bool {
    FORCE_SHARE.load(Ordering::Relaxed)
}

/// The locks a file opened read-only (or not) takes.
fn locking(read_only: bool) -> Locking {
    if read_only && forced_share() {
        Locking::ForceShare
    } else {
        Locking::Qemu
    }
}

/// The policy every image is opened under; backing files are read-only, so `-U` applies to them.
pub fn policy() -> BackingPolicy {
    BackingPolicy {
        allow_absolute: ALLOW_ABSOLUTE.load(Ordering::Relaxed),
        locking: locking(true),
        ..BackingPolicy::default()
    }
}

/// The policy for an image opened with `read_only` by path: like [`policy`], with the image's own lock.
fn policy_for(read_only: bool) -> BackingPolicy {
    BackingPolicy { locking: locking(read_only), ..policy() }
}

/// qemu-img's refusal of `-U` for an image the command would write.
pub fn refuse_force_share(path: &Path, read_only: bool) -> Result<()> {
    if read_only || !forced_share() {
        return Ok(());
    }
    Err(Error::msg(format!(
        "Could not open '{}': force-share=on can only be used with read-only images",
        path.display()
    )))
}

/// qemu-img's words for a file another process holds, when `e` says so: the locked file may be a backing file.
pub fn locked(e: &qcow::Error) -> Option<Error> {
    let found = match e {
        qcow::Error::Backing(inner) => inner.as_ref(),
        e => e,
    };
    let qcow::Error::Locked { path, permission, shared } = found else { return None };
    let shown = path.display();
    let shared = if *shared { "shared " } else { "" };
    Some(Error::msg(format!(
        "Could not open '{shown}': Failed to get {shared}\"{permission}\" lock. Is another process using the image [{shown}]?"
    )))
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
    refuse_force_share(path, read_only)?;
    open_file(path, read_only)
}

/// Opens a file that a command writes into besides what it reads (convert's existing target): `-U` is about the
/// sources, so the target takes its locks whatever `-U` says.
pub fn target_file(path: &Path) -> Result<FileDevice> {
    open_file(path, false)
}

fn open_file(path: &Path, read_only: bool) -> Result<FileDevice> {
    open_locked(path, read_only, locking(read_only))
}

fn open_locked(path: &Path, read_only: bool, locking: Locking) -> Result<FileDevice> {
    FileDevice::open(path, &FileOptions { read_only, locking, ..FileOptions::default() })
        .map_err(|e| locked(&e).unwrap_or_else(|| Error::wrap(format!("could not open '{}'", path.display()), e)))
}

/// Which locks a command's reads of a backing chain take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainReads {
    /// As every other read-only open: QEMU's lock unless `-U`.
    Locked,
    /// Sharing everything: for a command that itself holds a layer of the chain read-write with QEMU's lock
    /// (commit's base), which keeps other writers out, and whose own read-only opens would otherwise refuse it.
    Shared,
}

impl ChainReads {
    fn locking(self) -> Locking {
        match self {
            ChainReads::Locked => locking(true),
            ChainReads::Shared => Locking::ForceShare,
        }
    }
}

/// Opens a file read-only, for a chain's reads.
pub fn chain_file(path: &Path, reads: ChainReads) -> Result<FileDevice> {
    open_locked(path, true, reads.locking())
}

/// Opens a qcow2 image whose backing chain is read with `reads`' locks; the image itself takes its own.
pub fn image_over(path: &Path, read_only: bool, reads: ChainReads) -> Result<Image<FileDevice>> {
    refuse_force_share(path, read_only)?;
    let dev = open_file(path, read_only)?;
    let policy = BackingPolicy { locking: reads.locking(), ..policy() };
    Image::open_with(dev, config(read_only), &qcow::FileResolver::new(path, policy)).map_err(|e| open_error(path, e))
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
    refuse_force_share(path, read_only)?;
    Image::open_path_with(path, config(read_only), policy_for(read_only)).map_err(|e| open_error(path, e))
}

/// Opens a qcow2 image read-write with `config` (for commands that need discard or other runtime settings).
pub fn image_with(path: &Path, config: Config) -> Result<Image<FileDevice>> {
    refuse_force_share(path, config.read_only)?;
    let policy = policy_for(config.read_only);
    Image::open_path_with(path, config, policy).map_err(|e| open_error(path, e))
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
    image_metadata_with(path, ChainReads::Locked)
}

/// As [`image_metadata`], with the locks of `reads`.
pub fn image_metadata_with(path: &Path, reads: ChainReads) -> Result<Image<FileDevice>> {
    let dev = chain_file(path, reads)?;
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
    if let Some(locked) = locked(&e) {
        return locked;
    }
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
