//! Leader election: one leader among replicas, its value and term readable by
//! all, its changes observable, and a loop that runs work only while leading.
//!
//! An election is a mutex (`election:NAME`) whose holder's owner tag is the
//! leader's value: [`Locker::inspect`] then reads who leads and its term (the
//! lock's fencing token) in one round trip, atomically, and the leadership is a
//! lease like any other: renewed in the background, its lost signal firing
//! before anyone else can lead.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::guard::{LockGuard, Lost};
use crate::lock::Lock;
use crate::locker::Locker;
use crate::notify::Subscription;

/// The longest value a candidate may stand with, in bytes.
const MAX_VALUE_LEN: usize = 256;

/// How long [`Election::lead`] waits after losing leadership (or failing to
/// reach Redis) before it campaigns again.
const LEAD_PAUSE: Duration = Duration::from_millis(250);

/// How long an observer waits for its subscription to be confirmed.
const ACK_WAIT: Duration = Duration::from_secs(1);

/// The first pause of an observer that saw nobody leading: it looks again
/// after 10 ms, 20 ms, ... up to its interval, since taking a free lock sends
/// no message.
const FIRST_FAST_POLL: Duration = Duration::from_millis(10);

/// An election among replicas: [`Locker::election`].
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
/// let locker = distlock::Locker::memory();
/// let election = locker.election("scheduler");
///
/// let leadership = election.campaign("10.0.0.7:8080").await?;
/// let leader = election.leader().await?.expect("someone leads");
/// assert_eq!(leader.value(), "10.0.0.7:8080");
/// assert_eq!(leader.term(), leadership.term());
///
/// leadership.resign().await?;
/// assert!(election.leader().await?.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Election {
    locker: Locker,
    name: String,
    expiry: Option<Duration>,
    observe_every: Duration,
}

/// Who leads an election: the value it campaigned with, and its term.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leader {
    value: String,
    term: u64,
}

impl Leader {
    /// The value the leader campaigned with (its address, say).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The leader's term: the fencing token of its leadership, strictly
    /// greater than every earlier leader's. Followers and resources that
    /// remember the highest term they have seen can refuse a deposed leader
    /// ([`fence`](crate::fence)). 0 only if the server lost the election's
    /// fencing counter while this leader held it (the counter lives 7 days
    /// from its creation).
    pub fn term(&self) -> u64 {
        self.term
    }
}

/// This process leads: from [`Election::campaign`] until it resigns, drops
/// this, or loses the lease.
///
/// It is a [`LockGuard`] underneath: renewed in the background, its lost
/// signal ([`lost`](Leadership::lost)) fires before another candidate can
/// lead (Redis down, paused, the key deleted), and dropping it resigns in the
/// background.
#[derive(Debug)]
pub struct Leadership {
    guard: LockGuard,
    leader: Leader,
}

impl Leadership {
    /// The value this leader campaigned with.
    pub fn value(&self) -> &str {
        &self.leader.value
    }

    /// This leadership's term ([`Leader::term`]).
    pub fn term(&self) -> u64 {
        self.leader.term
    }

    /// The value and term, as [`Election::leader`] reports them.
    pub fn leader(&self) -> &Leader {
        &self.leader
    }

    /// Completes when leadership is lost (see [`LockGuard::lost`]).
    pub fn lost(&self) -> Lost {
        self.guard.lost()
    }

    /// Whether leadership was lost.
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// The lost signal as a token, for work that checks it or selects on it.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.guard.cancellation_token()
    }

    /// Steps down: the next candidate leads at once (its wait is woken).
    ///
    /// # Errors
    ///
    /// As [`LockGuard::release`]: [`Error::Lost`] if leadership was already
    /// lost.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the resignation completes in the background.
    pub async fn resign(self) -> Result<()> {
        self.guard.release().await
    }
}

impl Locker {
    /// The election `name` (any valid lock key; its lock is
    /// `election:NAME` under the key prefix). Every replica that calls this
    /// with the same name on the same Redis takes part in the same election.
    pub fn election(&self, name: impl Into<String>) -> Election {
        Election {
            locker: self.clone(),
            name: name.into(),
            expiry: None,
            observe_every: Duration::from_millis(500),
        }
    }
}

