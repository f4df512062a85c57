//! `qcow-tool`: a qemu-img style front end to the `qcow` library.
//!
//! The binary only parses arguments, sets things up, calls the library and prints. Exit codes are decided here
//! and nowhere else: 0 for success (and for a reader of our output that went away), 1 for any error, which is
//! printed as one line on stderr, and `check`'s own codes (2 corruptions, 3 leaks), as qemu-img's.
#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod amend;
mod bench;
mod bitmap;
mod chain;
mod check;
mod commit;
mod compact;
mod compare;
mod convert;
mod create;
mod decode;
mod dehydrate;
mod discard;
mod disk;
mod encode;
mod error;
mod info;
mod localtime;
mod map;
mod mapped;
mod measure;
mod metered;
mod open;
mod pattern;
mod progress;
mod rebase;
mod rehydrate;
mod resize;
mod rw;
mod serve;
mod sha;
mod snapshot;
mod stream_decode;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};

/// qemu-img style tool for qcow2 images.
#[derive(Debug, Parser)]
#[command(name = "qcow-tool", version, about)]
struct Cli {
    /// Follow backing files named by absolute paths (by default only names relative to the image's directory
    /// are followed, so that an image cannot make the tool open arbitrary host files).
    #[arg(long, global = true)]
    allow_absolute_backing: bool,
    /// Open images that are only read without stopping others from writing them (qemu-img's -U): what is read
    /// may be inconsistent while another process writes.
    #[arg(short = 'U', long = "force-share", global = true)]
    force_share: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new qcow2 image.
    Create(create::Args),
    /// Show what an image is: its size, format and qcow2 features.
    Info(info::Args),
    /// Copy an image to a new raw or qcow2 image.
    Convert(convert::Args),
    /// Read sectors of a qcow2 image and print them, raw, to stdout.
    Read(rw::ReadArgs),
    /// Write text, zero padded to whole sectors, into a qcow2 image.
    Write(rw::WriteArgs),
    /// Check a qcow2 image's metadata for consistency, as `qemu-img check` does (exit 0 clean, 2 corruptions,
    /// 3 leaks only, 1 check not completed); with -r, repair what is found.
    Check(check::Args),
    /// Repair a qcow2 image: `check -r all`.
    Repair(check::RepairArgs),
    /// Find clusters whose data is all zeros and discard them.
    Discard(discard::Args),
    /// Move clusters from the end of the file into holes, then truncate it; prints how much it shrank.
    Compact(compact::Args),
    /// List the extents the image maps (data, and zero clusters unless --ignore-zeroes).
    Mapped(mapped::Args),
    /// Show where each part of the guest disk is stored, as `qemu-img map` does.
    Map(map::Args),
    /// Compare the guest data of two images (exit 0 identical, 1 different, 2 error), as `qemu-img compare`.
    Compare(compare::Args),
    /// Change an image's virtual size: `resize FILE [+|-]SIZE [--shrink]`.
    Resize(resize::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps, as `qemu-img bitmap` does.
    Bitmap(bitmap::Args),
    /// Say how large a new image would be, for a size or for an existing image's data, as `qemu-img measure`.
    Measure(measure::Args),
    /// Time a run of read or write requests against the library, with `qemu-img bench`'s request pattern.
    Bench(bench::Args),
    /// Copy a raw file into a new qcow2 image.
    Encode(encode::Args),
    /// Copy a qcow2 image's guest data into a new sparse raw file.
    Decode(decode::Args),
    /// Print a digest (SHA-256 by default) of the virtual disk.
    Sha(sha::Args),
    /// Create a test image: pattern 1 (a sector in every other cluster) or 2 (all written, every other
    /// cluster discarded).
    Pattern(pattern::Args),
    /// Copy an image's metadata clusters, and nothing else, to PREFIX.meta and PREFIX.map.
    Dehydrate(dehydrate::Args),
    /// Rebuild an image from PREFIX.meta and PREFIX.map: its metadata, with zeros where data was.
    Rehydrate(rehydrate::Args),
    /// Move an image onto another backing file (or none) without changing what it reads, as `qemu-img rebase`;
    /// with -u, only rewrite the backing file name.
    Rebase(rebase::Args),
    /// Write what an image holds into its backing file (or -b BASE further down), then empty it, as
    /// `qemu-img commit`.
    Commit(commit::Args),
    /// Change a qcow2 image's options (compat, lazy_refcounts, refcount_bits, data_file, data_file_raw, size),
    /// as `qemu-img amend`.
    Amend(amend::Args),
    /// Serve an image over NBD (Network Block Device) until SIGINT or SIGTERM.
    Serve(serve::Args),
    /// List, create, apply or delete internal snapshots, as `qemu-img snapshot (-l | -c NAME | -a NAME | -d NAME)`.
    Snapshot(snapshot::Args),
    /// Decode a qcow2 image read from standard input (a pipe: no seeking) into a sparse raw file.
    StreamDecode(stream_decode::Args),
}

/// Runs a command; `Ok` holds the exit code, which only `check` makes other than 0.
fn run(cli: Cli) -> Result<u8> {
    open::allow_absolute_backing(cli.allow_absolute_backing);
    open::force_share(cli.force_share);
    match cli.command {
        Command::Create(args) => create::run(&args).map(|()| 0),
        Command::Info(args) => info::run(&args).map(|()| 0),
        Command::Convert(args) => convert::run(&args).map(|()| 0),
        Command::Read(args) => rw::read(&args).map(|()| 0),
        Command::Write(args) => rw::write(&args).map(|()| 0),
        Command::Check(args) => check::run(&args),
        Command::Repair(args) => check::run(&args.into()),
        Command::Discard(args) => discard::run(&args).map(|()| 0),
        Command::Compact(args) => compact::run(&args).map(|()| 0),
        Command::Mapped(args) => mapped::run(&args).map(|()| 0),
        Command::Map(args) => map::run(&args).map(|()| 0),
        Command::Compare(args) => compare::run(&args),
        Command::Resize(args) => resize::run(&args).map(|()| 0),
        Command::Bitmap(args) => bitmap::run(&args).map(|()| 0),
        Command::Measure(args) => measure::run(&args).map(|()| 0),
        Command::Bench(args) => bench::run(&args).map(|()| 0),
        Command::Encode(args) => encode::run(&args).map(|()| 0),
        Command::Decode(args) => decode::run(&args).map(|()| 0),
        Command::Sha(args) => sha::run(&args).map(|()| 0),
        Command::Pattern(args) => pattern::run(&args).map(|()| 0),
        Command::Dehydrate(args) => dehydrate::run(&args).map(|()| 0),
        Command::Rehydrate(args) => rehydrate::run(&args).map(|()| 0),
        Command::Rebase(args) => rebase::run(&args).map(|()| 0),
        Command::Commit(args) => commit::run(&args).map(|()| 0),
        Command::Amend(args) => amend::run(&args).map(|()| 0),
        Command::Serve(args) => serve::run(&args).map(|()| 0),
        Command::Snapshot(args) => snapshot::run(&args).map(|()| 0),
        Command::StreamDecode(args) => stream_decode::run(&args).map(|()| 0),
    }
}

/// Clap's error message without its usage block, on one line.
fn usage_error(e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return "no command given: use one of create, info, check, repair, map, compare, convert, resize, bitmap, measure, bench, encode, decode, read, write, mapped, discard, compact, sha, snapshot, pattern, dehydrate, rehydrate, rebase, commit, amend, stream-decode, serve (see 'qcow-tool --help')".into();
    }
    let text = e.render().to_string();
    let message: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    format!("{message} (see 'qcow-tool --help')")
}

fn main() -> ExitCode {
    let result = match Cli::try_parse() {
        Ok(cli) => run(cli),
        Err(e) if !e.use_stderr() => {
            // --help and --version: not errors.
            return match e.print() {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Err(e) => Err(Error::msg(usage_error(&e))),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcow-tool: {}", e.chain());
            ExitCode::FAILURE
        }
    }
}
