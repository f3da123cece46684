//! The safety checker's records and their analysis, shared by the `checker`
//! binary (which draws a configuration, runs the workers and the faults) and
//! the tests that prove the analysis catches what it must.
//!
//! Every worker process records each critical section it ran as a
//! [`Section`]: the key, who ran it, what it held (a mutex, a semaphore
//! permit, a read or a write lock), the fencing token, and instants of one
//! clock, `CLOCK_MONOTONIC`, which every process on one Linux machine shares
//! (see [`monotonic_ns`]). A section's *belief* interval runs from the moment
//! `acquire` returned to the earlier of the moment the work stopped (before
//! `release` was called, or the guard was dropped) and the moment the lost
//! signal fired. [`analyze`] then checks, per key:
//!
//! - a mutex or a write lock is acquired only while nobody else believes it
//!   holds the key; a read lock only while no writer does; a semaphore permit
//!   only while fewer than `max` others hold one (the smallest `max` among
//!   the holders, so a process that disagrees on `max` cannot squeeze in);
//! - a conflict with a lease that was lost, but whose lost signal came after
//!   the other acquisition (or only at release), is counted apart, as a late
//!   lost signal, so the report says which guarantee broke;
//! - fencing tokens: an acquisition that completed before another one was
//!   even requested has the smaller token; a mutex or a write lock has a
//!   larger token than every acquisition before it, and a smaller one than
//!   every acquisition after it (so no token of an exclusive holder is ever
//!   given twice). Shared holders whose acquisitions overlapped in time are
//!   in no order, and may share a token on Redlock.
//!
//! [`find_stranded`] checks what the coordinator saw in Redis while the
//! workers ran ([`Held`] samples): a lease that stays in Redis for a while
//! after its worker stopped believing in it (or without any acquisition of
//! its worker to account for it, as when a cancelled acquire leaks its
//! token) is a stranded lock that blocks everyone until it expires.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// Nanoseconds on `CLOCK_MONOTONIC`: comparable across the processes of one
/// machine (unlike [`std::time::Instant`], whose raw value is private).
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs * 1_000_000_000 + nanos
        }
        // CLOCK_MONOTONIC exists on every Linux; nothing sensible to do otherwise.
        Err(e) => panic!("clock_gettime(CLOCK_MONOTONIC) failed: {e}"),
    }
}

/// What a section held.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A mutex.
    #[default]
    Mutex,
    /// A semaphore permit (see [`Section::max`]).
    Semaphore,
    /// A reader-writer lock's read side.
    Read,
    /// A reader-writer lock's write side.
    Write,
}

impl Access {
    /// True for what must be alone: a mutex, a writer.
    pub fn exclusive(self) -> bool {
        matches!(self, Access::Mutex | Access::Write)
    }

    /// True when `self`, acquired, may not sit beside `other` (semaphore
    /// permits are counted instead; see [`analyze`]).
    fn conflicts_with(self, other: Access) -> bool {
        match self {
            Access::Mutex | Access::Write => true,
            Access::Read => other.exclusive(),
            Access::Semaphore => false,
        }
    }
}

/// How a section ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    /// Released while still held.
    Ok,
    /// `Error::Lost`: the lease was gone before the release.
    Lost,
    /// Another error (Redis unreachable): the key expires by itself.
    Error,
    /// The guard was dropped instead of released (the locker releases it in
    /// the background).
    Dropped,
    /// The `release` future was dropped before it finished.
    Cancelled,
    /// The task was dropped while holding the guard (its runtime shut down).
    Abandoned,
}

/// One critical section, as the worker that ran it recorded it. Times are
/// [`monotonic_ns`] readings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The lock's key.
    pub key: String,
    /// The worker process (0-based).
    pub worker: u32,
    /// The task within the worker.
    pub task: u32,
    /// What was held.
    #[serde(default)]
    pub access: Access,
    /// For a semaphore permit: the `max` this worker asked for.
    #[serde(default)]
    pub max: Option<u32>,
    /// The fencing token of the acquisition.
    pub fence: u64,
    /// When the acquisition was requested (`acquire` called).
    #[serde(default)]
    pub requested: u64,
    /// When `acquire` returned the guard.
    pub acquired: u64,
    /// When the section stopped believing it held the lock: its work ended
    /// (recorded before `release` was called) or the lost signal fired.
    pub end: u64,
    /// When the lost signal was observed during the section, if it was.
    pub lost: Option<u64>,
    /// The lost reason, if the signal fired (`Debug` of `LostReason`).
    pub reason: Option<String>,
    /// How the section ended.
    pub release: Release,
}