impl Election {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The leadership lease's expiry (default: the locker's): how long a
    /// crashed leader blocks the next one, at most.
    pub fn expiry(mut self, expiry: Duration) -> Self {
        self.expiry = Some(expiry);
        self
    }

    /// How often [`observe`](Election::observe) reads the leader when no
    /// message wakes it (default 500 ms). Resignations wake observers at once.
    pub fn observe_every(mut self, every: Duration) -> Self {
        self.observe_every = every.max(Duration::from_millis(1));
        self
    }

    fn lock(&self) -> Lock {
        let lock = self
            .locker
            .lock(format!("election:{}", self.name))
            .name("election");
        match self.expiry {
            Some(e) => lock.expiry(e),
            None => lock,
        }
    }

    /// Waits until this process leads, standing with `value` (up to 256
    /// bytes, no control characters; what
    /// [`leader`](Election::leader) reports to everyone).
    ///
    /// Candidates of one process wait in line, one contending at a time; a
    /// resignation wakes the next candidate at once, a crashed leader's lease
    /// lets one in when it expires.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a value that is too long or has control
    /// characters, [`Error::InvalidKey`] for an invalid name, and the errors
    /// of [`Lock::acquire`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`Lock::acquire`]: a campaign dropped while its
    /// request is in flight gives back what it took.
    pub async fn campaign(&self, value: impl Into<String>) -> Result<Leadership> {
        let value = value.into();
        check_value(&value)?;
        let guard = self
            .lock()
            .owned_by(Arc::from(value.as_str()))
            .acquire()
            .await?;
        let term = guard.fencing_token();
        Ok(Leadership {
            guard,
            leader: Leader { value, term },
        })
    }

    /// Who leads now, or `None`: one round trip, read-only, from any replica.
    ///
    /// # Errors
    ///
    /// As [`Locker::inspect`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        let status = self
            .locker
            .inspect(&format!("election:{}", self.name))
            .await?;
        Ok(status.and_then(|s| {
            let holder = s.holders().first()?;
            Some(Leader {
                value: holder.owner().to_owned(),
                term: s.fencing_token().unwrap_or(0),
            })
        }))
    }

    /// The leader as it changes: the current state first, then each change
    /// (a new leader, or nobody leading). Resignations wake it at once through
    /// pub/sub; otherwise it reads every [`observe_every`](Election::observe_every),
    /// and faster while nobody leads, to see the next leader soon.
    ///
    /// It always reports the latest state it read, so a leader that came and
    /// went between two reads is not reported; it never reports a term lower
    /// than one it reported. An error (Redis unreachable) is yielded as an
    /// item and the stream goes on; it never ends.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// use futures_util::StreamExt;
    ///
    /// let locker = distlock::Locker::memory();
    /// let election = locker.election("scheduler");
    /// let mut changes = Box::pin(election.observe());
    /// assert_eq!(changes.next().await.unwrap()?, None); // nobody leads yet
    ///
    /// let leadership = election.campaign("a").await?;
    /// let leader = changes.next().await.unwrap()?.unwrap();
    /// assert_eq!((leader.value(), leader.term()), ("a", leadership.term()));
    /// # Ok(()) }
    /// ```
    pub fn observe(&self) -> impl Stream<Item = Result<Option<Leader>>> + Send + 'static {
        let state = Observer {
            election: self.clone(),
            sub: None,
            reported: None,
            highest: 0,
            pause: None,
            fast: FIRST_FAST_POLL,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            let item = st.next().await;
            Some((item, st))
        })
    }

    /// Runs `work` whenever this process leads, for the life of the process:
    /// campaign with `value`; when elected, run `work(leader)`; when
    /// leadership is lost, drop the work (cancelling it at its next await),
    /// wait a moment and campaign again. A singleton background worker across
    /// replicas, as Kubernetes' `RunOrDie` or etcd's `Campaign` loops.
    ///
    /// It returns `Ok(())` when `work` completes (having resigned, so another
    /// replica may lead) or when `shutdown` is cancelled (dropping the work
    /// and resigning). Losing Redis for a while is not an error: it campaigns
    /// again until it is back.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let locker = distlock::Locker::memory();
    /// let shutdown = CancellationToken::new();
    /// locker
    ///     .election("compactor")
    ///     .lead("replica-1", shutdown, |leader| async move {
    ///         // Runs only while leading; write with leader.term() as the fencing token.
    ///         println!("compacting as {} in term {}", leader.value(), leader.term());
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// What campaigning cannot recover from: [`Error::Config`] (the value),
    /// [`Error::InvalidKey`] (the name), [`Error::Closed`] (the locker).
    pub async fn lead<F, Fut>(
        &self,
        value: impl Into<String>,
        shutdown: CancellationToken,
        mut work: F,
    ) -> Result<()>
    where
        F: FnMut(Leader) -> Fut,
        Fut: Future<Output = ()>,
    {
        let value = value.into();
        check_value(&value)?;
        loop {
            let campaign = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                c = self.campaign(value.as_str()) => c,
            };
            let leadership = match campaign {
                Ok(l) => l,
                Err(e) if e.is_unavailable() || matches!(e, Error::Lost { .. }) => {
                    pause(&shutdown).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let lost = leadership.cancellation_token();
            let finished = tokio::select! {
                biased;
                () = shutdown.cancelled() => true,
                () = lost.cancelled() => false,
                () = work(leadership.leader().clone()) => true,
            };
            if finished {
                // Resigned in the background if this fails: the next leader
                // is let in either way.
                let _ = leadership.resign().await;
                return Ok(());
            }
            drop(leadership);
            pause(&shutdown).await;
        }
    }
}

