//! Backing files: where unallocated clusters of an overlay read from, and the policy that decides which files an
//! image may make us open.
//!
//! A backing file name comes from the image, so it is untrusted input. By default a name is followed only when
//! it is relative (resolved against the overlay's directory), the format is taken from the image's
//! backing-format extension and never probed, and a chain may be at most [`BackingPolicy::max_depth`] deep and
//! may not visit a file twice.
//!
//! The chain also answers which layer allocates a guest range ([`Image::allocation_depth`], QEMU's
//! `qemu:allocation-depth`): a qcow2 backing image is kept as a [`LayeredDevice`] so it can say so for its own
//! chain, while any other backing device (a raw file) counts as allocated everywhere, as QEMU counts it.

use std::io::IoSliceMut;
use std::path::{Path, PathBuf};

use super::{Config, ExtentKind, Image};
use crate::block::{BlockDevice, FileDevice, FileOptions, Locking, Padded};
use crate::error::{Error, Result};

/// What a backing file name in an image may make us open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingPolicy {
    /// Open backing files at all; when false, an image with a backing file is refused.
    pub follow: bool,
    /// Follow absolute paths (off by default: an image should not reach arbitrary host files).
    pub allow_absolute: bool,
    /// The format to assume when the image does not record one (none by default: formats are never probed).
    pub default_format: Option<String>,
    /// Longest chain followed, counting the overlay's backing file as 1.
    pub max_depth: u32,
    /// The locks taken on every file opened under this policy: the image itself when opened by path, its backing
    /// files (always read-only) and its external data file. QEMU's locks by default.
    pub locking: Locking,
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy {
            follow: true,
            allow_absolute: false,
            default_format: None,
            max_depth: 64,
            locking: Locking::Qemu,
        }
    }
}

/// One run of an allocation-depth answer: `len` bytes allocated at `depth` of a backing chain.
///
/// Depth 0: allocated nowhere in the chain (reads as zeros); 1: in the image asked; 2: in its backing file; and
/// so on down the chain, as QEMU's `qemu:allocation-depth` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthRun {
    /// Bytes in the run.
    pub len: u64,
    /// The layer that allocates them, 1 for the image itself, 0 for none.
    pub depth: u32,
}

/// A backing device that knows its own backing chain: it can say which of its layers allocates each range. A
/// qcow2 [`Image`] is one.
pub trait LayeredDevice: BlockDevice {
    /// Depth runs covering `offset..offset + len` (clipped to the device's size), in order and without gaps,
    /// counted from this device (1 = allocated in it, 0 = nowhere in its chain).
    ///
    /// # Errors
    /// Whatever reading the device's metadata fails with.
    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthRun>>;
}

impl<D: BlockDevice> LayeredDevice for Image<D> {
    fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthRun>> {
        Image::allocation_depth(self, offset, len)
    }
}

/// What a backing file is, as far as reading it and asking its allocation go.
enum Layer {
    /// A device that cannot say what it allocates (a raw file): allocated everywhere.
    Flat(Box<dyn BlockDevice>),
    /// An image that answers for its own chain.
    Layered(Box<dyn LayeredDevice>),
}

/// The backing image of an open image: any readable device, and the guest size it has.
pub struct Backing {
    layer: Layer,
    size: u64,
}

impl Backing {
    /// A backing device whose guest-visible size is `size` bytes. It cannot say what it allocates, so every byte
    /// of it counts as allocated there, as QEMU counts a raw backing file.
    pub fn new(device: Box<dyn BlockDevice>, size: u64) -> Self {
        Backing { layer: Layer::Flat(device), size }
    }

    /// A backing image whose guest-visible size is `size` bytes and that answers the allocation depth of its own
    /// chain (a qcow2 image with backing files of its own).
    pub fn layered(device: Box<dyn LayeredDevice>, size: u64) -> Self {
        Backing { layer: Layer::Layered(device), size }
    }

