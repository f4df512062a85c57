//! `qcow-tool amend -o OPTIONS FILE`: change a qcow2 image's options in place, as `qemu-img amend` does.
//!
//! The `-o` list is read as qemu-img reads it (comma separated, `,,` for a comma in a value, a bare name meaning
//! `on`), each value checked by the option's type, and every option qemu-img's qcow2 driver cannot amend refused
//! by name, in qemu-img's words. The library decides everything else, before it changes anything. Persistent
//! bitmaps are kept consistent through every change but a downgrade, which leaves them as QEMU's does.

use std::path::PathBuf;

use qcow::{AmendOptions, Compat, Refusal};

use crate::error::{Error, Result};
use crate::open;
use crate::progress::{Progress, ProgressArgs};
use crate::rebase::quiet_progress;
use crate::rw::print;

/// Arguments of `amend`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Options to change, qemu-img style: compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N,
    /// data_file=NAME, data_file_raw=off, size=SIZE (backing_file and backing_fmt only as they are). `-o help`
    /// lists them. May be given more than once.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Format of the image (only qcow2 can be amended); probed from the file's magic when not given.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Accepted for qemu-img's syntax; it only matters for encryption, which is not supported.
    #[arg(long)]
    force: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to amend.
    file: Option<PathBuf>,
}

/// qemu-img's help for the qcow2 amend options this tool takes.
const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// The type qemu-img gives an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Size,
    Bool,
    Number,
    Text,
}

/// The amend options of qemu-img's qcow2 driver (encryption ones included, to refuse them by name).
fn amend_kind(key: &str) -> Option<Kind> {
    Some(match key {
        "size" => Kind::Size,
        "compat" | "backing_file" | "backing_fmt" | "data_file" | "encrypt.state" | "encrypt.old-secret"
        | "encrypt.new-secret" => Kind::Text,
        "data_file_raw" | "lazy_refcounts" => Kind::Bool,
        "refcount_bits" | "encrypt.keyslot" | "encrypt.iter-time" => Kind::Number,
        _ => return None,
    })
}

/// The options qemu-img's qcow2 driver takes only when creating an image.
fn create_kind(key: &str) -> Option<Kind> {
    Some(match key {
        "cluster_size" => Kind::Size,
        "extended_l2" | "encryption" => Kind::Bool,
        "preallocation"
        | "compression_type"
        | "encrypt.format"
        | "encrypt.key-secret"
        | "encrypt.cipher-alg"
        | "encrypt.cipher-mode"
        | "encrypt.ivgen-alg"
        | "encrypt.ivgen-hash-alg"
        | "encrypt.hash-alg" => Kind::Text,
        "encrypt.iter-time" => Kind::Number,
        _ => return None,
    })
}

/// Whether qemu-img accepts `list` as an option list: not empty, not starting with a comma, and not ending in a
/// lone one.
fn valid_list(list: &str) -> bool {
    let trailing = list.len() - list.trim_end_matches(',').len();
    !list.is_empty() && !list.starts_with(',') && trailing.is_multiple_of(2)
}

/// Splits an option list into (key, value) pairs: `,,` is a comma inside a value, a bare key means `on`.
fn split_list(list: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (i, "on".to_string()),
        })
        .collect()
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// A number as qemu-img reads one: decimal, hex or octal; a minus sign wraps around, as `strtoull` does.
fn parse_number(value: &str) -> Option<u64> {
    let (negative, digits) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let n = if let Some(hex) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(digits.get(1..)?, 8).ok()?
    } else {
        digits.parse().ok()?
    };
    Some(if negative { n.wrapping_neg() } else { n })
}

/// Checks `value` against the option's type, in qemu-img's words.
fn check_value(key: &str, value: &str, kind: Kind) -> Result<()> {
    match kind {
        Kind::Size if qcow::parse_size(value).is_none() => Err(Error::msg(format!(
            "Parameter '{key}' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E means \
             kilo-, mega-, giga-, tera-, peta- and exabytes, respectively)"
        ))),
        Kind::Bool if parse_bool(value).is_none() => {
            Err(Error::msg(format!("Parameter '{key}' expects 'on' or 'off'")))
        }
        Kind::Number if parse_number(value).is_none() => Err(Error::msg(format!("Parameter '{key}' expects a number"))),
        _ => Ok(()),
    }
}

/// Reads the options as qemu-img's qcow2 driver does, refusing what it refuses, first problem first.
fn parse_options(items: &[(String, String)]) -> Result<AmendOptions> {
    for (key, value) in items {
        match amend_kind(key) {
            Some(kind) => check_value(key, value, kind)?,
            None => {
                // qemu-img adds its hint only when the whole list is valid for image creation.
                let creatable = items.iter().all(|(k, v)| match amend_kind(k).or_else(|| create_kind(k)) {
                    Some(kind) => check_value(k, v, kind).is_ok(),
                    None => false,
                });
                let hint = if creatable { " (this option is only supported for image creation)" } else { "" };
                return Err(Error::msg(format!("Invalid parameter '{key}'{hint}")));
            }
        }
    }
    // Later values win, as with qemu-img.
    let last = |name: &str| items.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if items.iter().any(|(k, _)| k.starts_with("encrypt.")) {
        return Err(Error::msg("Can't amend encryption options - encryption not present"));
    }
    let mut options = AmendOptions::default();
    if let Some(size) = last("size") {
        options.size = qcow::parse_size(size);
    }
    if let Some(compat) = last("compat") {
        options.compat = Some(match compat {
            "0.10" | "v2" => Compat::V2,
            "1.1" | "v3" => Compat::V3,
            other => return Err(Error::msg(format!("Unknown compatibility level {other}"))),
        });
    }
    options.backing_file = last("backing_file").map(str::to_string);
    options.backing_format = last("backing_fmt").map(str::to_string);
    options.data_file = last("data_file").map(str::to_string);
    options.data_file_raw = last("data_file_raw").and_then(parse_bool);
    options.lazy_refcounts = last("lazy_refcounts").and_then(parse_bool);
    options.refcount_bits = last("refcount_bits").and_then(parse_number);
    Ok(options)
}

