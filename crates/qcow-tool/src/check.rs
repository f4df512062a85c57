//! `qcow-tool check` and `qcow-tool repair`: what `qemu-img check` says about an image, in its human and JSON
//! forms, with its exit codes.
//!
//! The library does the checking; this module opens the file, runs the check, and prints as qemu-img does:
//! each finding on stderr as it is found, then the summary on stdout. After a repair that fixed anything, the
//! image is checked again and the second check is the one reported, with the first one's fixed counts, exactly
//! as qemu-img does it.
//!
//! Exit codes are qemu-img's: 0 clean, 2 corruptions, 3 leaks only, 1 when the check could not complete (the
//! file cannot be opened, its header is refused, an I/O error, or internal errors during the check). qemu-img
//! exits 63 for a format without checks, such as raw; we only know qcow2, so a file that is not qcow2 is an
//! error like any other: one line saying so, exit 1.

use std::fmt::Write as _;
use std::path::PathBuf;

use qcow::block::BlockDevice;
use qcow::check::{CheckReport, Repair};

use crate::error::{Error, Result};
use crate::info::Output;
use crate::metered::{self, Metered};
use crate::open::{self, Format};
use crate::progress::{Progress, ProgressArgs};

/// What `-r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairMode {
    /// Leaked clusters only: refcounts of clusters nothing references.
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// Arguments of `check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output style.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Repair what the check finds (opens the image read-write).
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<RepairMode>,
    /// Image format; only qcow2 images can be checked. Probed from the file's magic when not given.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<Format>,
    /// Print nothing on stdout; findings and errors still go to stderr.
    #[arg(short = 'q', long)]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to check.
    file: PathBuf,
}

/// Arguments of `repair`: `check -r all`.
#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    /// Output style.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Image format; only qcow2 images can be repaired. Probed from the file's magic when not given.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<Format>,
    /// Print nothing on stdout; findings and errors still go to stderr.
    #[arg(short = 'q', long)]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to repair.
    file: PathBuf,
}

impl From<RepairArgs> for Args {
    fn from(r: RepairArgs) -> Self {
        Args {
            output: r.output,
            repair: Some(RepairMode::All),
            format: r.format,
            quiet: r.quiet,
            progress: r.progress,
            file: r.file,
        }
    }
}

/// The counts qemu-img reports, apart from the findings themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Summary {
    check_errors: u64,
    corruptions: u64,
    leaks: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    allocated_clusters: u64,
    total_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
    image_end_offset: u64,
}

impl From<&CheckReport> for Summary {
    fn from(r: &CheckReport) -> Self {
        Summary {
            check_errors: r.check_errors,
            corruptions: r.corruptions,
            leaks: r.leaks,
            corruptions_fixed: r.corruptions_fixed,
            leaks_fixed: r.leaks_fixed,
            allocated_clusters: r.allocated_clusters,
            total_clusters: r.total_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            image_end_offset: r.image_end_offset,
        }
    }
}