    /// Fills `buf` with the backing contents at guest offset `offset`; bytes past the backing's end are zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // The backing's last sector may be partial: what lies past its guest size is zeros, whatever the device
        // holds there.
        let read = match &self.layer {
            Layer::Flat(device) => crate::block::read_padded(device.as_ref(), self.size, offset, buf),
            Layer::Layered(device) => crate::block::read_padded(device.as_ref(), self.size, offset, buf),
        };
        // Its errors are its own: corruption met there must not mark the overlay corrupt.
        read.map_err(|e| Error::Backing(Box::new(e)))
    }

    /// Fills `pieces`, in order, from guest offset `offset`, as [`read`](Self::read) fills one buffer: with one
    /// vectored read of the backing device when the range lies inside it in whole sectors.
    pub(crate) fn read_pieces(&self, offset: u64, pieces: &mut [&mut [u8]]) -> Result<()> {
        let total: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let whole = offset % 512 == 0 && pieces.iter().all(|p| p.len() % 512 == 0);
        if whole && offset.checked_add(total).is_some_and(|end| end <= self.size) {
            let mut iov: Vec<IoSliceMut<'_>> = pieces.iter_mut().map(|p| IoSliceMut::new(p)).collect();
            let read = match &self.layer {
                Layer::Flat(device) => crate::block::read_vectored_at(device.as_ref(), offset, &mut iov),
                Layer::Layered(device) => crate::block::read_vectored_at(device.as_ref(), offset, &mut iov),
            };
            return read.map_err(|e| Error::Backing(Box::new(e)));
        }
        let mut pos = offset;
        for piece in pieces.iter_mut() {
            self.read(pos, piece)?;
            pos = pos.saturating_add(piece.len() as u64);
        }
        Ok(())
    }

    /// Guest size of the backing image in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Which layer allocates each part of `offset..offset + len`, counted from this backing file (1 = the
    /// backing file itself, 0 = nowhere in its chain), in order and without gaps over the whole range.
    ///
    /// Bytes past the backing file's end count as allocated in it: the zeros a shorter backing file shows are
    /// its own, which is how QEMU's `bdrv_is_allocated_above` treats a short layer. A device that cannot say
    /// what it allocates (a raw file) is allocated everywhere.
    ///
    /// # Errors
    /// The backing image's own errors, wrapped as [`Error::Backing`].
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthRun>> {
        let end = offset.saturating_add(len);
        let inside_end = end.min(self.size).max(offset);
        let inside = inside_end - offset;
        let mut out = Vec::new();
        match &self.layer {
            Layer::Flat(_) => push_depth(&mut out, inside, 1),
            Layer::Layered(image) if inside > 0 => {
                let mut covered = 0u64;
                for run in image.allocation_depth(offset, inside).map_err(|e| Error::Backing(Box::new(e)))? {
                    let len = run.len.min(inside - covered);
                    push_depth(&mut out, len, run.depth);
                    covered += len;
                }
                // An answer short of the range asked: what it left out counts as allocated in the backing
                // file, the answer that never claims the guest reads zeros where it may not.
                push_depth(&mut out, inside - covered, 1);
            }
            Layer::Layered(_) => {}
        }
        push_depth(&mut out, end - inside_end, 1);
        Ok(out)
    }
}

/// Appends `len` bytes at `depth`, merged into the last run when the depth is the same.
fn push_depth(out: &mut Vec<DepthRun>, len: u64, depth: u32) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.depth == depth => last.len = last.len.saturating_add(len),
        _ => out.push(DepthRun { len, depth }),
    }
}

impl<D: BlockDevice> Image<D> {
    /// Which layer of the backing chain allocates each part of `offset..offset + len` (clipped to the virtual
    /// size), merged into runs: QEMU's `qemu:allocation-depth`. 1 where this image allocates the range (data,
    /// compressed data, or zero clusters, which hide the backing file and so count as allocated here, as QEMU
    /// counts them); 2 and more where a backing file does ([`Backing::allocation_depth`]); 0 where nothing in
    /// the chain does.
    ///
    /// # Errors
    /// As [`Image::map`]; a backing image's errors arrive as [`Error::Backing`].
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthRun>> {
        let mut out = Vec::new();
        for extent in self.map(offset, len)? {
            match (extent.kind, &self.backing) {
                (ExtentKind::Unallocated, Some(backing)) => {
                    for run in backing.allocation_depth(extent.guest.0, extent.len)? {
                        let depth = if run.depth == 0 { 0 } else { run.depth.saturating_add(1) };
                        push_depth(&mut out, run.len, depth);
                    }
                }
                (ExtentKind::Unallocated, None) => push_depth(&mut out, extent.len, 0),
                _ => push_depth(&mut out, extent.len, 1),
            }
        }
        Ok(out)
    }
}

