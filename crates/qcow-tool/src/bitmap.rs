//! `qcow-tool bitmap`: change the persistent dirty bitmaps of an image, as `qemu-img bitmap` does.
//!
//! `bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)... [-b SOURCE_FILE [-F FMT]]
//! [-g GRANULARITY] [-f FMT] FILE BITMAP`: the actions run in the order given, on the bitmap BITMAP of FILE; the
//! first that fails stops the rest, and what ran before it is kept (the image is closed, which stores the
//! bitmaps, either way), as with qemu-img. Errors use qemu-img's words, "Operation ACTION on bitmap NAME failed:
//! WHY"; where qemu-img names a block node ("#block123"), the file's name stands instead.

use std::path::PathBuf;

use clap::{ArgMatches, FromArgMatches};
use qcow::block::FileDevice;
use qcow::format::{check_new_bitmap, BitmapError};
use qcow::{BitmapInfo, Image};

use crate::error::{Error, Result};
use crate::open::{self, Format};

/// The options as clap parses them; [`Args`] adds the order of the actions.
#[derive(Debug, clap::Args)]
struct Options {
    /// Create BITMAP, recording future writes (in the order given on the command line, like every action).
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    add: Vec<bool>,
    /// Remove BITMAP.
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    remove: Vec<bool>,
    /// Clear BITMAP.
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    clear: Vec<bool>,
    /// Start recording future writes to BITMAP.
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    enable: Vec<bool>,
    /// Stop recording future writes to BITMAP.
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    disable: Vec<bool>,
    /// Merge the contents of the bitmap SOURCE (of -b SOURCE_FILE, or of FILE) into BITMAP.
    #[arg(long, value_name = "SOURCE", action = clap::ArgAction::Append)]
    merge: Vec<String>,
    /// Bytes per bit of a new bitmap (K, M, G suffixes accepted); by default the cluster size, kept within
    /// 4 KiB .. 64 KiB, as qemu-img chooses it. Only with --add.
    #[arg(short = 'g', long = "granularity", value_name = "SIZE", allow_hyphen_values = true)]
    granularity: Option<String>,
    /// The file holding the bitmaps --merge reads (FILE by default).
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_FILE")]
    source_file: Option<PathBuf>,
    /// The format of SOURCE_FILE; probed when not given. Only with -b.
    #[arg(short = 'F', long = "source-format", value_enum)]
    source_format: Option<Format>,
    /// The format of FILE; probed when not given.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<Format>,
    /// FILE BITMAP: the image, and the name of the bitmap to act on.
    #[arg(value_name = "FILE BITMAP", num_args = 0..)]
    operands: Vec<String>,
}

/// One action, as qemu-img runs them: in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    /// The name qemu-img gives the operation in its errors.
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// Arguments of `bitmap`.
#[derive(Debug)]
pub struct Args {
    options: Options,
    actions: Vec<Action>,
}

impl FromArgMatches for Args {
    fn from_arg_matches(matches: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let options = Options::from_arg_matches(matches)?;
        let mut at: Vec<(usize, Action)> = Vec::new();
        for (id, action) in [
            ("add", Action::Add),
            ("remove", Action::Remove),
            ("clear", Action::Clear),
            ("enable", Action::Enable),
            ("disable", Action::Disable),
        ] {
            at.extend(matches.indices_of(id).into_iter().flatten().map(|i| (i, action.clone())));
        }
        let merges = matches.indices_of("merge").into_iter().flatten().zip(options.merge.iter());
        at.extend(merges.map(|(i, src)| (i, Action::Merge(src.clone()))));
        at.sort_by_key(|(i, _)| *i);
        Ok(Args { options, actions: at.into_iter().map(|(_, a)| a).collect() })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for Args {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Options::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Options::augment_args_for_update(cmd)
    }
}

/// `-g` as qemu-img's `cvtnum` reads it.
fn granularity(text: &str) -> Result<u64> {
    let digits = text.trim_start();
    if digits.starts_with('-') || qcow::parse_size(text).is_some_and(|n| n > i64::MAX as u64) {
        return Err(Error::msg("Invalid granularity specified. Must be between 0 and 9223372036854775807."));
    }
    if qcow::parse_size(text).is_none() && digits.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        // Digits too many for 64 bits, with or without a suffix.
        let number: String = digits.chars().take_while(char::is_ascii_digit).collect();
        if number.parse::<u64>().is_err() {
            return Err(Error::msg("Invalid granularity specified. Must be between 0 and 9223372036854775807."));
        }
    }
    qcow::parse_size(text).ok_or_else(|| Error::msg(format!("Invalid granularity specified: '{text}'.")))
}

