//! `qcow-tool snapshot`: `qemu-img snapshot`'s syntax, output and refusals.
//!
//! `-l` (the default) lists the snapshots as qemu-img's table, dates in local time; `-c NAME` creates one, `-a
//! NAME` applies the snapshot with that ID or else that name, `-d NAME` deletes the first one with that name. The
//! three that change the image print nothing; their refusals are qemu-img's words. Two refusals are this tool's
//! own, because qemu-img makes no such refusal: a name that is taken (qemu-img would make a second snapshot of
//! the same name, which `-a` and `-d` could then not tell apart) and a name over 255 bytes (qemu-img cuts it).

use std::path::{Path, PathBuf};

use qcow::format::Snapshot;
use qcow::{ErrorKind, SnapshotRefusal};

use crate::error::{Error, Result};
use crate::info::size_to_str;
use crate::open::{self, Format};

/// Arguments of `snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// List the snapshots (what happens when no other action is given).
    #[arg(short = 'l')]
    list: bool,
    /// Revert the disk to the snapshot with ID or name NAME.
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete the snapshot named NAME.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Print nothing but the list.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image format; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// The image.
    file: PathBuf,
}

enum Action<'a> {
    List,
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
}

impl Args {
    fn action(&self) -> Result<Action<'_>> {
        let given = [self.list, self.create.is_some(), self.apply.is_some(), self.delete.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(Error::msg("Cannot mix '-l', '-a', '-c', '-d'"));
        }
        Ok(match (&self.create, &self.apply, &self.delete) {
            (Some(name), _, _) => Action::Create(name),
            (_, Some(name), _) => Action::Apply(name),
            (_, _, Some(name)) => Action::Delete(name),
            _ => Action::List,
        })
    }
}

pub fn run(args: &Args) -> Result<()> {
    let action = args.action()?;
    let path = &args.file;
    let shown = path.display().to_string();
    let list = matches!(action, Action::List);
    open::refuse_force_share(path, list)?;
    // qemu-img's words for a file it cannot open, before the qcow2 layer says anything.
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(!list).open(path) {
        let why = e.to_string();
        let why = why.split(" (os error").next().unwrap_or(&why);
        return Err(Error::msg(format!("Could not open '{shown}': Could not open '{shown}': {why}")));
    }
    let format = match args.format {
        Some(f) => f,
        None => open::probe(path)?,
    };
    if format == Format::Raw {
        // A raw image has no snapshots to list, and cannot take any.
        return match action {
            Action::List => Ok(()),
            Action::Create(name) => {
                Err(Error::msg(format!("Could not create snapshot '{name}': Operation not supported")))
            }
            Action::Apply(name) => Err(Error::msg(format!(
                "Could not apply snapshot '{name}': Failed to load snapshot: Operation not supported"
            ))),
            Action::Delete(name) => Err(Error::msg(format!("Could not delete snapshot '{name}': snapshot not found"))),
        };
    }
    match action {
        Action::List => {
            let image = open::image_metadata(path)?;
            // QEMU lists nothing for an image with an external data file (it cannot snapshot it).
            if image.header().has_external_data_file() {
                return Ok(());
            }
            let snapshots = image.snapshots().map_err(|e| open::io_error(path, e))?;
            let lines = table(&snapshots);
            if !lines.is_empty() {
                crate::rw::print(format!("{}\n", lines.join("\n")).as_bytes())?;
            }
            Ok(())
        }
        Action::Create(name) => change(path, |image| image.snapshot_create(name), |e| create_refused(name, e)),
        Action::Apply(name) => change(path, |image| image.snapshot_apply(name), |e| apply_refused(name, e)),
        Action::Delete(name) => change(path, |image| image.snapshot_delete(name), |e| delete_refused(name, e)),
    }
}

/// Opens the image read-write, runs `op`, and closes it; `refused` words the library's error as qemu-img would.
fn change(
    path: &Path,
    op: impl FnOnce(&qcow::Image<qcow::block::FileDevice>) -> qcow::Result<Snapshot>,
    refused: impl FnOnce(qcow::Error) -> Error,
) -> Result<()> {
    let image = open::image(path, false)?;
    op(&image).map_err(refused)?;
    image.close().map_err(|e| open::io_error(path, e))
}

/// The C library's words for the errno QEMU would return, where there is one.
fn errno_words(e: &qcow::Error) -> Option<&'static str> {
    match e {
        qcow::Error::Snapshot { why, .. } => Some(match why {
            SnapshotRefusal::NotFound { .. } => "No such file or directory",
            SnapshotRefusal::NameExists { .. } | SnapshotRefusal::IdTaken { .. } => "File exists",
            SnapshotRefusal::NameTooLong { .. } => "File name too long",
            SnapshotRefusal::TooMany | SnapshotRefusal::TableTooLarge { .. } => "File too large",
            SnapshotRefusal::ExternalDataFile => "Operation not supported",
            _ => "Invalid argument",
        }),
        _ if e.kind() == ErrorKind::Unsupported => Some("Operation not supported"),
        _ => None,
    }
}

fn worded(prefix: String, e: qcow::Error) -> Error {
    match errno_words(&e) {
        Some(words) => Error::msg(format!("{prefix}: {words}")),
        None => Error::wrap(prefix, e),
    }
}

fn create_refused(name: &str, e: qcow::Error) -> Error {
    worded(format!("Could not create snapshot '{name}'"), e)
}

fn apply_refused(name: &str, e: qcow::Error) -> Error {
    worded(format!("Could not apply snapshot '{name}': Failed to load snapshot"), e)
}

fn delete_refused(name: &str, e: qcow::Error) -> Error {
    match e {
        // qemu-img finds the snapshot first; with an external data file it finds none.
        qcow::Error::Snapshot { why: SnapshotRefusal::NotFound { .. } | SnapshotRefusal::ExternalDataFile, .. } => {
            Error::msg(format!("Could not delete snapshot '{name}': snapshot not found"))
        }
        e => worded(format!("Could not delete snapshot '{name}'"), e),
    }
}

/// qemu-img's snapshot table ("Snapshot list:", the column heads, a row per snapshot), or nothing when there are
/// no snapshots. Dates are local time, as qemu-img prints them.
pub fn table(snapshots: &[Snapshot]) -> Vec<String> {
    if snapshots.is_empty() {
        return Vec::new();
    }
    let mut out = vec!["Snapshot list:".to_string(), row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")];
    for s in snapshots {
        let nsec = s.vm_clock_nsec;
        let secs = nsec / 1_000_000_000;
        let clock =
            format!("{:04}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60, secs % 60, (nsec / 1_000_000) % 1000);
        // QEMU reads an entry without an icount, or with -1, as none.
        let icount = s.icount().filter(|&n| n != u64::MAX).map_or_else(|| "--".to_string(), |n| n.to_string());
        let date = crate::localtime::format(i64::from(s.date_sec));
        out.push(row(&s.id, &s.name, &size_to_str(s.vm_state_bytes()), &date, &clock, &icount));
    }
    out
}

/// One row of the table, laid out as qemu-img lays it out.
fn row(id: &str, tag: &str, size: &str, date: &str, clock: &str, icount: &str) -> String {
    format!("{id:<7} {tag:<16} {size:>8} {date:>19} {clock:>15} {icount:>10}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn rows_line_up_like_qemu_img() {
        assert_eq!(
            row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        assert_eq!(
            row("1", "snap1", "0 B", "2026-11-25 18:32:44", "0000:00:00.000", "0"),
            "1       snap1                 0 B 2026-11-25 18:32:44  0000:00:00.000          0"
        );
    }
}