/// Opens the backing file an image names.
pub trait BackingResolver {
    /// Opens `name` (as recorded in the image) in `format` (from the image's extension, if any).
    ///
    /// # Errors
    /// Whatever refuses or fails the open, naming the file.
    fn open_backing(&self, name: &str, format: Option<&str>) -> Result<Backing>;

    /// Opens the external data file `name` (as recorded in the image).
    ///
    /// # Errors
    /// Whatever refuses or fails the open, naming the file. The default refuses every data file.
    fn open_data_file(&self, name: &str, read_only: bool) -> Result<Box<dyn BlockDevice>> {
        let _ = read_only;
        Err(Error::Unsupported {
            feature: format!("external data file {name:?} (open the image by path, or pass a resolver)"),
        })
    }
}

/// A resolver that refuses every backing file (for images opened from a bare device).
pub struct NoBacking;

impl BackingResolver for NoBacking {
    fn open_backing(&self, name: &str, _format: Option<&str>) -> Result<Backing> {
        Err(Error::Unsupported {
            feature: format!("backing file {name:?} (open the image by path, or pass a backing resolver)"),
        })
    }
}

/// Resolves backing files on the local filesystem under a [`BackingPolicy`].
pub struct FileResolver {
    dir: PathBuf,
    policy: BackingPolicy,
    chain: Vec<PathBuf>,
}

impl FileResolver {
    /// A resolver for an image stored at `image_path`.
    pub fn new(image_path: &Path, policy: BackingPolicy) -> Self {
        let dir = image_path.parent().map(Path::to_path_buf).unwrap_or_default();
        let chain = std::fs::canonicalize(image_path).into_iter().collect();
        FileResolver { dir, policy, chain }
    }
}

fn looks_like_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name.get(..colon).unwrap_or("").contains('/'),
        None => false,
    }
}

impl FileResolver {
    /// Where a name the image records points, if the policy lets us follow it.
    fn resolve(&self, what: &str, name: &str) -> Result<PathBuf> {
        let refuse = |why: &str| Error::Unsupported { feature: format!("{what} {name:?}: {why}") };
        if !self.policy.follow {
            return Err(refuse("following names recorded in images is disabled"));
        }
        if looks_like_protocol(name) {
            return Err(refuse("protocol names are not followed"));
        }
        let path = Path::new(name);
        if path.is_absolute() && !self.policy.allow_absolute {
            return Err(refuse("absolute paths are not followed unless the policy allows them"));
        }
        let path = if path.is_absolute() { path.to_path_buf() } else { self.dir.join(path) };
        std::fs::canonicalize(&path).map_err(|e| Error::io("open a file named by the image", 0, e))
    }
}

impl BackingResolver for FileResolver {
    fn open_data_file(&self, name: &str, read_only: bool) -> Result<Box<dyn BlockDevice>> {
        let path = self.resolve("external data file", name)?;
        let file = FileDevice::open(
            &path,
            &FileOptions { read_only, locking: self.policy.locking, ..FileOptions::default() },
        )?;
        Ok(Box::new(Padded::new(file)))
    }

    fn open_backing(&self, name: &str, format: Option<&str>) -> Result<Backing> {
        let refuse = |why: &str| Error::Unsupported { feature: format!("backing file {name:?}: {why}") };
        if self.chain.len() as u64 > u64::from(self.policy.max_depth) {
            return Err(refuse("the backing chain is deeper than the policy allows"));
        }
        let canonical = self.resolve("backing file", name)?;
        if self.chain.contains(&canonical) {
            return Err(refuse("the backing chain loops"));
        }
        let format = format
            .or(self.policy.default_format.as_deref())
            .ok_or_else(|| refuse("the image does not record the backing format, and formats are never probed"))?;
        let file = FileDevice::open(
            &canonical,
            &FileOptions { read_only: true, locking: self.policy.locking, ..FileOptions::default() },
        )?;
        match format {
            "raw" => {
                let size = file.len_bytes();
                Ok(Backing::new(Box::new(Padded::new(file)), size))
            }
            "qcow2" => {
                let mut chain = self.chain.clone();
                chain.push(canonical.clone());
                let child = FileResolver {
                    dir: canonical.parent().map(Path::to_path_buf).unwrap_or_default(),
                    policy: self.policy.clone(),
                    chain,
                };
                let image = Image::open_with(file, Config::read_only(), &child)?;
                let size = image.virtual_size();
                Ok(Backing::layered(Box::new(image), size))
            }
            other => Err(refuse(&format!("backing format {other:?} is not supported (raw and qcow2 are)"))),
        }
    }
}