/// Where a bitmap's actions read and write: a qcow2 image, or a raw file (which holds no bitmaps).
enum Target {
    Qcow2(Box<Image<FileDevice>>),
    Raw,
}

impl Target {
    fn open(path: &std::path::Path, format: Option<Format>, read_only: bool) -> Result<Self> {
        let format = match format {
            Some(f) => f,
            None => open::probe(path)?,
        };
        Ok(match format {
            Format::Qcow2 => Target::Qcow2(Box::new(open::image(path, read_only)?)),
            Format::Raw => {
                // Opened only to name a missing file as qemu-img does.
                open::file(path, read_only)?;
                Target::Raw
            }
        })
    }

    fn list(&self, path: &std::path::Path) -> Result<Vec<BitmapInfo>> {
        match self {
            Target::Qcow2(image) => image.list_bitmaps().map_err(|e| open::io_error(path, e)),
            Target::Raw => Ok(Vec::new()),
        }
    }
}

/// qemu-img's "Dirty bitmap 'NAME' not found".
fn not_found(name: &str) -> String {
    format!("Dirty bitmap '{name}' not found")
}

/// qemu-img's refusal of an inconsistent bitmap, with its hint (which names a QMP command) adapted to this tool.
pub fn inconsistent(file: &std::path::Path, name: &str) -> String {
    format!(
        "Bitmap '{name}' is inconsistent and cannot be used (try 'qcow-tool bitmap --remove {} {name}' to delete \
         this bitmap from disk)",
        file.display()
    )
}

/// The bitmap `name` of `list`, if it may be used: qemu-img's words when not.
fn usable<'a>(
    list: &'a [BitmapInfo],
    file: &std::path::Path,
    name: &str,
) -> std::result::Result<&'a BitmapInfo, String> {
    let b = list.iter().find(|b| b.name == name).ok_or_else(|| not_found(name))?;
    if !b.consistent {
        return Err(inconsistent(file, name));
    }
    Ok(b)
}

pub fn run(args: &Args) -> Result<()> {
    let o = &args.options;
    // qemu-img's checks, in its order.
    let granularity = o.granularity.as_deref().map(granularity).transpose()?;
    if args.actions.is_empty() {
        return Err(Error::msg("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"));
    }
    if granularity.is_some_and(|g| g != 0) && !args.actions.contains(&Action::Add) {
        return Err(Error::msg("granularity only supported with --add"));
    }
    if o.source_format.is_some() && o.source_file.is_none() {
        return Err(Error::msg("-F only supported with -b"));
    }
    if o.source_file.is_some() && !args.actions.iter().any(|a| matches!(a, Action::Merge(_))) {
        return Err(Error::msg("Merge bitmap source file only supported with --merge"));
    }
    let [file, bitmap] = o.operands.as_slice() else {
        return Err(Error::msg("Expecting filename and bitmap name"));
    };
    let path = PathBuf::from(file);
    let target = Target::open(&path, o.format, false)?;
    let source = match &o.source_file {
        Some(p) => Some((Target::open(p, o.source_format, true)?, p.clone())),
        None => None,
    };
    let mut result = Ok(());
    for action in &args.actions {
        if let Err(why) = act(&target, &path, source.as_ref(), action, bitmap, granularity.unwrap_or(0)) {
            result = Err(Error::msg(format!("Operation {} on bitmap {bitmap} failed: {why}", action.name())));
            break;
        }
    }
    // Closed whatever happened: the actions that ran are stored, as qemu-img stores them.
    if let Target::Qcow2(image) = target {
        let closed = image.close().map_err(|e| open::io_error(&path, e));
        result = result.and(closed);
    }
    result
}

