//! Host clusters kept because a table read later may still name them: in memory up to a bound, then in an
//! anonymous temporary file, or refused when no spool directory is allowed.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// Where a kept cluster is.
enum Place {
    /// The bytes kept, from this offset into the cluster.
    Memory(usize, Vec<u8>),
    /// Offset into the cluster, and offset and length in the spool file.
    File(usize, u64, usize),
}

/// Clusters by host cluster index.
pub struct Spool {
    clusters: HashMap<u64, Place>,
    memory: u64,
    limit: u64,
    dir: Option<PathBuf>,
    file: Option<File>,
    file_end: u64,
    /// The most bytes held at once, memory and file together.
    pub peak: u64,
    held: u64,
    /// Whether anything went to the spool file.
    pub spilled: bool,
}

impl Spool {
    /// A spool holding up to `limit` bytes in memory, then spilling to a temporary file in `dir` (or refusing
    /// when `dir` is `None`).
    pub fn new(limit: u64, dir: Option<PathBuf>) -> Self {
        Spool {
            clusters: HashMap::new(),
            memory: 0,
            limit,
            dir,
            file: None,
            file_end: 0,
            peak: 0,
            held: 0,
            spilled: false,
        }
    }

    /// Keeps `data`, the bytes of host cluster `index` from offset `from` in it on.
    ///
    /// # Errors
    /// `Unsupported` past the memory bound without a spool directory; `Io` when the spool file fails.
    pub fn put(&mut self, index: u64, from: usize, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let place = if self.memory.saturating_add(len) <= self.limit {
            self.memory += len;
            Place::Memory(from, data.to_vec())
        } else {
            let Some(dir) = &self.dir else {
                return Err(Error::Unsupported {
                    feature: format!(
                        "this layout cannot be streamed: more than {} bytes come before the tables that map them \
                         (allow a spool file, or raise the memory bound)",
                        self.limit
                    ),
                });
            };
            if self.file.is_none() {
                let file = tempfile::tempfile_in(dir).map_err(|e| Error::io("create a spool file", 0, e))?;
                self.file = Some(file);
                self.spilled = true;
            }
            let Some(file) = &self.file else {
                return Err(Error::invalid("stream-decode", "internal: no spool file"));
            };
            file.write_all_at(data, self.file_end).map_err(|e| Error::io("write the spool file", self.file_end, e))?;
            let at = self.file_end;
            self.file_end += len;
            Place::File(from, at, data.len())
        };
        self.clusters.insert(index, place);
        self.held += len;
        self.peak = self.peak.max(self.held);
        Ok(())
    }

    /// The kept bytes of host cluster `index` and their offset in it, if kept.
    ///
    /// # Errors
    /// `Io` when the spool file fails.
    pub fn get(&self, index: u64) -> Result<Option<(usize, Vec<u8>)>> {
        match self.clusters.get(&index) {
            None => Ok(None),
            Some(Place::Memory(from, data)) => Ok(Some((*from, data.clone()))),
            Some(&Place::File(from, at, len)) => {
                let Some(file) = &self.file else {
                    return Err(Error::invalid("stream-decode", "internal: no spool file"));
                };
                let mut data = vec![0u8; len];
                file.read_exact_at(&mut data, at).map_err(|e| Error::io("read the spool file", at, e))?;
                Ok(Some((from, data)))
            }
        }
    }

    /// Forgets everything (the file's space is given back by truncating it).
    pub fn clear(&mut self) {
        self.clusters.clear();
        self.memory = 0;
        self.held = 0;
        if let Some(file) = &self.file {
            // Only space is at stake: a failure leaves the data there until the file is dropped.
            let _ = file.set_len(0);
        }
        self.file_end = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn spills_past_the_bound_and_refuses_without_a_directory() {
        let mut s = Spool::new(1024, Some(std::env::temp_dir()));
        s.put(1, 0, &[1u8; 1000]).unwrap();
        s.put(2, 24, &[2u8; 1000]).unwrap();
        assert!(s.spilled);
        assert_eq!(s.get(1).unwrap().unwrap(), (0, vec![1u8; 1000]));
        assert_eq!(s.get(2).unwrap().unwrap(), (24, vec![2u8; 1000]));
        assert_eq!(s.get(3).unwrap(), None);
        s.clear();
        assert_eq!(s.get(2).unwrap(), None);
        assert_eq!(s.peak, 2000);

        let mut s = Spool::new(1024, None);
        s.put(1, 0, &[1u8; 1000]).unwrap();
        let err = s.put(2, 0, &[2u8; 1000]).unwrap_err();
        assert!(err.to_string().contains("cannot be streamed"), "{err}");
    }
}
