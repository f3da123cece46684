//! Release notifications: one hub per `Locker` multiplexes every channel waited on,
//! with reference counts, over at most one pub/sub connection per server.
//!
//! A waiter holds a [`Subscription`]; a release message on its channel bumps a
//! counter in a `watch` channel, so a message that arrives between two waits is
//! never missed.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

/// What the hub asks of the pub/sub connection task.
#[derive(Debug)]
pub(crate) enum SubCmd {
    /// Subscribe to a channel; answer when the server confirmed (or failed).
    Subscribe(String, oneshot::Sender<bool>),
    /// Unsubscribe from a channel.
    Unsubscribe(String),
    /// Drop the connection and connect again (the master moved).
    Reconnect,
}

/// How many releases a `Locker` may hand straight to its own next waiter on
/// one channel in a row, before it leaves one to the pub/sub message that every
/// replica hears at about the same time: bounds how long the waiters of other
/// replicas can lose the race to local ones.
pub(crate) const LOCAL_STREAK: u32 = 4;

/// How many recent release messages a channel remembers, to wake its waiters
/// once per release whichever way the news arrives first (and once, not once
/// per server, under Redlock).
const RECENT: usize = 8;

#[derive(Debug)]
struct Channel {
    refs: usize,
    tx: watch::Sender<u64>,
    /// Hashes of the latest release messages (their tokens), a ring.
    recent: [u64; RECENT],
    next: usize,
    /// Releases handed to local waiters in a row.
    streak: u32,
    /// The latest handovers of a fair mutex (`grant:<fence>:<token>`
    /// messages): token and fencing token, a ring.
    grants: [Option<(String, u64)>; RECENT],
    next_grant: usize,
    /// Whether the latest message was a handover (to anyone).
    last_grant: bool,
}

impl Channel {
    fn new() -> Self {
        Channel {
            refs: 0,
            tx: watch::Sender::new(0),
            recent: [0; RECENT],
            next: 0,
            streak: 0,
            grants: Default::default(),
            next_grant: 0,
            last_grant: false,
        }
    }

    fn record(&mut self, payload: &[u8]) {
        self.last_grant = false;
        let Some((fence, token)) = parse_grant(payload) else {
            return;
        };
        self.grants[self.next_grant] = Some((token.to_owned(), fence));
        self.next_grant = (self.next_grant + 1) % RECENT;
        self.last_grant = true;
    }

    fn wake(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes the waiters for the release whose message hashes to `hash`,
    /// unless that release woke them already.
    fn wake_once(&mut self, hash: u64) {
        if self.recent.contains(&hash) {
            return;
        }
        self.recent[self.next] = hash;
        self.next = (self.next + 1) % RECENT;
        self.wake();
    }
}

/// The per-`Locker` table of channels waited on.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    channels: Mutex<HashMap<String, Channel>>,
    feed: Feed,
    hasher: RandomState,
}

/// Where release messages come from.
#[derive(Debug, Default)]
enum Feed {
    /// The in-memory backend calls `notify` itself.
    #[default]
    Local,
    /// Pub/sub connection tasks (one per server) read `SubCmd`s and call
    /// `notify`; a subscription is confirmed when `needed` of them confirm (a
    /// majority of servers: every release reaches a majority, so a waiter
    /// subscribed on a majority hears of it).
    Remote(Vec<mpsc::UnboundedSender<SubCmd>>, usize),
    /// No pub/sub connection: waiters rely on their timers.
    Absent,
}

impl Hub {
    /// A hub fed directly by the in-memory backend.
    pub(crate) fn local() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// A hub with no feed: every subscription is unconfirmed.
    pub(crate) fn absent() -> Arc<Hub> {
        Arc::new(Hub {
            feed: Feed::Absent,
            ..Hub::default()
        })
    }

    /// A hub fed by `servers` pub/sub connection tasks, each reading `SubCmd`s
    /// from its receiver; `needed` confirmations make a subscription confirmed.
    pub(crate) fn remote(
        servers: usize,
        needed: usize,
    ) -> (Arc<Hub>, Vec<mpsc::UnboundedReceiver<SubCmd>>) {
        let (txs, rxs) = (0..servers).map(|_| mpsc::unbounded_channel()).unzip();
        let hub = Hub {
            feed: Feed::Remote(txs, needed),
            ..Hub::default()
        };
        (Arc::new(hub), rxs)
    }