/// qemu-img's words for a refusal.
fn refusal_words(r: &Refusal) -> String {
    match r {
        Refusal::RefcountWidthInvalid { .. } => {
            "Refcount width must be a power of two and may not exceed 64 bits".into()
        }
        Refusal::RefcountWidthNeedsV3 => "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                                          (use compat=1.1 or greater)"
            .into(),
        Refusal::RefcountTooLarge { bits, offset, refcount } => format!(
            "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {offset:#x} has a refcount of \
             {refcount}"
        ),
        Refusal::LazyRefcountsNeedV3 => "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                                         compat=1.1 or greater)"
            .into(),
        Refusal::DataFileNotUsed => "data-file can only be set for images that use an external data file".into(),
        Refusal::DataFileRawCannotBeSet => "data-file-raw cannot be set on existing images".into(),
        Refusal::BackingFileAmend => "Cannot amend the backing file (use 'qcow-tool rebase' instead)".into(),
        Refusal::ResizeV2WithSnapshots => "Can't resize a v2 image which has snapshots".into(),
        Refusal::SizeNotSectorMultiple { .. } => "The new size must be a multiple of 512".into(),
        Refusal::GrowV2OverBacking => "Failed to zero out new clusters: Operation not supported".into(),
        Refusal::DowngradeRefcountWidth => "compat=0.10 requires refcount_bits=16".into(),
        Refusal::DowngradeDataFile => "Cannot downgrade an image with a data file".into(),
        Refusal::DowngradeSnapshot { .. } => "Internal snapshots prevent downgrade of image".into(),
        Refusal::DowngradeIncompatibleFeatures { bits } => {
            format!("Cannot downgrade an image with incompatible features {bits:#x} set")
        }
        Refusal::DowngradeZstdClusters => {
            "Cannot downgrade an image with zstd compression type and existing compressed clusters".into()
        }
        other => format!("Cannot amend the image: {other}"),
    }
}

pub fn run(args: &Args) -> Result<()> {
    if args.options.is_empty() {
        return Err(Error::msg("Must specify options (-o)"));
    }
    let mut items = Vec::new();
    for list in &args.options {
        if !valid_list(list) {
            return Err(Error::msg(format!("Invalid option list: {list}")));
        }
        items.extend(split_list(list));
    }
    let help = items.iter().any(|(k, _)| k == "help" || k == "?");
    if help && args.format.is_some() {
        return print_help(args.format.as_deref());
    }
    let Some(path) = &args.file else { return Err(Error::msg("Expecting one image file name")) };
    let format = match args.format.as_deref() {
        None => open::probe(path)?.name().to_string(),
        Some(f) => f.to_string(),
    };
    if help {
        return print_help(Some(&format));
    }
    match format.as_str() {
        "qcow2" => {}
        "raw" | "file" | "vmdk" | "vdi" | "vpc" | "vhdx" | "qcow" | "qed" | "luks" | "parallels" | "dmg" => {
            return Err(Error::msg(format!("Format driver '{format}' does not support option amendment")));
        }
        other => {
            return Err(Error::msg(format!("could not open '{}': unknown format '{other}'", path.display())));
        }
    }
    let options = parse_options(&items)?;
    let mut image = open::image(path, false)?;
    let mut progress = Progress::new(&quiet_progress(&args.progress, args.quiet), 0, "steps")?;
    let result = image.amend(&options, &mut |done, total| progress.set(done, total));
    match result {
        Ok(()) => {}
        Err(qcow::Error::Refused(r)) => return Err(Error::msg(refusal_words(&r))),
        Err(e) => return Err(open::io_error(path, e)),
    }
    progress.finish(1);
    image.close().map_err(|e| open::io_error(path, e))
}

fn print_help(format: Option<&str>) -> Result<()> {
    match format {
        Some("qcow2") => print(HELP.as_bytes()),
        Some(f) => Err(Error::msg(format!("Format driver '{f}' does not support option amendment"))),
        None => Err(Error::msg("Expecting one image file name")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn option_lists_split_as_qemu_img_splits_them() {
        assert_eq!(
            split_list("size=1M,lazy_refcounts,data_file=a,,b"),
            vec![
                ("size".to_string(), "1M".to_string()),
                ("lazy_refcounts".to_string(), "on".to_string()),
                ("data_file".to_string(), "a,b".to_string())
            ]
        );
        assert!(valid_list("size=1M"));
        assert!(valid_list("data_file=a,,"));
        assert!(!valid_list(""));
        assert!(!valid_list(",size=1M"));
        assert!(!valid_list("size=1M,"));
    }

    #[test]
    fn numbers_read_like_strtoull() {
        assert_eq!(parse_number("16"), Some(16));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("-1"), Some(u64::MAX));
        assert_eq!(parse_number("abc"), None);
    }

    #[test]
    fn creation_options_get_the_hint_only_when_the_whole_list_would_create() {
        let hint = |list: &str| parse_options(&split_list(list)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(hint("size=2M,cluster_size=4k").contains("only supported for image creation"));
        assert!(!hint("foo=1,cluster_size=4k").contains("only supported"));
        assert_eq!(hint("foo=1,cluster_size=4k"), "Invalid parameter 'foo'");
        assert_eq!(hint("cluster_size=4k,foo=1"), "Invalid parameter 'cluster_size'");
    }
}
