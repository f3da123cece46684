//! The mutual-exclusion checker's records and their analysis, shared by the
//! `mutex_checker` binary (which runs the workers and the faults) and the
//! tests that prove the analysis catches what it must.
//!
//! Every worker process records each critical section it ran as a
//! [`Section`]: the key, who ran it, the fencing token, and three instants
//! of one clock, `CLOCK_MONOTONIC`, which every process on one Linux
//! machine shares (see [`monotonic_ns`]). [`analyze`] then checks, per key:
//!
//! - no two sections overlap in their *belief* interval, from the moment
//!   `acquire` returned to the earlier of the moment the work stopped
//!   (before `release` was called) and the moment the lost signal fired;
//! - a lease that was lost was signalled no later than the moment another
//!   owner acquired the key (a violation of this is also an overlap, and is
//!   counted apart so the report says which guarantee broke);
//! - fencing tokens strictly increase in acquisition order.

use std::collections::BTreeMap;

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

/// What `release()` answered at the end of a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    /// Released while still held.
    Ok,
    /// `Error::Lost`: the lease was gone before the release.
    Lost,
    /// Another error (Redis unreachable): the key expires by itself.
    Error,
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
    /// The fencing token of the acquisition.
    pub fence: u64,
    /// When `acquire` returned the guard.
    pub acquired: u64,
    /// When the section stopped believing it held the lock: its work ended
    /// (recorded before `release` was called) or the lost signal fired.
    pub end: u64,
    /// When the lost signal was observed during the section, if it was.
    pub lost: Option<u64>,
    /// The lost reason, if the signal fired (`Debug` of `LostReason`).
    pub reason: Option<String>,
    /// What `release` answered.
    pub release: Release,
}

impl Section {
    /// The end of the belief interval: the earlier of `end` and `lost`.
    pub fn believed_until(&self) -> u64 {
        self.lost.map_or(self.end, |l| l.min(self.end))
    }

    /// True when the lease was lost, whether the signal fired during the
    /// section or `release` found it gone.
    pub fn was_lost(&self) -> bool {
        self.lost.is_some() || self.release == Release::Lost
    }
}

/// Which guarantee a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// `second` was acquired while `first` still believed it held the key,
    /// and `first`'s lease was never reported lost.
    Overlap,
    /// `first`'s lease was lost, but its lost signal came after `second`
    /// acquired the key (or only at release).
    LateLossSignal,
    /// `second` was acquired after `first` with a fencing token that is not
    /// greater.
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
            .saturating_sub(self.second.acquired)
    }
}

/// What [`analyze`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    /// How many sections were checked.
    pub sections: u64,
    /// Sections per key.
    pub per_key: BTreeMap<String, u64>,
    /// Lost signals observed during sections, by reason.
    pub losses: BTreeMap<String, u64>,
    /// Sections whose `release` reported the lease lost without the signal
    /// having fired during the section (the signal came between the end of
    /// the work and the release).
    pub lost_at_release: u64,
    /// Sections whose `release` failed for another reason.
    pub release_errors: u64,
    /// Every broken guarantee.
    pub violations: Vec<Violation>,
}

impl Analysis {
    /// Violations of one kind.
    pub fn count(&self, kind: ViolationKind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

/// Checks mutual exclusion, the timeliness of lost signals, and fencing
/// order over every recorded section; see the module docs.
pub fn analyze(sections: &[Section]) -> Analysis {
    let mut out = Analysis {
        sections: sections.len() as u64,
        ..Analysis::default()
    };
    let mut by_key: BTreeMap<&str, Vec<&Section>> = BTreeMap::new();
    for s in sections {
        by_key.entry(&s.key).or_default().push(s);
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
        // The earlier section whose belief lasted longest: if a later one
        // started inside any earlier belief, it started inside this one.
        let mut widest: Option<&Section> = None;
        let mut previous: Option<&Section> = None;
        for &s in &list {
            if let Some(w) = widest {
                if s.acquired < w.believed_until() {
                    let kind = if w.was_lost() {
                        ViolationKind::LateLossSignal
                    } else {
                        ViolationKind::Overlap
                    };
                    out.violations.push(Violation {
                        kind,
                        first: w.clone(),
                        second: s.clone(),
                    });
                }
            }
            if let Some(p) = previous {
                if s.fence <= p.fence {
                    out.violations.push(Violation {
                        kind: ViolationKind::FenceNotIncreasing,
                        first: p.clone(),
                        second: s.clone(),
                    });
                }
            }
            if widest.is_none_or(|w| s.believed_until() > w.believed_until()) {
                widest = Some(s);
            }
            previous = Some(s);
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
            fence,
            acquired,
            end,
            lost: None,
            reason: None,
            release: Release::Ok,
        }
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
    fn sections_round_trip_through_json() {
        let s = lost_at(section(3, 42, 7, 9), 8);
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