/// Runs one action; the error is qemu-img's reason.
fn act(
    target: &Target,
    path: &std::path::Path,
    source: Option<&(Target, PathBuf)>,
    action: &Action,
    name: &str,
    granularity: u64,
) -> std::result::Result<(), String> {
    let node = path.display().to_string();
    let list = target.list(path).map_err(|e| e.chain())?;
    let Target::Qcow2(image) = target else {
        return match action {
            Action::Add => Err(format!("Can't store persistent bitmaps to {node}: Operation not supported")),
            Action::Merge(_) | Action::Remove | Action::Clear | Action::Enable | Action::Disable => {
                Err(not_found(name))
            }
        };
    };
    let library = |e: qcow::Error| open::io_error(path, e).chain();
    match action {
        Action::Add => {
            let persistent = |why: &str| format!("Can't make bitmap '{name}' persistent in '{node}': {why}");
            let granularity = if granularity == 0 { image.default_bitmap_granularity() } else { granularity };
            match check_new_bitmap(name, granularity, image.virtual_size(), image.geometry().cluster_size()) {
                Err(BitmapError::NameEmpty) => return Err("Bitmap name cannot be empty".into()),
                Err(BitmapError::GranularityInvalid { .. }) => {
                    return Err("Granularity must be power of 2 and at least 512".into())
                }
                _ => {}
            }
            if list.iter().any(|b| b.name == name) {
                return Err(format!("Bitmap already exists: {name}"));
            }
            if image.header().version < 3 {
                return Err(persistent("Cannot store dirty bitmaps in qcow2 v2 files"));
            }
            match check_new_bitmap(name, granularity, image.virtual_size(), image.geometry().cluster_size()) {
                Err(BitmapError::DataTooLarge { .. }) => {
                    return Err(persistent("Too much space will be occupied by the bitmap. Use larger granularity"))
                }
                Err(BitmapError::NameLength { .. }) => {
                    return Err(persistent("Name length exceeds maximum (1023 characters)"))
                }
                _ => {}
            }
            if list.len() >= qcow::format::MAX_BITMAPS as usize {
                return Err(persistent("Maximum number of persistent bitmaps is already reached"));
            }
            image.add_bitmap(name, granularity, true).map_err(|e| match e {
                qcow::Error::InvalidArgument { reason, .. } if reason.contains("directory") => {
                    persistent("Not enough space in the bitmap directory")
                }
                e => library(e),
            })
        }
        Action::Remove => {
            list.iter().find(|b| b.name == name).ok_or_else(|| not_found(name))?;
            image.remove_bitmap(name).map_err(library)
        }
        Action::Clear => {
            usable(&list, path, name)?;
            image.clear_bitmap(name).map_err(library)
        }
        Action::Enable => {
            usable(&list, path, name)?;
            image.enable_bitmap(name).map_err(library)
        }
        Action::Disable => {
            usable(&list, path, name)?;
            image.disable_bitmap(name).map_err(library)
        }
        Action::Merge(src) => {
            usable(&list, path, name)?;
            match source {
                None => {
                    usable(&list, path, src)?;
                    image.merge_bitmap(src, name).map_err(library)
                }
                Some((Target::Raw, _)) => Err(not_found(src)),
                Some((from @ Target::Qcow2(theirs), from_path)) => {
                    usable(&from.list(from_path).map_err(|e| e.chain())?, from_path, src)?;
                    let (ours, size) = (image.virtual_size(), theirs.virtual_size());
                    if ours != size {
                        return Err(format!(
                            "Bitmaps are of different sizes (destination size is {ours}, source size is {size}) and \
                             can't be merged"
                        ));
                    }
                    image.merge_bitmap_from(theirs, src, name).map_err(library)
                }
            }
        }
    }
}
