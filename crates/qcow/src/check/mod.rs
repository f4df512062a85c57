//! Check and repair: rebuild the reference counts that the metadata implies, compare them with the stored ones,
//! report every inconsistency, and repair what can be repaired without ever making an image worse.
//!
//! The counts and their meaning mirror `qemu-img check`: a **corruption** is a refcount lower than the number of
//! references (or any structural error), a **leak** a refcount higher than it, a **check error** something the
//! check could not examine. [`CheckReport::exit_code`] is qemu-img's exit code for the same findings.
//!
//! ```
//! use qcow::block::MemoryDevice;
//! use qcow::check::{check, Repair};
//! use qcow::{Config, CreateOptions, Image};
//!
//! # fn main() -> Result<(), qcow::Error> {
//! let image = Image::create(MemoryDevice::new(0), &CreateOptions::new(1 << 20), Config::default())?;
//! image.write_at(0, &[1; 4096])?;
//! let report = image.check()?;
//! assert!(report.is_clean());
//! assert_eq!(report.allocated_clusters, 1);
//!
//! image.flush()?;
//! let report = check(image.device(), Repair::None)?;
//! assert_eq!(report.exit_code(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Repair and crashes
//! Every repair step leaves a valid image if the machine stops at any point within it:
//! - fixing a leak lowers a refcount that nothing references beyond the new value;
//! - fixing a corruption in place raises a refcount to the number of references;
//! - a rebuild writes the new refcount blocks and table past the end of the file, flushes, and only then
//!   switches the header (one sector) to them; the old structures become leaks, freed afterwards;
//! - COPIED flags are corrected only once the refcounts they describe are right;
//! - the dirty and corrupt bits are cleared last, and only when nothing is left to repair;
//! - before anything else, the header is rewritten as QEMU's read-write open rewrites it (unknown autoclear bits
//!   cleared, a stale bitmaps extension removed), flushed before the clusters that leaves leaked are freed.

mod counts;
mod layout;
mod metadata;
mod problem;
mod refcounts;
mod references;
mod repair;
mod trust;
mod walk;

pub(crate) use counts::Paged;
pub use metadata::{metadata_ranges, MetadataRange};
pub use problem::{Problem, Referrer, Severity, Structure};
pub(crate) use references::references;
pub use trust::{distrust, Distrust, RefcountSlot};

use crate::block::BlockDevice;
use crate::error::Result;
use layout::Layout;
use refcounts::{Implied, Stored};
use walk::Walk;

/// What a check may repair, as `qemu-img check -r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only look; never write.
    #[default]
    None,
    /// Lower refcounts that are higher than the references (`-r leaks`). First, as QEMU's read-write open does,
    /// clear unknown autoclear bits and remove a bitmaps extension whose autoclear bit is clear (its clusters are
    /// then leaks, freed too).
    Leaks,
    /// Also raise refcounts that are too low, rebuild broken refcount structures, correct COPIED flags, and
    /// clear the dirty and corrupt bits (`-r all`).
    All,
}

impl Repair {
    fn leaks(self) -> bool {
        self != Repair::None
    }

    fn all(self) -> bool {
        self == Repair::All
    }
}

/// Findings kept in [`CheckReport::problems`]; the rest are only counted.
pub const MAX_PROBLEMS: usize = 10_000;

/// What a check found and fixed. Field names follow `qemu-img check --output=json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Things the check could not examine.
    pub check_errors: u64,
    /// Corruptions left in the image.
    pub corruptions: u64,
    /// Leaked clusters left in the image.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters allocated in the active L1 tree.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters not contiguous with their predecessor in the same L2 table.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Byte offset just past the last cluster in use.
    pub image_end_offset: u64,
    /// The findings, in the order found (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
    /// Findings beyond [`MAX_PROBLEMS`], counted but not kept.
    pub problems_omitted: u64,
}

impl CheckReport {
    /// No corruptions, no leaks and no check errors remain.
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }

    /// `qemu-img check`'s exit code for this report: 1 when the check could not complete, 2 for corruptions, 3 for
    /// leaks only, 0 for a clean image.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    fn note(&mut self, problem: Problem) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        } else {
            self.problems_omitted += 1;
        }
    }

    /// Records a finding and counts it by its severity.
    fn found(&mut self, problem: Problem) {
        match problem.severity() {
            Severity::Corruption => self.corruptions += 1,
            Severity::Leak => self.leaks += 1,
            Severity::CheckError => self.check_errors += 1,
            Severity::Detail => {}
        }
        self.note(problem);
    }
}