impl Image<FileDevice> {
    /// Opens the image file at `path`, following its backing chain under the default [`BackingPolicy`].
    ///
    /// # Errors
    /// As [`Image::open`], plus refusals of the backing file by the policy.
    pub fn open_path(path: impl AsRef<Path>, config: Config) -> Result<Self> {
        Self::open_path_with(path, config, BackingPolicy::default())
    }

    /// Creates an image file at `path` (replacing any file there) and opens it, resolving a backing file named
    /// in `options` against the new image's directory.
    ///
    /// # Errors
    /// As [`Image::create`], plus refusals of the backing file by the default policy.
    pub fn create_path(path: impl AsRef<Path>, options: &super::CreateOptions, config: Config) -> Result<Self> {
        let path = path.as_ref();
        let policy = BackingPolicy::default();
        let opts = FileOptions { locking: policy.locking, ..FileOptions::default() };
        let resolver = FileResolver::new(path, policy);
        if let Some(name) = &options.data_file {
            let data = resolver.dir.join(name);
            // Closed again before the image opens it: two opens of one file in one process exclude each other.
            drop(FileDevice::create(&data, &opts)?);
        }
        let file = FileDevice::create(path, &opts)?;
        Image::create_with(file, options, config, &resolver)
    }

    /// Opens the image file at `path` under an explicit backing policy.
    ///
    /// # Errors
    /// As [`Image::open`], plus refusals of the backing file by the policy.
    pub fn open_path_with(path: impl AsRef<Path>, config: Config, policy: BackingPolicy) -> Result<Self> {
        let path = path.as_ref();
        let file = FileDevice::open(
            path,
            &FileOptions { read_only: config.read_only, locking: policy.locking, ..FileOptions::default() },
        )?;
        Image::open_with(file, config, &FileResolver::new(path, policy))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::block::{Info, MemoryDevice};
    use crate::image::CreateOptions;

    fn runs(r: &[(u64, u32)]) -> Vec<DepthRun> {
        r.iter().map(|&(len, depth)| DepthRun { len, depth }).collect()
    }

    #[test]
    fn a_flat_backing_device_is_allocated_everywhere_and_past_its_end() {
        let backing = Backing::new(Box::new(MemoryDevice::new(1024)), 1000);
        assert_eq!(backing.allocation_depth(0, 4096).unwrap(), runs(&[(4096, 1)]));
        assert_eq!(backing.allocation_depth(8192, 512).unwrap(), runs(&[(512, 1)]));
    }

    #[test]
    fn a_layered_backing_image_answers_for_its_chain_and_its_end_counts_as_its_own() {
        let image = Image::create(MemoryDevice::new(0), &CreateOptions::new(1 << 20), Config::default()).unwrap();
        image.write_at(0, &[7u8; 65536]).unwrap();
        let backing = Backing::layered(Box::new(image), 1 << 20);
        let expected = runs(&[(65536, 1), ((1 << 20) - 65536, 0), (1 << 20, 1)]);
        assert_eq!(backing.allocation_depth(0, 2 << 20).unwrap(), expected);
        assert_eq!(backing.allocation_depth(4096, 4096).unwrap(), runs(&[(4096, 1)]));
    }

    /// A layer whose answers stop short of what was asked.
    struct Short(MemoryDevice);

    impl BlockDevice for Short {
        crate::forward_block_device_methods!(0; read, write, flush, resize, disconnect);
        fn info(&self) -> Info {
            self.0.info()
        }
    }

    impl LayeredDevice for Short {
        fn allocation_depth(&self, _offset: u64, _len: u64) -> Result<Vec<DepthRun>> {
            Ok(runs(&[(100, 0), (0, 3)]))
        }
    }

    #[test]
    fn what_a_layer_leaves_out_of_its_answer_counts_as_allocated_in_it() {
        let backing = Backing::layered(Box::new(Short(MemoryDevice::new(1024))), 1000);
        assert_eq!(backing.allocation_depth(0, 2000).unwrap(), runs(&[(100, 0), (1900, 1)]));
    }

    #[test]
    fn protocol_names_are_recognised() {
        assert!(looks_like_protocol("nbd:localhost:10809"));
        assert!(looks_like_protocol("json:{}"));
        assert!(!looks_like_protocol("dir/a:b.qcow2"));
        assert!(!looks_like_protocol("base.qcow2"));
    }
}