impl Section {
    /// The end of the belief interval: the earlier of `end` and `lost`.
    pub fn believed_until(&self) -> u64 {
        self.lost.map_or(self.end, |l| l.min(self.end))
    }

    /// True when the lease was lost, whether the signal fired during the
    /// section or `release` found it gone. A lease given up on purpose
    /// (`MaxHold`, `Closed`) was not lost: it was valid until then.
    pub fn was_lost(&self) -> bool {
        match self.reason.as_deref() {
            Some("MaxHold" | "Closed") => false,
            Some(_) => true,
            None => self.release == Release::Lost,
        }
    }

    fn same(&self, other: &Section) -> bool {
        (self.worker, self.task, self.acquired) == (other.worker, other.task, other.acquired)
    }
}

/// Which guarantee a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// `second` was acquired while `first` still believed it held the key
    /// in a way `second` excludes (a mutex or a writer beside anyone, a
    /// reader beside a writer), and `first`'s lease was never reported lost.
    Overlap,
    /// `second` took a semaphore permit while `first` and others held so
    /// many that some holder's `max` was exceeded, none of them lost.
    TooManyHolders,
    /// `first`'s lease was lost, but its lost signal came after `second`
    /// acquired the key (or only at release): without that lease the
    /// acquisition would have been fine.
    LateLossSignal,
    /// `second`'s fencing token is not greater than `first`'s although
    /// `second` came after it (or the two tokens are equal).
    FenceNotIncreasing,
}

/// A broken guarantee between two sections on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// What broke.
    pub kind: ViolationKind,
    /// The earlier acquisition.
    pub first: Section,
    /// The later acquisition.
    pub second: Section,
}

impl Violation {
    /// How long the two belief intervals overlapped, in nanoseconds (zero
    /// for a fencing violation between disjoint sections).
    pub fn overlap_ns(&self) -> u64 {
        self.first
            .believed_until()
            .min(self.second.believed_until())
            .saturating_sub(self.second.acquired.max(self.first.acquired))
    }
}

/// What [`analyze`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    /// How many sections were checked.
    pub sections: u64,
    /// Sections per key.
    pub per_key: BTreeMap<String, u64>,
    /// Sections per kind of access.
    pub per_access: BTreeMap<Access, u64>,
    /// How sections ended.
    pub endings: BTreeMap<Release, u64>,
    /// Lost signals observed during sections, by reason.
    pub losses: BTreeMap<String, u64>,
    /// Sections whose `release` reported the lease lost without the signal
    /// having fired during the section (the signal came between the end of
    /// the work and the release).
    pub lost_at_release: u64,
    /// Sections whose `release` failed for another reason.
    pub release_errors: u64,
    /// The most holders seen at once on one semaphore key.
    pub max_concurrent_permits: u64,
    /// The most readers seen at once on one reader-writer key.
    pub max_concurrent_readers: u64,
    /// Every broken guarantee.
    pub violations: Vec<Violation>,
}

impl Analysis {
    /// Violations of one kind.
    pub fn count(&self, kind: ViolationKind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }

    /// Adds another analysis (of other keys, or another run) to this one.
    pub fn merge(&mut self, other: Analysis) {
        self.sections += other.sections;
        for (k, v) in other.per_key {
            *self.per_key.entry(k).or_default() += v;
        }
        for (k, v) in other.per_access {
            *self.per_access.entry(k).or_default() += v;
        }
        for (k, v) in other.endings {
            *self.endings.entry(k).or_default() += v;
        }
        for (k, v) in other.losses {
            *self.losses.entry(k).or_default() += v;
        }
        self.lost_at_release += other.lost_at_release;
        self.release_errors += other.release_errors;
        self.max_concurrent_permits = self
            .max_concurrent_permits
            .max(other.max_concurrent_permits);
        self.max_concurrent_readers = self
            .max_concurrent_readers
            .max(other.max_concurrent_readers);
        self.violations.extend(other.violations);
    }
}