/// Checks the qcow2 image on `dev`, repairing what `repair` allows.
///
/// With [`Repair::None`] nothing is written. Time and memory follow what the metadata references and the
/// refcount blocks describe, not the file's length (a sparse file of terabytes checks as fast as a small one) nor
/// what its header claims.
///
/// # Errors
/// The check could not run at all: the header fails validation, needs an unsupported feature or has trusted
/// bitmaps that break QEMU's rules (QEMU refuses to open such an image too), the device failed, or memory for the
/// counts ran out (`Io`, out of memory). Everything else is a finding in the report.
pub fn check<D: BlockDevice>(dev: &D, repair: Repair) -> Result<CheckReport> {
    run(dev, repair)
}

/// [`check`] without repairing, on a device seen through the trait (the engine's own device, settled).
pub(crate) fn check_dyn(dev: &dyn BlockDevice) -> Result<CheckReport> {
    run(dev, Repair::None)
}

/// The first pass: walk and count. Returns the counts, the walk's findings and whether a rebuild is called for.
struct Pass {
    implied: Implied,
    problems: Vec<crate::check::Problem>,
    stats: walk::FragStats,
    incomplete: bool,
    rebuild: bool,
    points_past_end: bool,
}

fn count(dev: &dyn BlockDevice, layout: &Layout) -> Result<Pass> {
    let mut implied = Implied::new(layout);
    let mut walk = Walk::new(dev, layout, true);
    walk.run(&mut implied)?;
    implied.allocated()?;
    let mut problems = walk.problems;
    problems.append(&mut implied.problems);
    Ok(Pass {
        implied,
        problems,
        stats: walk.stats,
        incomplete: walk.incomplete,
        rebuild: walk.rebuild,
        points_past_end: walk.points_past_end,
    })
}

/// Compares stored refcounts with the implied ones, fixing what `repair` allows. Returns the highest cluster in
/// use and whether a rebuild is called for (a referenced cluster with refcount 0).
fn compare(
    stored: &mut Stored<'_>,
    implied: &Implied,
    repair: Repair,
    report: &mut CheckReport,
) -> Result<(u64, bool)> {
    let (mut highest, mut rebuild) = (0, false);
    // Only where something is referenced or a refcount block is allocated can the two sides differ: elsewhere
    // both are zero. Looking there alone keeps the time of a check of a sparse file to what it holds.
    let mut ranges: Vec<(u64, u64)> = implied.page_starts().map(|start| (start, counts::PAGE)).collect();
    ranges.extend(stored.described_ranges());
    for cluster in counts::merged(ranges, implied.len()).into_iter().flat_map(|(lo, hi)| lo..hi) {
        let references = implied.get(cluster);
        let value = match stored.get(cluster)? {
            Ok(value) => value,
            Err(e) => {
                report.found(Problem::RefcountUnreadable { cluster, table_index: e.table_index });
                continue;
            }
        };
        if value > 0 || references > 0 {
            highest = cluster;
        }
        if value == references {
            continue;
        }
        if value == 0 {
            rebuild = true;
        } else if value > references && repair.leaks() {
            stored.set(cluster, references)?;
            report.leaks_fixed += 1;
            report.note(Problem::Repaired(Box::new(Problem::RefcountMismatch { cluster, stored: value, references })));
            continue;
        } else if value < references && repair.all() {
            stored.set(cluster, references)?;
            report.corruptions_fixed += 1;
            report.note(Problem::Repaired(Box::new(Problem::RefcountMismatch { cluster, stored: value, references })));
            continue;
        }
        report.found(Problem::RefcountMismatch { cluster, stored: value, references });
    }
    stored.write_back()?;
    Ok((highest, rebuild))
}

