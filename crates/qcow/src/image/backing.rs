//! Backing files: where unallocated clusters of an overlay read from, and the policy that decides which files an
//! image may make us open.
//!
//! A backing file name comes from the image, so it is untrusted input. By default a name is followed only when
//! it is relative (resolved against the overlay's directory), the format is taken from the image's
//! backing-format extension and never probed, and a chain may be at most [`BackingPolicy::max_depth`] deep and
//! may not visit a file twice.

use std::path::{Path, PathBuf};

use super::{Config, Image};
use crate::block::{BlockDevice, FileDevice, FileOptions, Padded};
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
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy { follow: true, allow_absolute: false, default_format: None, max_depth: 64 }
    }
}

/// The backing image of an open image: any readable device, and the guest size it has.
pub struct Backing {
    device: Box<dyn BlockDevice>,
    size: u64,
}

impl Backing {
    /// A backing device whose guest-visible size is `size` bytes.
    pub fn new(device: Box<dyn BlockDevice>, size: u64) -> Self {
        Backing { device, size }
    }

    /// Fills `buf` with the backing contents at guest offset `offset`; bytes past the backing's end are zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        // The backing's last sector may be partial; read whole sectors and keep what was asked.
        let start = offset & !511;
        let end = (offset + inside.len() as u64).next_multiple_of(512);
        // Its errors are its own: corruption met there must not mark the overlay corrupt.
        let own = |e| Error::Backing(Box::new(e));
        if start == offset && end == offset + inside.len() as u64 {
            return self.device.read_at(offset, inside).map_err(own);
        }
        let mut bounce = vec![0u8; (end - start) as usize];
        self.device.read_at(start, &mut bounce).map_err(own)?;
        let skip = (offset - start) as usize;
        if let Some(src) = bounce.get(skip..skip + inside.len()) {
            inside.copy_from_slice(src);
        }
        Ok(())
    }

    /// Guest size of the backing image in bytes.
    pub fn size(&self) -> u64 {
        self.size
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
        let file = FileDevice::open(&path, &FileOptions { read_only, direct: false })?;
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
        let file = FileDevice::open(&canonical, &FileOptions { read_only: true, direct: false })?;
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
                Ok(Backing::new(Box::new(image), size))
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
        let resolver = FileResolver::new(path, BackingPolicy::default());
        if let Some(name) = &options.data_file {
            let data = resolver.dir.join(name);
            FileDevice::create(&data, &FileOptions::default())?;
        }
        let file = FileDevice::create(path, &FileOptions::default())?;
        Image::create_with(file, options, config, &resolver)
    }

    /// Opens the image file at `path` under an explicit backing policy.
    ///
    /// # Errors
    /// As [`Image::open`], plus refusals of the backing file by the policy.
    pub fn open_path_with(path: impl AsRef<Path>, config: Config, policy: BackingPolicy) -> Result<Self> {
        let path = path.as_ref();
        let file = FileDevice::open(path, &FileOptions { read_only: config.read_only, direct: false })?;
        Image::open_with(file, config, &FileResolver::new(path, policy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_are_recognised() {
        assert!(looks_like_protocol("nbd:localhost:10809"));
        assert!(looks_like_protocol("json:{}"));
        assert!(!looks_like_protocol("dir/a:b.qcow2"));
        assert!(!looks_like_protocol("base.qcow2"));
    }
}
