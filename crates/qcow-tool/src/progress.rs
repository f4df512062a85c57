//! Progress for long operations: an indicatif bar on stderr with `-p`, and machine-readable `{"progress": P}`
//! lines on a file descriptor the caller names with `--progress-fd`.

use std::fs::File;
use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

/// Where progress goes: any of a bar, a descriptor, or nowhere.
pub struct Progress {
    bar: Option<ProgressBar>,
    fd: Option<File>,
    last_percent: Option<u64>,
}

/// The options every long command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct ProgressArgs {
    /// Draw a progress bar on stderr, with rate and time remaining.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Write `{"progress": P}` lines (P from 0 to 100) to this open file descriptor.
    #[arg(long, value_name = "N")]
    pub progress_fd: Option<i32>,
}

impl Progress {
    /// Progress over `total` units (bytes or clusters, as the command counts them).
    pub fn new(args: &ProgressArgs, total: u64, unit: &str) -> Result<Self> {
        let bar = args.progress.then(|| {
            let bar = ProgressBar::new(total);
            let template = format!("{{wide_bar}} {{percent:>3}}% {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style);
            }
            bar
        });
        let fd = match args.progress_fd {
            None => None,
            Some(n) if n <= 2 => return Err(Error::msg(format!("--progress-fd {n}: use a descriptor above 2"))),
            Some(n) => Some(open_fd(n)?),
        };
        Ok(Progress { bar, fd, last_percent: None })
    }

    /// Reports `done` of `total` units.
    pub fn set(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
        let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        if self.last_percent != Some(percent) {
            self.last_percent = Some(percent);
            if let Some(fd) = &mut self.fd {
                // A reader that went away must not fail the operation itself.
                let _ = writeln!(fd, "{{\"progress\": {percent}}}").and_then(|()| fd.flush());
            }
        }
    }

    /// Ends the bar (and reports 100%).
    pub fn finish(&mut self, total: u64) {
        self.set(total, total);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Reopens descriptor `n` through /dev/fd: the same pipe or file, without taking ownership of a raw descriptor
/// (which would need unsafe code).
fn open_fd(n: i32) -> Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(format!("/dev/fd/{n}"))
        .map_err(|e| Error::wrap(format!("--progress-fd {n}: not an open file descriptor"), e))
}