/// Checks exclusion, the timeliness of lost signals, and fencing order over
/// every recorded section; see the module docs.
pub fn analyze(sections: &[Section]) -> Analysis {
    let mut out = Analysis {
        sections: sections.len() as u64,
        ..Analysis::default()
    };
    let mut by_key: BTreeMap<&str, Vec<&Section>> = BTreeMap::new();
    for s in sections {
        by_key.entry(&s.key).or_default().push(s);
        *out.per_access.entry(s.access).or_default() += 1;
        *out.endings.entry(s.release).or_default() += 1;
        if let Some(reason) = &s.reason {
            *out.losses.entry(reason.clone()).or_default() += 1;
        } else if s.release == Release::Lost {
            out.lost_at_release += 1;
        }
        if s.release == Release::Error {
            out.release_errors += 1;
        }
    }
    for (key, mut list) in by_key {
        out.per_key.insert(key.to_owned(), list.len() as u64);
        list.sort_by_key(|s| (s.acquired, s.fence));
        check_exclusion(&list, &mut out);
        check_fences(&list, &mut out);
    }
    out
}

/// Sweeps one key's sections in acquisition order, keeping those whose
/// belief is still open, and checks each acquisition against them.
fn check_exclusion(list: &[&Section], out: &mut Analysis) {
    let mut open: Vec<&Section> = Vec::new();
    for &s in list {
        open.retain(|o| o.believed_until() > s.acquired);
        if s.access == Access::Semaphore {
            let holders: Vec<&Section> = open
                .iter()
                .copied()
                .filter(|o| o.access == Access::Semaphore)
                .collect();
            out.max_concurrent_permits = out.max_concurrent_permits.max(holders.len() as u64 + 1);
            let limit = holders
                .iter()
                .chain(std::iter::once(&s))
                .filter_map(|h| h.max)
                .min()
                .map_or(u64::MAX, u64::from);
            let alive: Vec<&Section> = holders.iter().copied().filter(|h| !h.was_lost()).collect();
            if alive.len() as u64 + 1 > limit {
                out.violations.push(Violation {
                    kind: ViolationKind::TooManyHolders,
                    first: alive[0].clone(),
                    second: s.clone(),
                });
            } else if holders.len() as u64 + 1 > limit {
                let late = holders.iter().find(|h| h.was_lost()).unwrap_or(&holders[0]);
                out.violations.push(Violation {
                    kind: ViolationKind::LateLossSignal,
                    first: (*late).clone(),
                    second: s.clone(),
                });
            }
        } else {
            if s.access == Access::Read {
                let readers = open.iter().filter(|o| o.access == Access::Read).count();
                out.max_concurrent_readers = out.max_concurrent_readers.max(readers as u64 + 1);
            }
            let conflicting = open.iter().filter(|o| s.access.conflicts_with(o.access));
            // The conflicting holder that believed longest, preferring one
            // that never learned it lost the lease.
            let worst = conflicting.max_by_key(|o| (!o.was_lost(), o.believed_until()));
            if let Some(first) = worst {
                out.violations.push(Violation {
                    kind: if first.was_lost() {
                        ViolationKind::LateLossSignal
                    } else {
                        ViolationKind::Overlap
                    },
                    first: (*first).clone(),
                    second: s.clone(),
                });
            }
        }
        open.push(s);
    }
}