/// Runs `check`, printing as it goes, and returns the exit code.
pub fn run(args: &Args) -> Result<u8> {
    let path = &args.file;
    // qemu-img names the image as the user wrote it, in both outputs.
    let name = path.display().to_string();
    let format = match args.format {
        Some(f) => f,
        None => open::probe(path)?,
    };
    if format != Format::Qcow2 {
        let what = if args.format.is_some() { "was given as raw (-f raw)" } else { "has no qcow2 magic" };
        return Err(Error::msg(format!(
            "'{name}' {what}, so it is not a qcow2 image: only qcow2 images can be checked or repaired"
        )));
    }
    let repair = match args.repair {
        None => Repair::None,
        Some(RepairMode::Leaks) => Repair::Leaks,
        Some(RepairMode::All) => Repair::All,
    };
    let dev = open::file(path, args.repair.is_none())?;
    let first = if args.progress.progress || args.progress.progress_fd.is_some() {
        let total = metered::check_estimate(&dev);
        let metered = Metered::new(&dev, total, Progress::new(&args.progress, total, "bytes")?);
        let report = run_check(&metered, repair, &name);
        metered.finish();
        report?
    } else {
        run_check(&dev, repair, &name)?
    };
    let mut summary = Summary::from(&first);
    let mut stdout = String::new();
    if summary.corruptions_fixed != 0 || summary.leaks_fixed != 0 {
        if args.output == Output::Human {
            let _ = write!(
                stdout,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} \
                 corruptions\n\nDouble checking the fixed image now...\n",
                summary.leaks_fixed, summary.corruptions_fixed
            );
        }
        // The repair has already counted what it left behind, but qemu-img reports a fresh check of the repaired
        // image, so the numbers are those of a check that changes nothing.
        let second = run_check(&dev, Repair::None, &name)?;
        summary = Summary {
            corruptions_fixed: summary.corruptions_fixed,
            leaks_fixed: summary.leaks_fixed,
            ..(&second).into()
        };
    }
    match args.output {
        Output::Human => stdout.push_str(&human(&summary)),
        Output::Json => stdout.push_str(&json(&summary, &name)),
    }
    if !args.quiet {
        crate::rw::print(stdout.as_bytes())?;
    }
    if summary.check_errors != 0 {
        // qemu-img's words, after the summary, and its exit code for a check that did not complete.
        return Err(Error::msg(format!(
            "check failed: {} internal errors occurred while checking '{name}'",
            summary.check_errors
        )));
    }
    Ok(if summary.corruptions != 0 {
        2
    } else if summary.leaks != 0 {
        3
    } else {
        0
    })
}

/// Runs the library's check, printing each finding on stderr as qemu-img does while it checks.
fn run_check<D: BlockDevice>(dev: &D, repair: Repair, name: &str) -> Result<CheckReport> {
    let report = qcow::check::check(dev, repair)
        .map_err(|e| Error::wrap(format!("could not check '{name}'{}", open::hint(&e)), e))?;
    let mut findings = String::new();
    for problem in &report.problems {
        let _ = writeln!(findings, "{problem}");
    }
    if report.problems_omitted != 0 {
        let _ = writeln!(findings, "({} more findings not listed)", report.problems_omitted);
    }
    if !findings.is_empty() {
        let mut err = std::io::stderr().lock();
        // Findings are advice; if stderr is gone, the summary and the exit code still say what was found.
        let _ = std::io::Write::write_all(&mut err, findings.as_bytes());
    }
    Ok(report)
}

/// A percentage of `part` in `whole`, computed as qemu-img does (in doubles), two decimals.
fn percent(part: u64, whole: u64) -> String {
    let p = part as f64 * 100.0 / whole as f64;
    format!("{p:.2}")
}

/// qemu-img's human summary.
fn human(s: &Summary) -> String {
    let mut out = String::new();
    if s.corruptions == 0 && s.leaks == 0 && s.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if s.corruptions != 0 {
            let _ = write!(
                out,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may \
                 corrupt it.\n",
                s.corruptions
            );
        }
        if s.leaks != 0 {
            let _ = write!(
                out,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                s.leaks
            );
        }
        if s.check_errors != 0 {
            let _ = write!(out, "\n{} internal errors have occurred during the check.\n", s.check_errors);
        }
    }
    if s.total_clusters != 0 && s.allocated_clusters != 0 {
        let _ = writeln!(
            out,
            "{}/{} = {}% allocated, {}% fragmented, {}% compressed clusters",
            s.allocated_clusters,
            s.total_clusters,
            percent(s.allocated_clusters, s.total_clusters),
            percent(s.fragmented_clusters, s.allocated_clusters),
            percent(s.compressed_clusters, s.allocated_clusters),
        );
    }
    if s.image_end_offset != 0 {
        let _ = writeln!(out, "Image end offset: {}", s.image_end_offset);
    }
    out
}

