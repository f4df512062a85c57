//! Runtime configuration of an open image, with a `key=value;...` string form that parses back to itself.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// How an image behaves while it is open. The defaults suit a read-write image used by one program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// A name for this image in logs and metrics.
    pub id: Option<String>,
    /// Whether discard requests are honoured; otherwise they answer Unimplemented and change nothing.
    pub discard: bool,
    /// Number of zeroed free clusters the reclaimer keeps ready: each pass erases junk (free clusters that may
    /// hold old bytes) until this many are erased or available ([`Image::start_reclaimer`](super::Image::start_reclaimer)).
    pub keep_erased: u64,
    /// The background reclaimer compacts the file online once this many sectors have been discarded since its
    /// last compaction and no discard came in for a tick (0: never).
    pub compact_after_unmaps: u64,
    /// Check the image's refcounts when it is opened, and refuse a read-write open of an inconsistent one. A
    /// writable image that passes may truncate a free tail at once on discard, and compact or start the reclaimer
    /// without another check.
    pub check_on_connect: bool,
    /// Verify the allocator's invariants after every change (slow; for tests).
    pub runtime_asserts: bool,
    /// Never modify the file, by any operation, opening included.
    pub read_only: bool,
    /// Budget of the metadata cache, in bytes.
    pub cache_size: u64,
    /// Write metadata back with the metadata lock held throughout, so that guest I/O waits for every flush: the
    /// engine's behaviour before its writeback queue, kept to measure the difference. Off by default.
    pub writeback_under_lock: bool,
    /// Record how long the metadata lock is held, by use ([`Image::lock_hold_times`](super::Image::lock_hold_times));
    /// each acquisition then costs two clock reads. Off by default.
    pub time_locks: bool,
}

/// The metadata cache budget when none is given: 32 MiB, which maps 256 GiB of guest data at 64 KiB clusters.
pub const DEFAULT_CACHE_SIZE: u64 = 32 << 20;

impl Default for Config {
    fn default() -> Self {
        Config {
            id: None,
            discard: false,
            keep_erased: 0,
            compact_after_unmaps: 0,
            check_on_connect: false,
            runtime_asserts: false,
            read_only: false,
            cache_size: DEFAULT_CACHE_SIZE,
            writeback_under_lock: false,
            time_locks: false,
        }
    }
}

impl Config {
    /// The default configuration, read-only.
    pub fn read_only() -> Self {
        Config { read_only: true, ..Config::default() }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = &self.id {
            write!(f, "id={id};")?;
        }
        write!(
            f,
            "discard={};keep_erased={};compact_after_unmaps={};check_on_connect={};runtime_asserts={};read_only={};cache_size={};writeback_under_lock={};time_locks={}",
            self.discard,
            self.keep_erased,
            self.compact_after_unmaps,
            self.check_on_connect,
            self.runtime_asserts,
            self.read_only,
            self.cache_size,
            self.writeback_under_lock,
            self.time_locks
        )
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" | "on" | "1" => Ok(true),
        "false" | "off" | "0" => Ok(false),
        _ => Err(Error::invalid("config", format!("{key}={value}: expected true or false"))),
    }
}

fn parse_u64(key: &str, value: &str) -> Result<u64, Error> {
    value.parse().map_err(|_| Error::invalid("config", format!("{key}={value}: expected a whole number")))
}

impl FromStr for Config {
    type Err = Error;

    /// Parses `key=value` pairs separated by `;`. Keys not given keep their defaults; an unknown key is an error.
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut config = Config::default();
        for pair in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| Error::invalid("config", format!("{pair:?} is not key=value")))?;
            match key {
                "id" => config.id = Some(value.to_string()),
                "discard" => config.discard = parse_bool(key, value)?,
                "keep_erased" => config.keep_erased = parse_u64(key, value)?,
                "compact_after_unmaps" => config.compact_after_unmaps = parse_u64(key, value)?,
                "check_on_connect" => config.check_on_connect = parse_bool(key, value)?,
                "runtime_asserts" => config.runtime_asserts = parse_bool(key, value)?,
                "read_only" => config.read_only = parse_bool(key, value)?,
                "cache_size" => config.cache_size = parse_u64(key, value)?,
                "writeback_under_lock" => config.writeback_under_lock = parse_bool(key, value)?,
                "time_locks" => config.time_locks = parse_bool(key, value)?,
                _ => return Err(Error::invalid("config", format!("unknown key {key:?}"))),
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_parses_back_from_its_own_string() {
        let c = Config {
            id: Some("disk0".into()),
            discard: true,
            keep_erased: 1024,
            compact_after_unmaps: 4096,
            check_on_connect: true,
            runtime_asserts: true,
            read_only: true,
            cache_size: 1 << 20,
            writeback_under_lock: true,
            time_locks: true,
        };
        assert_eq!(c.to_string().parse::<Config>().ok(), Some(c));
        assert_eq!(Config::default().to_string().parse::<Config>().ok(), Some(Config::default()));
    }

    #[test]
    fn bad_config_strings_are_refused_by_name() {
        assert!("discard=maybe".parse::<Config>().is_err());
        assert!("colour=blue".parse::<Config>().is_err());
        assert!("keep_erased".parse::<Config>().is_err());
        assert_eq!("read_only=on".parse::<Config>().ok().map(|c| c.read_only), Some(true));
    }
}