/// The fencing checks of the module docs, one violation at most per later
/// section.
fn check_fences(list: &[&Section], out: &mut Analysis) {
    let mut flagged: Vec<(&Section, &Section)> = Vec::new();
    // Equal tokens, where one is a mutex or a writer. (Two shared holders
    // whose acquisitions overlapped in time are in no order, and Redlock,
    // which takes the largest of a majority's tokens, can give both the
    // same one; ordered shared holders are checked below.)
    let mut seen: BTreeMap<u64, Vec<&Section>> = BTreeMap::new();
    for &s in list {
        let same = seen.entry(s.fence).or_default();
        if let Some(&earlier) = same
            .iter()
            .find(|e| e.access.exclusive() || s.access.exclusive())
        {
            flagged.push((earlier, s));
        }
        same.push(s);
    }
    // In acquisition order, a mutex or writer above everything before it,
    // and everything above the last such.
    let mut top: Option<&Section> = None;
    let mut top_exclusive: Option<&Section> = None;
    for &s in list {
        if s.access.exclusive() {
            if let Some(t) = top.filter(|t| t.fence >= s.fence) {
                flagged.push((t, s));
            }
        }
        if let Some(t) = top_exclusive.filter(|t| t.fence >= s.fence) {
            flagged.push((t, s));
        }
        if top.is_none_or(|t| s.fence > t.fence) {
            top = Some(s);
        }
        if s.access.exclusive() && top_exclusive.is_none_or(|t| s.fence > t.fence) {
            top_exclusive = Some(s);
        }
    }
    // Whatever the kind: acquired before another was requested means a
    // smaller token.
    let mut by_request: Vec<&Section> = list.to_vec();
    by_request.sort_by_key(|s| s.requested);
    let mut done = 0;
    let mut top: Option<&Section> = None;
    for &s in &by_request {
        while done < list.len() && list[done].acquired < s.requested {
            let d = list[done];
            if top.is_none_or(|t| d.fence > t.fence) {
                top = Some(d);
            }
            done += 1;
        }
        if let Some(t) = top.filter(|t| t.fence >= s.fence) {
            flagged.push((t, s));
        }
    }
    let mut reported: HashSet<(u32, u32, u64)> = HashSet::new();
    for (first, second) in flagged {
        if first.same(second) {
            continue;
        }
        if reported.insert((second.worker, second.task, second.acquired)) {
            out.violations.push(Violation {
                kind: ViolationKind::FenceNotIncreasing,
                first: first.clone(),
                second: second.clone(),
            });
        }
    }
}

/// One lease seen in Redis by the coordinator's sampler: the holder's token
/// under a lock's key on one server, first and last seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The server (0-based).
    pub server: usize,
    /// The lock's key (the user's name).
    pub key: String,
    /// The holder's token (it starts with the worker's owner tag `w<id>:`).
    pub token: String,
    /// First seen ([`monotonic_ns`]).
    pub first: u64,
    /// Last seen ([`monotonic_ns`]).
    pub last: u64,
}

impl Held {
    /// The worker whose owner tag starts the token.
    pub fn worker(&self) -> Option<u32> {
        self.token
            .strip_prefix('w')?
            .split(':')
            .next()?
            .parse()
            .ok()
    }
}

/// A lease that stayed in Redis although nobody believed they held it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stranded {
    /// What was seen.
    pub held: Held,
    /// The section of the same worker on the same key closest before it,
    /// if any.
    pub nearest: Option<Section>,
}