    /// Subscribes to `channel`. Returns the subscription and whether the server
    /// confirmed it within `ack_wait` (a waiter that is not confirmed must rely on
    /// its timers; the subscription may still be confirmed later).
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        channel: &str,
        ack_wait: Duration,
    ) -> (Subscription, bool) {
        let (rx, first) = {
            let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = map.entry(channel.to_owned()).or_insert_with(Channel::new);
            entry.refs += 1;
            (entry.tx.subscribe(), entry.refs == 1)
        };
        let sub = Subscription {
            hub: Arc::clone(self),
            channel: channel.to_owned(),
            rx,
        };
        let confirmed = match &self.feed {
            Feed::Local => true,
            Feed::Absent => false,
            // A later subscriber to a channel that is already subscribed relies on the
            // first one's confirmation (the pub/sub task answers in order).
            Feed::Remote(..) if !first => true,
            Feed::Remote(remotes, needed) => {
                let acks = remotes.iter().filter_map(|remote| {
                    let (ack, done) = oneshot::channel();
                    remote
                        .send(SubCmd::Subscribe(channel.to_owned(), ack))
                        .ok()
                        .map(|()| tokio::time::timeout(ack_wait, done))
                });
                let confirmed = futures_util::future::join_all(acks).await;
                confirmed
                    .into_iter()
                    .filter(|c| matches!(c, Ok(Ok(true))))
                    .count()
                    >= *needed
            }
        };
        (sub, confirmed)
    }

    /// Wakes every waiter on `channel`.
    pub(crate) fn notify(&self, channel: &str) {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get_mut(channel) {
            c.last_grant = false;
            c.wake();
        }
    }

    /// A release message arrived on `channel` (its payload is the released
    /// token): wakes the waiters unless this release already woke them.
    pub(crate) fn notify_message(&self, channel: &str, payload: &[u8]) {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get_mut(channel) {
            c.record(payload);
            c.wake_once(self.hasher.hash_one(payload));
        }
    }

    /// This `Locker` released `token` on `channel` (Redis confirmed): wakes its
    /// own waiters there at once, without waiting for the pub/sub message,
    /// except once every [`LOCAL_STREAK`] + 1 releases, which are left to the
    /// message so that other replicas' waiters get an even start (when there
    /// is a pub/sub connection to bring it).
    pub(crate) fn released_here(&self, channel: &str, token: &str) {
        let fed = matches!(self.feed, Feed::Remote(..));
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get_mut(channel) {
            if fed && c.streak >= LOCAL_STREAK {
                c.streak = 0;
                return;
            }
            c.streak += 1;
            c.last_grant = false;
            c.wake_once(self.hasher.hash_one(token.as_bytes()));
        }
    }

    /// Wakes every waiter on every channel (after a reconnect, a message may have
    /// been missed).
    pub(crate) fn notify_all(&self) {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        for c in map.values_mut() {
            c.last_grant = false;
            c.wake();
        }
    }

    /// Asks the pub/sub connection tasks to connect again.
    pub(crate) fn reconnect(&self) {
        if let Feed::Remote(remotes, _) = &self.feed {
            for remote in remotes {
                let _ = remote.send(SubCmd::Reconnect);
            }
        }
    }

    /// The channels currently subscribed to.
    pub(crate) fn channels(&self) -> Vec<String> {
        let map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        map.keys().cloned().collect()
    }

    /// How many channels are subscribed (for tests and leak checks).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn release(&self, channel: &str) {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let last = match map.get_mut(channel) {
            Some(c) => {
                c.refs -= 1;
                c.refs == 0
            }
            None => false,
        };
        if last {
            map.remove(channel);
            if let Feed::Remote(remotes, _) = &self.feed {
                for remote in remotes {
                    let _ = remote.send(SubCmd::Unsubscribe(channel.to_owned()));
                }
            }
        }
    }
}

