//! Whether an image's refcounts may be trusted to tell free clusters from used ones.
//!
//! Work that gives space back because a refcount reads zero (compaction, truncating a free tail, erasing free
//! clusters) destroys data if that zero is wrong: a refcount table entry zeroed, a refcount block lost or
//! overwritten, a table outside the file. Such work asks this judgement first. It is the checker's
//! (`qemu-img check`'s) verdict with leaks tolerated: refcounts higher than the references waste space but free
//! nothing that is in use, while any corruption or any structure the walk could not read refuses.

use std::collections::BTreeSet;
use std::fmt;

use super::layout::Layout;
use super::{run, Problem, Referrer, Repair, Severity, Structure};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::RefcountTableEntry;

/// Where the refcount of one cluster is kept: the refcount table entry that names its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountSlot {
    /// Index of the refcount table entry.
    pub table_index: u64,
    /// File offset of that entry.
    pub entry_at: u64,
    /// Entries the refcount table has; an index at or past this lies beyond the table.
    pub table_entries: u64,
    /// The raw entry (0: no refcount block).
    pub entry: u64,
    /// File offset of the cluster whose refcount it is.
    pub cluster_offset: u64,
}

/// Why the refcounts of an image cannot be trusted: the first finding that refuses trust, with where the
/// refcount it concerns is kept and who points at the cluster, as far as they apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distrust {
    /// The first corruption or check error of the check, in the order the check found them.
    pub problem: Problem,
    /// For a finding about one cluster's refcount: the refcount table entry that holds it.
    pub refcount: Option<RefcountSlot>,
    /// For a referenced cluster: the pointers to it (the first four the walk meets).
    pub referrers: Vec<Referrer>,
    /// Corruptions and check errors found in all.
    pub findings: u64,
}

impl fmt::Display for Distrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.problem, self.refcount) {
            (Problem::RefcountMismatch { cluster, stored, references }, Some(slot)) => write!(
                f,
                "cluster {cluster} (at {:#x}) has refcount {stored} but {references} reference{}",
                slot.cluster_offset,
                if *references == 1 { "" } else { "s" }
            )?,
            (problem, _) => {
                let text = problem.to_string();
                let text = text.strip_prefix("ERROR: ").or_else(|| text.strip_prefix("ERROR ")).unwrap_or(&text);
                f.write_str(text)?;
            }
        }
        for (i, r) in self.referrers.iter().enumerate() {
            f.write_str(if i == 0 { " (" } else { ", " })?;
            match r.target {
                Structure::Header => f.write_str("the header")?,
                target => write!(f, "a {target} named by the pointer at {:#x}", r.at)?,
            }
        }
        if !self.referrers.is_empty() {
            f.write_str(")")?;
        }
        if let Some(slot) = self.refcount {
            write!(
                f,
                "; its refcount belongs in refcount table entry {} (at {:#x}), ",
                slot.table_index, slot.entry_at
            )?;
            let block = RefcountTableEntry(slot.entry).offset_field();
            if slot.table_index >= slot.table_entries {
                write!(f, "past the table's {} entries", slot.table_entries)?;
            } else if block == 0 {
                f.write_str("which names no refcount block")?;
            } else {
                write!(f, "which names the refcount block at {block:#x}")?;
            }
        }
        if self.findings > 1 {
            write!(f, " ({} findings in all)", self.findings)?;
        }
        Ok(())
    }
}

/// Judges the image on `dev`: `Ok(None)` when every cluster the metadata references (active tree, snapshots,
/// bitmaps, the header's tables) has a stored refcount at least its number of references and the whole
/// metadata could be read; otherwise the first reason not to trust them. Nothing is written.
///
/// # Errors
/// The image cannot be checked at all (its header fails validation), or the device fails.
pub fn distrust(dev: &dyn BlockDevice) -> Result<Option<Distrust>> {
    let report = run(dev, Repair::None)?;
    let findings = report.corruptions + report.check_errors;
    if findings == 0 {
        return Ok(None);
    }
    let refuses = |p: &&Problem| matches!(p.severity(), Severity::Corruption | Severity::CheckError);
    let Some(problem) = report.problems.iter().find(refuses).cloned() else {
        // Every kept finding is a detail: the refusing ones were beyond the kept number.
        return Ok(Some(Distrust { problem: Problem::NeedsRebuild, refcount: None, referrers: Vec::new(), findings }));
    };
    let cluster = match problem {
        Problem::RefcountMismatch { cluster, .. } | Problem::RefcountUnreadable { cluster, .. } => Some(cluster),
        _ => None,
    };
    let (mut refcount, mut referrers) = (None, Vec::new());
    if let Some(cluster) = cluster {
        let layout = Layout::read(dev, false)?;
        let table_index = cluster / layout.geo.refcount_block_entries();
        let entry = usize::try_from(table_index).ok().and_then(|i| layout.reftable.get(i)).copied().unwrap_or(0);
        refcount = Some(RefcountSlot {
            table_index,
            entry_at: layout.header.refcount_table_offset.saturating_add(table_index.saturating_mul(8)),
            table_entries: layout.reftable.len() as u64,
            entry,
            cluster_offset: cluster << layout.geo.cluster_bits,
        });
        referrers = referrers_of(dev, &layout, cluster)?;
    }
    Ok(Some(Distrust { problem, refcount, referrers, findings }))
}

/// Pointers to one cluster a [`Distrust`] names.
const REFERRERS_NAMED: usize = 4;

/// The pointers to `cluster`, at most [`REFERRERS_NAMED`] of them.
fn referrers_of(dev: &dyn BlockDevice, layout: &Layout, cluster: u64) -> Result<Vec<Referrer>> {
    let mut found =
        super::refcounts::referrers(dev, layout, &BTreeSet::from([cluster]))?.remove(&cluster).unwrap_or_default();
    found.truncate(REFERRERS_NAMED);
    Ok(found)
}