/// Leases seen in Redis for at least `min_ns` that no section accounts for:
/// a section of the token's worker on the same key, from its request to
/// its end plus `grace_ns` (plus the worker's expiry, from `expiry_ns`, when
/// the release failed or the task was dropped with the guard). Leases seen
/// while `excused` (fault windows) are skipped.
pub fn find_stranded(
    held: &[Held],
    sections: &[Section],
    excused: &[(u64, u64)],
    min_ns: u64,
    grace_ns: u64,
    expiry_ns: impl Fn(u32) -> u64,
) -> Vec<Stranded> {
    let mut out = Vec::new();
    for h in held {
        if h.last.saturating_sub(h.first) < min_ns {
            continue;
        }
        if excused.iter().any(|&(a, b)| h.first <= b && a <= h.last) {
            continue;
        }
        let Some(worker) = h.worker() else { continue };
        let mine = sections
            .iter()
            .filter(|s| s.worker == worker && s.key == h.key);
        let covered = mine.clone().any(|s| {
            let after = match s.release {
                Release::Error | Release::Abandoned => grace_ns + expiry_ns(worker),
                _ => grace_ns,
            };
            s.requested <= h.first && h.last <= s.end + after
        });
        if !covered {
            let nearest = mine
                .filter(|s| s.requested <= h.first)
                .max_by_key(|s| s.requested)
                .cloned();
            out.push(Stranded {
                held: h.clone(),
                nearest,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(worker: u32, fence: u64, acquired: u64, end: u64) -> Section {
        Section {
            key: "k".into(),
            worker,
            task: 0,
            access: Access::Mutex,
            max: None,
            fence,
            requested: acquired,
            acquired,
            end,
            lost: None,
            reason: None,
            release: Release::Ok,
        }
    }

    fn with(mut s: Section, access: Access, max: Option<u32>) -> Section {
        s.access = access;
        s.max = max;
        s
    }

    fn lost_at(mut s: Section, at: u64) -> Section {
        s.lost = Some(at);
        s.end = s.end.min(at);
        s.reason = Some("DeadlineMissed".into());
        s.release = Release::Lost;
        s
    }

    #[test]
    fn disjoint_sections_with_rising_fences_pass() {
        let a = analyze(&[
            section(0, 1, 0, 10),
            section(1, 2, 10, 20),
            section(0, 3, 25, 30),
        ]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.sections, 3);
    }

    #[test]
    fn a_section_starting_inside_another_is_an_overlap() {
        let a = analyze(&[section(0, 1, 0, 10), section(1, 2, 9, 20)]);
        assert_eq!(a.count(ViolationKind::Overlap), 1);
        assert_eq!(a.violations[0].overlap_ns(), 1);
    }

    #[test]
    fn an_overlap_with_a_long_earlier_section_is_found_past_shorter_ones() {
        let a = analyze(&[
            section(0, 1, 0, 100),
            lost_at(section(1, 2, 10, 20), 15),
            section(2, 3, 50, 60),
        ]);
        // Both later sections started inside the first one's belief.
        assert_eq!(a.count(ViolationKind::Overlap), 2);
    }

    #[test]
    fn a_loss_signalled_before_the_next_acquisition_is_fine() {
        let a = analyze(&[lost_at(section(0, 1, 0, 100), 40), section(1, 2, 41, 50)]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.losses.get("DeadlineMissed"), Some(&1));
    }

    #[test]
    fn a_loss_signalled_after_the_next_acquisition_is_late() {
        let a = analyze(&[lost_at(section(0, 1, 0, 100), 40), section(1, 2, 39, 50)]);
        assert_eq!(a.count(ViolationKind::LateLossSignal), 1);
        assert_eq!(a.count(ViolationKind::Overlap), 0);
    }

    #[test]
    fn a_loss_found_only_at_release_is_late_if_someone_acquired_meanwhile() {
        let mut first = section(0, 1, 0, 100);
        first.release = Release::Lost;
        let a = analyze(&[first, section(1, 2, 60, 70)]);
        assert_eq!(a.count(ViolationKind::LateLossSignal), 1);
        assert_eq!(a.lost_at_release, 1);
    }

    #[test]
    fn fences_must_rise_in_acquisition_order() {
        let a = analyze(&[section(0, 5, 0, 10), section(1, 5, 20, 30)]);
        assert_eq!(a.count(ViolationKind::FenceNotIncreasing), 1);
        let a = analyze(&[section(0, 7, 0, 10), section(1, 6, 20, 30)]);
        assert_eq!(a.count(ViolationKind::FenceNotIncreasing), 1);
    }

    #[test]
    fn keys_are_checked_apart() {
        let mut other = section(1, 1, 5, 20);
        other.key = "other".into();
        let a = analyze(&[section(0, 1, 0, 10), other]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.per_key.len(), 2);
    }

    #[test]
    fn permits_up_to_max_pass_and_one_more_is_too_many() {
        let sem = |w, f, from, to| with(section(w, f, from, to), Access::Semaphore, Some(2));
        let a = analyze(&[sem(0, 1, 0, 100), sem(1, 2, 10, 100), sem(2, 3, 100, 150)]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.max_concurrent_permits, 2);
        let a = analyze(&[sem(0, 1, 0, 100), sem(1, 2, 10, 100), sem(2, 3, 50, 150)]);
        assert_eq!(a.count(ViolationKind::TooManyHolders), 1);
        assert_eq!(a.max_concurrent_permits, 3);
    }

    #[test]
    fn a_permit_within_its_own_max_is_too_many_for_a_holder_with_a_smaller_max() {
        let a = analyze(&[
            with(section(0, 1, 0, 100), Access::Semaphore, Some(1)),
            with(section(1, 2, 10, 100), Access::Semaphore, Some(2)),
        ]);
        assert_eq!(a.count(ViolationKind::TooManyHolders), 1);
    }

    #[test]
    fn too_many_permits_because_of_a_late_loss_is_a_late_loss() {
        let a = analyze(&[
            with(
                lost_at(section(0, 1, 0, 100), 60),
                Access::Semaphore,
                Some(1),
            ),
            with(section(1, 2, 50, 100), Access::Semaphore, Some(1)),
        ]);
        assert_eq!(a.count(ViolationKind::LateLossSignal), 1);
    }

    #[test]
    fn a_lease_given_up_at_max_hold_was_not_lost_before() {
        let mut first = lost_at(section(0, 1, 0, 100), 40);
        first.reason = Some("MaxHold".into());
        let a = analyze(&[first, section(1, 2, 39, 50)]);
        assert_eq!(a.count(ViolationKind::Overlap), 1);
    }

    #[test]
    fn readers_share_but_a_writer_is_alone() {
        let r = |w, f, from, to| with(section(w, f, from, to), Access::Read, None);
        let wr = |w, f, from, to| with(section(w, f, from, to), Access::Write, None);
        let a = analyze(&[
            r(0, 1, 0, 50),
            r(1, 2, 10, 60),
            wr(2, 3, 60, 80),
            r(0, 4, 80, 90),
        ]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.max_concurrent_readers, 2);
        // A writer beside a reader, and a reader beside a writer.
        let a = analyze(&[r(0, 1, 0, 50), wr(1, 2, 40, 60)]);
        assert_eq!(a.count(ViolationKind::Overlap), 1);
        let a = analyze(&[wr(0, 1, 0, 50), r(1, 2, 40, 60)]);
        assert_eq!(a.count(ViolationKind::Overlap), 1);
    }

    #[test]
    fn readers_fences_need_only_be_unique_among_themselves() {
        let r = |w, f, from, to| with(section(w, f, from, to), Access::Read, None);
        // Two readers whose acquisitions overlapped may return in either order.
        let mut second = r(1, 1, 12, 60);
        second.requested = 5;
        let mut first = r(0, 2, 10, 50);
        first.requested = 6;
        let a = analyze(&[first.clone(), second.clone()]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        // Not if one returned before the other was asked for.
        second.requested = 11;
        let a = analyze(&[first.clone(), second]);
        assert_eq!(a.count(ViolationKind::FenceNotIncreasing), 1);
        // Nor when equal.
        let a = analyze(&[first.clone(), r(1, 2, 70, 80)]);
        assert_eq!(a.count(ViolationKind::FenceNotIncreasing), 1);
        // Concurrent readers may share one (Redlock: the largest of a majority's).
        let mut twin = r(1, 2, 12, 60);
        twin.requested = 5;
        let a = analyze(&[first.clone(), twin]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        // And a writer's token is above the readers' before it.
        let w = with(section(2, 1, 60, 70), Access::Write, None);
        let a = analyze(&[first, w]);
        assert_eq!(a.count(ViolationKind::FenceNotIncreasing), 1);
    }

    #[test]
    fn a_lease_left_in_redis_after_its_section_is_stranded() {
        let held = |token: &str, first, last| Held {
            server: 0,
            key: "k".into(),
            token: token.into(),
            first,
            last,
        };
        let sections = [section(1, 1, 100, 200)];
        let expiry = |_| 1_000;
        // Within its section, or released within the grace: fine.
        let ok = [held("w1:a", 110, 290), held("w1:b", 120, 150)];
        assert!(find_stranded(&ok, &sections, &[], 50, 100, expiry).is_empty());
        // Long after its end, or with no section of its worker at all.
        let bad = [held("w1:a", 110, 400), held("w2:c", 500, 700)];
        let found = find_stranded(&bad, &sections, &[], 50, 100, expiry);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].nearest.as_ref().map(|s| s.fence), Some(1));
        // Too short to matter, or during a fault.
        assert!(find_stranded(&bad, &sections, &[], 1_000, 100, expiry).is_empty());
        assert!(find_stranded(&bad, &sections, &[(0, 1_000)], 50, 100, expiry).is_empty());
        // A failed release leaves the key until it expires.
        let mut failed = section(1, 1, 100, 200);
        failed.release = Release::Error;
        assert!(find_stranded(&bad[..1], &[failed], &[], 50, 100, expiry).is_empty());
    }

    #[test]
    fn sections_round_trip_through_json() {
        let s = with(lost_at(section(3, 42, 7, 9), 8), Access::Semaphore, Some(3));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Section>(&json).unwrap(), s);
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a);
        assert!(a > 0);
    }
}
