//! The bounded-frequency runner: decides, from the times it is given (no
//! clock inside), when the sync loop runs and whether that sync is full.
//! Bursts coalesce (min interval), a full resync with prune runs at least
//! every max interval, a failed sync is retried after the retry interval and
//! forces the next one to be full.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Only what changed.
    Incremental,
    /// Everything, pruning what is not desired.
    Full,
}

#[derive(Debug, Clone)]
pub struct Runner {
    min_interval: Duration,
    max_interval: Duration,
    retry_interval: Duration,
    last_sync: Option<Instant>,
    last_full: Option<Instant>,
    pending: bool,
    failed_at: Option<Instant>,
}

impl Runner {
    pub fn new(min_interval: Duration, max_interval: Duration, retry_interval: Duration) -> Runner {
        Runner {
            min_interval,
            max_interval,
            retry_interval,
            last_sync: None,
            last_full: None,
            pending: false,
            failed_at: None,
        }
    }

    /// Something changed: a sync is wanted.
    pub fn request(&mut self) {
        self.pending = true;
    }

    /// What to do at `now`, if anything.
    pub fn due(&self, now: Instant) -> Option<SyncKind> {
        if let Some(failed) = self.failed_at {
            return (now >= failed + self.retry_interval).then_some(SyncKind::Full);
        }
        let full_due = self.last_full.is_none_or(|t| now >= t + self.max_interval);
        if full_due {
            return Some(SyncKind::Full);
        }
        let spaced = self.last_sync.is_none_or(|t| now >= t + self.min_interval);
        (self.pending && spaced).then_some(SyncKind::Incremental)
    }

    /// How long until [`Runner::due`] may answer something new.
    pub fn wait(&self, now: Instant) -> Duration {
        let at = if let Some(failed) = self.failed_at {
            failed + self.retry_interval
        } else {
            let full = self.last_full.map_or(now, |t| t + self.max_interval);
            if self.pending {
                full.min(self.last_sync.map_or(now, |t| t + self.min_interval))
            } else {
                full
            }
        };
        at.saturating_duration_since(now)
    }

    /// A sync of `kind` ran at `now` and succeeded or not.
    pub fn done(&mut self, kind: SyncKind, now: Instant, ok: bool) {
        self.last_sync = Some(now);
        if ok {
            self.pending = false;
            self.failed_at = None;
            if kind == SyncKind::Full {
                self.last_full = Some(now);
            }
        } else {
            self.failed_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn runner() -> Runner {
        Runner::new(100 * MS, 30_000 * MS, 1_000 * MS)
    }

    #[test]
    fn first_sync_is_full_then_changes_are_spaced() {
        let t0 = Instant::now();
        let mut r = runner();
        assert_eq!(r.due(t0), Some(SyncKind::Full));
        r.done(SyncKind::Full, t0, true);
        assert_eq!(r.due(t0), None);
        r.request();
        assert_eq!(r.due(t0 + 50 * MS), None, "within the min interval");
        assert_eq!(r.wait(t0 + 50 * MS), 50 * MS);
        assert_eq!(r.due(t0 + 100 * MS), Some(SyncKind::Incremental));
        r.done(SyncKind::Incremental, t0 + 100 * MS, true);
        assert_eq!(r.due(t0 + 200 * MS), None, "nothing pending");
    }

    #[test]
    fn periodic_full_resync() {
        let t0 = Instant::now();
        let mut r = runner();
        r.done(SyncKind::Full, t0, true);
        assert_eq!(r.wait(t0), 30_000 * MS);
        assert_eq!(r.due(t0 + 30_000 * MS), Some(SyncKind::Full));
    }

    #[test]
    fn failure_retries_later_with_a_full_sync() {
        let t0 = Instant::now();
        let mut r = runner();
        r.done(SyncKind::Full, t0, true);
        r.request();
        r.done(SyncKind::Incremental, t0 + 100 * MS, false);
        assert_eq!(r.due(t0 + 500 * MS), None);
        assert_eq!(r.due(t0 + 1_100 * MS), Some(SyncKind::Full));
        r.done(SyncKind::Full, t0 + 1_100 * MS, true);
        assert_eq!(r.due(t0 + 1_200 * MS), None);
    }
}