/// The second walk, run only when clusters are over-referenced or shared by structures that may not share:
/// names every pointer to each of them.
fn name_referrers(dev: &dyn BlockDevice, layout: &Layout, implied: &Implied, report: &mut CheckReport) -> Result<()> {
    let mut wanted = implied.overlapping.clone();
    for problem in &report.problems {
        if let Problem::RefcountMismatch { cluster, stored, references } = *problem {
            if references > stored && references > 1 {
                wanted.insert(cluster);
            }
        }
        if wanted.len() >= 1000 {
            break;
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let mut found = refcounts::referrers(dev, layout, &wanted)?;
    for cluster in wanted {
        if let Some(referrers) = found.remove(&cluster) {
            if referrers.len() > 1 {
                report.note(Problem::SharedCluster { offset: cluster << layout.geo.cluster_bits, referrers });
            }
        }
    }
    Ok(())
}

fn run(dev: &dyn BlockDevice, requested: Repair) -> Result<CheckReport> {
    let mut layout = Layout::read(dev, requested.all())?;
    let stale_bitmaps = repair::has_stale_bitmaps(&layout.header);
    // A repair opens the image read-write, and QEMU's read-write open rewrites the header before its check.
    let rewritten = requested.leaks() && repair::rewrite_header_as_qemu_opens_it(dev, &mut layout)?;
    let mut report = CheckReport {
        total_clusters: layout.header.size.div_ceil(layout.geo.cluster_size()),
        ..CheckReport::default()
    };
    if stale_bitmaps {
        report.note(Problem::StaleBitmaps { removed: rewritten });
    }
    let pass = count(dev, &layout)?;
    // With part of the metadata unread, the implied counts are too low: any refcount repair could free clusters
    // still in use. Only the dirty and corrupt bits stay as they are, too.
    let repair = if pass.incomplete { Repair::None } else { requested };
    if pass.incomplete && requested != Repair::None {
        report.note(Problem::RepairRefused);
    }
    report.allocated_clusters = pass.stats.allocated;
    report.fragmented_clusters = pass.stats.fragmented;
    report.compressed_clusters = pass.stats.compressed;
    for problem in pass.problems {
        report.found(problem);
    }
    let structural = report.clone();

    // Look first, without fixing: a rebuild replaces in-place fixes.
    let (mut highest, zero_refcount) =
        compare(&mut Stored::new(dev, &layout), &pass.implied, Repair::None, &mut report)?;
    let rebuild = pass.rebuild || zero_refcount;
    // A rebuild writes past the end of the file; where metadata already points there, QEMU refuses too.
    if rebuild && repair.all() && !pass.incomplete && !pass.points_past_end {
        let before = report.clone();
        repair::rebuild_refcounts(dev, &mut layout, &pass.implied)?;
        // Everything is counted afresh against the new structures; the old ones are now leaks, freed at once.
        let again = count(dev, &layout)?;
        let mut fresh = CheckReport::default();
        for problem in again.problems {
            fresh.found(problem);
        }
        let mut leak_fix = CheckReport::default();
        let (h, still_broken) = compare(&mut Stored::new(dev, &layout), &again.implied, Repair::Leaks, &mut leak_fix)?;
        highest = h;
        if still_broken || leak_fix.corruptions > 0 {
            fresh.check_errors += 1;
            fresh.note(Problem::NeedsRebuild);
        }
        report.corruptions = fresh.corruptions + leak_fix.corruptions;
        report.check_errors = before.check_errors + fresh.check_errors;
        report.corruptions_fixed += before.corruptions.saturating_sub(report.corruptions);
        report.leaks_fixed += before.leaks;
        report.leaks = leak_fix.leaks;
        report.problems = before.problems;
        report.problems_omitted = before.problems_omitted;
    } else if repair.leaks() && rebuild {
        // QEMU stops repairing here too: fixing counts in place cannot repair a refcount structure that needs
        // rebuilding. What is found is still counted; nothing more is written.
        report.found(Problem::NeedsRebuild);
    } else if repair.leaks() && (report.leaks > 0 || report.corruptions > 0) {
        report = structural;
        highest = compare(&mut Stored::new(dev, &layout), &pass.implied, repair, &mut report)?.0;
    }
    if report.corruptions > 0 || !pass.implied.overlapping.is_empty() {
        name_referrers(dev, &layout, &pass.implied, &mut report)?;
    }

    // Snapshot table entries are judged after the refcounts, as QEMU does, and rewritten last.
    let defects = layout.snapshot_defects.len() as u64;
    for defect in &layout.snapshot_defects {
        report.found(Problem::Snapshot(*defect));
    }

    let copied_repair = match repair {
        _ if report.check_errors > 0 && rebuild => false,
        Repair::All => true,
        Repair::Leaks => report.check_errors == 0 && report.corruptions == 0 && report.leaks == 0,
        Repair::None => false,
    };
    repair::copied_flags(dev, &layout, copied_repair, &mut report)?;
    report.image_end_offset = (highest + 1) * layout.geo.cluster_size();

    let only_snapshot_defects_left = report.check_errors == 0 && report.corruptions == defects;
    if repair != Repair::None && only_snapshot_defects_left {
        repair::mark_clean(dev, &layout)?;
    }
    if repair.all() && defects > 0 && only_snapshot_defects_left && repair::rewrite_snapshot_table(dev, &layout)? {
        report.corruptions -= defects;
        report.corruptions_fixed += defects;
        for defect in &layout.snapshot_defects {
            report.note(Problem::Repaired(Box::new(Problem::Snapshot(*defect))));
        }
    }
    if repair != Repair::None {
        dev.flush()?;
        // What is left is what a fresh check finds: the counts of a repair are never a promise.
        let after = run(dev, Repair::None)?;
        // A repair that could not run (a rebuild refused) stays a check error even though the image holds none.
        report.check_errors = after.check_errors.max(report.check_errors);
        report.corruptions = after.corruptions;
        report.leaks = after.leaks;
        report.image_end_offset = after.image_end_offset;
        for problem in after.problems.into_iter().filter(|p| p.severity() != Severity::Detail) {
            if !report.problems.contains(&problem) {
                report.note(problem);
            }
        }
    }
    Ok(report)
}