async fn pause(shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(LEAD_PAUSE) => {}
    }
}

fn check_value(value: &str) -> Result<()> {
    if value.len() > MAX_VALUE_LEN || value.chars().any(char::is_control) {
        return Err(Error::config(format!(
            "an election value must be at most {MAX_VALUE_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// The state behind [`Election::observe`].
struct Observer {
    election: Election,
    /// Release messages of the election's lock (`None` until subscribed, or
    /// without pub/sub).
    sub: Option<Subscription>,
    /// What was reported last (`None` before the first report).
    reported: Option<Option<Leader>>,
    /// The highest term reported.
    highest: u64,
    /// How long to wait before the next read (`None`: read at once).
    pause: Option<Duration>,
    /// The next pause while nobody leads: 10 ms, doubling up to the observe
    /// interval.
    fast: Duration,
}

impl Observer {
    async fn next(&mut self) -> Result<Option<Leader>> {
        loop {
            if let Some(pause) = self.pause.take() {
                self.wait(pause).await;
            }
            if self.sub.is_none() {
                if let Ok((sub, _)) = self.election.lock().releases(ACK_WAIT).await {
                    self.sub = Some(sub);
                }
            }
            let now = match self.election.leader().await {
                Ok(now) => now,
                Err(e) => {
                    self.pause = Some(self.election.observe_every);
                    return Err(e);
                }
            };
            // While nobody leads, look again soon: taking a free lock sends
            // no message.
            let every = self.election.observe_every;
            if now.is_some() {
                self.fast = FIRST_FAST_POLL.min(every);
                self.pause = Some(every);
            } else {
                self.pause = Some(self.fast);
                self.fast = self.fast.saturating_mul(2).min(every);
            }
            let newer = match &now {
                Some(l) => l.term > self.highest || (l.term == 0 && self.highest == 0),
                None => true,
            };
            if newer && self.reported.as_ref() != Some(&now) {
                if let Some(l) = &now {
                    self.highest = self.highest.max(l.term);
                }
                self.reported = Some(now.clone());
                return Ok(now);
            }
        }
    }

    async fn wait(&mut self, pause: Duration) {
        let deadline = Instant::now() + pause;
        match self.sub.as_mut() {
            Some(sub) => {
                tokio::select! {
                    () = sub.changed() => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => tokio::time::sleep_until(deadline).await,
        }
    }
}