/// A reference-counted interest in one release channel.
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    channel: String,
    rx: watch::Receiver<u64>,
}

impl Subscription {
    /// Completes at the next release message (or at once if one arrived since the
    /// last call). Never completes if the hub is gone.
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// What the messages so far say to a fair mutex's waiter holding `token`,
    /// for whom a handover with a fencing token of `stale` or less is stale.
    pub(crate) fn heard(&self, token: &str, stale: u64) -> Heard {
        let map = self
            .hub
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(c) = map.get(&self.channel) else {
            return Heard::Released;
        };
        let granted = c
            .grants
            .iter()
            .flatten()
            .find(|&&(ref t, fence)| t == token && fence > stale);
        match (granted, c.last_grant) {
            (Some(&(_, fence)), _) => Heard::Granted(fence),
            (None, true) => Heard::HandedOver,
            (None, false) => Heard::Released,
        }
    }
}

/// What a fair mutex's waiter learns from its channel ([`Subscription::heard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heard {
    /// A recent release handed the lock to this waiter's token, with this
    /// fencing token (not stale).
    Granted(u64),
    /// The latest release handed the lock to someone else (ahead in line):
    /// trying for it is of no use.
    HandedOver,
    /// A plain release, an expiry or a reconnect: worth trying now.
    Released,
}

/// A handover message, `grant:<fence>:<token>`: its fencing token and token.
fn parse_grant(payload: &[u8]) -> Option<(u64, &str)> {
    let text = std::str::from_utf8(payload.strip_prefix(b"grant:")?).ok()?;
    let (fence, token) = text.split_once(':')?;
    Some((fence.parse().ok()?, token))
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.release(&self.channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_notification_between_waits_is_not_missed() {
        let hub = Hub::local();
        let (mut sub, ok) = hub.subscribe("c", ACK).await;
        assert!(ok);
        hub.notify("c");
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_release_wakes_once_whichever_way_its_news_arrives() {
        let hub = Hub::local();
        let (mut sub, _) = hub.subscribe("c", ACK).await;
        let woken = |sub: &mut Subscription| sub.rx.has_changed().unwrap();
        // Local news first, then the pub/sub message of the same release (and
        // its copies from other Redlock servers): one wake-up.
        hub.released_here("c", "t1");
        assert!(woken(&mut sub));
        sub.rx.borrow_and_update();
        hub.notify_message("c", b"t1");
        hub.notify_message("c", b"t1");
        assert!(!woken(&mut sub));
        // The message first, then the local news.
        hub.notify_message("c", b"t2");
        assert!(woken(&mut sub));
        sub.rx.borrow_and_update();
        hub.released_here("c", "t2");
        assert!(!woken(&mut sub));
        // Another release: woken again.
        hub.notify_message("c", b"t3");
        assert!(woken(&mut sub));
    }

    #[tokio::test]
    async fn every_fifth_local_release_is_left_to_the_message() {
        let (hub, _rxs) = Hub::remote(1, 1);
        // Nobody answers for the server here: unconfirmed, which is all the same.
        let (mut sub, _) = hub.subscribe("c", Duration::from_millis(1)).await;
        let mut local = 0;
        for i in 0..(2 * (LOCAL_STREAK + 1)) {
            let token = format!("t{i}");
            hub.released_here("c", &token);
            if sub.rx.has_changed().unwrap() {
                local += 1;
                sub.rx.borrow_and_update();
            } else {
                // Left to the message, which then wakes the waiters.
                hub.notify_message("c", token.as_bytes());
                assert!(sub.rx.has_changed().unwrap());
                sub.rx.borrow_and_update();
            }
        }
        assert_eq!(local, 2 * LOCAL_STREAK);
    }

    #[tokio::test]
    async fn channels_are_reference_counted() {
        let hub = Hub::local();
        let (a, _) = hub.subscribe("c", ACK).await;
        let (b, _) = hub.subscribe("c", ACK).await;
        assert_eq!(hub.len(), 1);
        drop(a);
        assert_eq!(hub.len(), 1);
        drop(b);
        assert_eq!(hub.len(), 0);
    }
}
