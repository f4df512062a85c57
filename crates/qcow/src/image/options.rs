//! What `create` is asked to make: qemu-img's `-o` vocabulary as a typed value.

use crate::error::{Error, Result};
use crate::format::CompressionType;

/// The on-disk version of a new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// Version 2, "0.10": no feature bits, no zero clusters.
    V2,
    /// Version 3, "1.1".
    V3,
}

/// What `create` allocates up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing beyond the header, refcount structures and L1 table.
    Off,
    /// Every L2 table and data cluster, so later writes never allocate.
    Metadata,
}

/// Parameters of a new image. The defaults are qemu-img's: v3, 64 KiB clusters, 16-bit refcounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to whole sectors, as qemu-img does.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width in bits: a power of two from 1 to 64.
    pub refcount_bits: u64,
    /// The version to write.
    pub compat: Compat,
    /// Whether refcount updates may be deferred (v3 only).
    pub lazy_refcounts: bool,
    /// What to allocate at creation.
    pub preallocation: Preallocation,
    /// The backing file name to record (`-b`), as given: resolved against the image's directory when relative.
    pub backing_file: Option<String>,
    /// The backing file's format (`-F`): "raw" or "qcow2".
    pub backing_format: Option<String>,
    /// How compressed clusters are compressed (v3 only for zstd).
    pub compression_type: CompressionType,
    /// An external data file for guest data (`data_file=`), created next to the image (v3 only).
    pub data_file: Option<String>,
    /// Whether the data file is kept a valid raw image of the disk (`data_file_raw=on`).
    pub data_file_raw: bool,
    /// Whether L2 entries carry subcluster bitmaps (`extended_l2=on`; v3, clusters of 16 KiB and more).
    pub extended_l2: bool,
}

impl CreateOptions {
    /// Defaults for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: 64 << 10,
            refcount_bits: 16,
            compat: Compat::V3,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            compression_type: CompressionType::Deflate,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
        }
    }

    /// Applies one qemu-img `-o` option.
    ///
    /// # Errors
    /// `InvalidArgument` naming the option for an unknown key or a bad value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |why: &str| Error::invalid("create", format!("option {key}={value}: {why}"));
        match key {
            "cluster_size" => self.cluster_size = parse_size(value).ok_or_else(|| bad("not a size"))?,
            "refcount_bits" => self.refcount_bits = value.parse().map_err(|_| bad("not a number"))?,
            "compat" => {
                self.compat = match value {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    _ => return Err(bad("expected 0.10 or 1.1")),
                }
            }
            "lazy_refcounts" => self.lazy_refcounts = parse_switch(value).ok_or_else(|| bad("expected on or off"))?,
            "preallocation" => {
                self.preallocation = match value {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    _ => return Err(bad("supported values are off and metadata")),
                }
            }
            "size" => self.size = parse_size(value).ok_or_else(|| bad("not a size"))?,
            "extended_l2" => self.extended_l2 = parse_switch(value).ok_or_else(|| bad("expected on or off"))?,
            "data_file" => self.data_file = Some(value.to_string()),
            "data_file_raw" => self.data_file_raw = parse_switch(value).ok_or_else(|| bad("expected on or off"))?,
            "backing_file" => self.backing_file = Some(value.to_string()),
            "backing_fmt" => self.backing_format = Some(value.to_string()),
            "compression_type" => {
                self.compression_type = match value {
                    "zlib" | "deflate" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(bad("expected zlib or zstd")),
                }
            }
            _ => return Err(Error::invalid("create", format!("unknown option {key:?}"))),
        }
        Ok(())
    }

    /// Applies a comma-separated `key=value,...` list, as qemu-img's `-o`.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub fn apply(&mut self, list: &str) -> Result<()> {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Error::invalid("create", format!("option {item:?} is not key=value")))?;
            self.set(k.trim(), v.trim())?;
        }
        Ok(())
    }

    /// Checks the combination, as qemu-img would before creating anything.
    ///
    /// # Errors
    /// `InvalidArgument` naming the bad option.
    pub fn validate(&self) -> Result<()> {
        if !self.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&self.cluster_size) {
            return Err(Error::invalid(
                "create",
                format!("cluster size {} must be a power of two between 512 and 2 MiB", self.cluster_size),
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::invalid(
                "create",
                format!("refcount width {} must be a power of two between 1 and 64", self.refcount_bits),
            ));
        }
        if self.compat == Compat::V2 && self.refcount_bits != 16 {
            return Err(Error::invalid("create", "compat=0.10 supports only 16-bit refcounts"));
        }
        if self.compat == Compat::V2 && self.compression_type != CompressionType::Deflate {
            return Err(Error::invalid("create", "compression_type=zstd needs compat=1.1"));
        }
        if self.backing_file.is_some() && self.backing_format.is_none() {
            return Err(Error::invalid("create", "a backing file needs its format (-F raw or -F qcow2)"));
        }
        if let Some(f) = &self.backing_format {
            if f != "raw" && f != "qcow2" {
                return Err(Error::invalid("create", format!("backing format {f:?} is not supported (raw, qcow2)")));
            }
        }
        if self.data_file.is_some() && self.compat == Compat::V2 {
            return Err(Error::invalid("create", "an external data file needs compat=1.1"));
        }
        if self.extended_l2 && (self.compat == Compat::V2 || self.cluster_size < 16 << 10) {
            return Err(Error::invalid("create", "extended_l2=on needs compat=1.1 and clusters of at least 16 KiB"));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::invalid("create", "data_file_raw=on needs data_file"));
        }
        if self.data_file.is_some() && self.preallocation != Preallocation::Off {
            return Err(Error::invalid("create", "preallocation with an external data file is not supported"));
        }
        if self.compat == Compat::V2 && self.lazy_refcounts {
            return Err(Error::invalid("create", "lazy refcounts need compat=1.1"));
        }
        Ok(())
    }
}

fn parse_switch(value: &str) -> Option<bool> {
    match value {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Parses a size as qemu-img does: a plain number of bytes, or a number with a K/M/G/T/P/E suffix (powers of
/// 1024; `KiB` style and lower case accepted too; `B` alone is bytes).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return None,
    };
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(1u64 << shift);
    }
    let f: f64 = number.parse().ok()?;
    let bytes = f * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("1000001"), Some(1000001));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("1P"), Some(1 << 50));
        assert_eq!(parse_size("2MiB"), Some(2 << 20));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
    }

    #[test]
    fn dash_o_lists_apply_and_bad_ones_are_named() {
        let mut o = CreateOptions::new(1 << 30);
        o.apply("cluster_size=4k,refcount_bits=1,compat=1.1,lazy_refcounts=on,preallocation=metadata").ok();
        assert_eq!(o.cluster_size, 4096);
        assert_eq!(o.refcount_bits, 1);
        assert!(o.lazy_refcounts);
        assert_eq!(o.preallocation, Preallocation::Metadata);
        assert!(o.validate().is_ok());
        assert!(o.apply("colour=red").is_err());
        o.cluster_size = 1 << 22;
        assert!(o.validate().is_err());
    }
}