/// A JSON string as QEMU writes one: every character outside printable ASCII as a `\u` escape (UTF-16, upper
/// case hex), except the usual short escapes.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
    out
}

/// qemu-img's JSON, byte for byte: its fields in the order QEMU's dictionary lists them (by the bucket its hash
/// puts each name in, which is fixed), indented by four spaces. `check-errors`, `filename` and `format` are always
/// there; every other count only when it is not zero.
fn json(s: &Summary, filename: &str) -> String {
    enum Field {
        Count(&'static str, u64, bool),
        Text(&'static str, String),
    }
    let count = |key, value| Field::Count(key, value, false);
    let fields = [
        count("image-end-offset", s.image_end_offset),
        count("compressed-clusters", s.compressed_clusters),
        count("total-clusters", s.total_clusters),
        count("corruptions", s.corruptions),
        count("corruptions-fixed", s.corruptions_fixed),
        Field::Count("check-errors", s.check_errors, true),
        count("leaks", s.leaks),
        count("leaks-fixed", s.leaks_fixed),
        count("allocated-clusters", s.allocated_clusters),
        Field::Text("filename", json_string(filename)),
        Field::Text("format", json_string("qcow2")),
        count("fragmented-clusters", s.fragmented_clusters),
    ];
    let lines: Vec<String> = fields
        .into_iter()
        .filter_map(|f| match f {
            Field::Count(key, value, always) => (always || value != 0).then(|| format!("    \"{key}\": {value}")),
            Field::Text(key, value) => Some(format!("    \"{key}\": {value}")),
        })
        .collect();
    format!("{{\n{}\n}}\n", lines.join(",\n"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped_as_qemu_escapes_them() {
        // Each expectation is what qemu-img 10 printed for a file of that name.
        assert_eq!(json_string("/tmp/a.qcow2"), r#""/tmp/a.qcow2""#);
        assert_eq!(json_string("é x\"y.qcow2"), r#""\u00E9 x\"y.qcow2""#);
        assert_eq!(json_string("a\u{7f}b"), r#""a\u007Fb""#);
        assert_eq!(json_string("a\u{1}b"), r#""a\u0001b""#);
        assert_eq!(json_string("a😀b"), r#""a\uD83D\uDE00b""#);
        assert_eq!(json_string("a\tb"), r#""a\tb""#);
        assert_eq!(json_string("a\\b"), r#""a\\b""#);
        assert_eq!(json_string("bad\u{fffd}name"), r#""bad\uFFFDname""#);
    }

    #[test]
    fn json_omits_zero_counts_but_check_errors() {
        let s = Summary { total_clusters: 1024, image_end_offset: 262_144, ..Summary::default() };
        assert_eq!(
            json(&s, "e.qcow2"),
            "{\n    \"image-end-offset\": 262144,\n    \"total-clusters\": 1024,\n    \"check-errors\": 0,\n    \
             \"filename\": \"e.qcow2\",\n    \"format\": \"qcow2\"\n}\n"
        );
    }

    #[test]
    fn human_summary_has_qemu_img_blank_lines_and_percentages() {
        let s = Summary {
            corruptions: 2,
            leaks: 1,
            allocated_clusters: 16,
            total_clusters: 1024,
            fragmented_clusters: 2,
            image_end_offset: 1_376_256,
            ..Summary::default()
        };
        // What qemu-img 10 printed for an image whose L2 entry was pointed past the end of the file.
        assert_eq!(
            human(&s),
            "\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt \
             it.\n\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to \
             data.\n16/1024 = 1.56% allocated, 12.50% fragmented, 0.00% compressed clusters\nImage end offset: \
             1376256\n"
        );
        let empty = Summary { total_clusters: 1024, image_end_offset: 262_144, ..Summary::default() };
        assert_eq!(human(&empty), "No errors were found on the image.\nImage end offset: 262144\n");
    }
}
