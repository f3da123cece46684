//! The Redis backend's background tasks: the pub/sub connection that turns
//! release messages into wake-ups (on a cluster with sharded pub/sub, a
//! cluster connection that follows the slots), and in Sentinel mode the watcher that
//! follows the master. Each borrows what it needs from the backend
//! ([`Lent`]), so that a task dropped with its runtime starts again on the
//! next one.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{RedisBackend, RedisSettings, Shared};
use crate::notify::{Hub, SubCmd};

/// Where the pub/sub connection goes.
pub(crate) enum PubSubSource {
    /// These nodes, in turn (one server, or a Redlock member).
    Nodes(Vec<redis::Client>),
    /// A cluster's seed nodes: with sharded pub/sub, one cluster connection
    /// subscribes each channel on the node that owns its slot; without, the
    /// seeds in turn, as [`PubSubSource::Nodes`].
    Cluster(Vec<redis::Client>),
    /// The master Sentinel names now.
    Sentinel(Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>),
}

impl PubSubSource {
    /// A client for the `attempt`th connection.
    async fn client(&self, attempt: usize) -> Option<redis::Client> {
        match self {
            PubSubSource::Nodes(nodes) | PubSubSource::Cluster(nodes) => {
                nodes.get(attempt % nodes.len().max(1)).cloned()
            }
            PubSubSource::Sentinel(s) => s.lock().await.async_get_client().await.ok(),
        }
    }
}

impl RedisBackend {
    /// The master moved: drop every connection to the old one (checked out or
    /// idle) and move the pub/sub connection. New connections go to the master
    /// Sentinel names now (and the new `run_id` starts the restart quarantine:
    /// writes the old master took after the switch are gone).
    pub(super) fn master_moved(&self) {
        for i in 0..self.shared.slots.len() {
            self.discard(i);
        }
        self.shared.pool.drop_idle();
        self.shared.hub.reconnect();
    }

    /// Starts the `+switch-master` watcher, once, in Sentinel mode.
    pub(super) fn start_watcher(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let taken = self
            .shared
            .watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(watcher) = taken {
            let lent = Lent::new(&self.shared, |s| &s.watcher, watcher);
            rt.spawn(watch_sentinel(self.clone(), lent));
        }
    }

    /// Starts the pub/sub connection task, once, if this backend has one.
    pub(crate) fn start_pubsub(&self) {
        let s = &self.shared;
        let mut slot = s.pubsub.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some(feed) = slot.take() {
            let sharded = self.sharded() && matches!(feed.0, PubSubSource::Cluster(_));
            rt.spawn(pubsub_task(
                Lent::new(s, |s| &s.pubsub, feed),
                Arc::clone(&s.hub),
                s.shutdown.clone(),
                s.settings.clone(),
                sharded,
            ));
        }
    }
}

/// What a background task borrows from its backend (the pub/sub feed, the
/// Sentinel watcher's client). Given back when the task ends, also when its
/// runtime drops it, perhaps before ever polling it: the next operation then
/// starts the task again on its own runtime. Nothing is given back once the
/// backend shut down.
struct Lent<T> {
    home: Weak<Shared>,
    slot: fn(&Shared) -> &Mutex<Option<T>>,
    value: Option<T>,
}

impl<T> Lent<T> {
    fn new(home: &Arc<Shared>, slot: fn(&Shared) -> &Mutex<Option<T>>, value: T) -> Self {
        Lent {
            home: Arc::downgrade(home),
            slot,
            value: Some(value),
        }
    }
}

impl<T> Drop for Lent<T> {
    fn drop(&mut self) {
        let (Some(home), Some(value)) = (self.home.upgrade(), self.value.take()) else {
            return;
        };
        if !home.shutdown.is_cancelled() {
            *(self.slot)(&home)
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(value);
        }
    }
}

/// Sentinel mode: listens for `+switch-master` on a Sentinel and moves the
/// backend's connections to the new master. Reconnects (to any Sentinel) when
/// its connection drops; stops with the backend.
async fn watch_sentinel(
    backend: RedisBackend,
    mut lent: Lent<(redis::sentinel::SentinelClient, String)>,
) {
    let Some((sentinel, master)) = lent.value.as_mut() else {
        return;
    };
    let master = &*master;
    let shutdown = backend.shared.shutdown.clone();
    let settings = backend.shared.settings.clone();
    loop {
        let connect = async {
            let client = sentinel.async_get_sentinel_client().await.ok()?;
            let mut pubsub = client.get_async_pubsub().await.ok()?;
            pubsub.subscribe("+switch-master").await.ok()?;
            Some(pubsub)
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(settings.connect_timeout, connect) => r,
        };
        if let Ok(Some(pubsub)) = connected {
            let mut stream = pubsub.into_on_message();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if payload.split_whitespace().next() == Some(master.as_str()) {
                                tracing::warn!(%payload, "sentinel switched the master");
                                backend.master_moved();
                            }
                        }
                        None => break,
                    },
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Keeps one pub/sub connection: subscribes and unsubscribes in the order asked,
/// turns messages into wake-ups, and reconnects (resubscribing, and waking every
/// waiter in case a message was missed) when the connection drops. With
/// `sharded` (a cluster whose nodes run SPUBLISH), the connection is a RESP3
/// cluster connection that sends each `SSUBSCRIBE` to the node owning the
/// channel's slot and subscribes again after reconnecting to a node or
/// learning new slots; its messages reach the hub from inside the
/// connection's own driver (a push sender), with no task in between.
async fn pubsub_task(
    mut lent: Lent<(PubSubSource, mpsc::UnboundedReceiver<SubCmd>)>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    settings: RedisSettings,
    sharded: bool,
) {
    let Some((source, cmds)) = lent.value.as_mut() else {
        return;
    };
    let mut backoff = Duration::from_millis(50);
    let mut next = 0usize;
    loop {
        let attempt = next;
        next = next.wrapping_add(1);
        let connect = Listener::connect(source, attempt, sharded, &hub, &settings);
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(settings.connect_timeout, connect) => r,
        };
        let Ok(Some((mut sink, mut stream))) = connected else {
            tracing::debug!("pub/sub connection failed; waiters fall back to timers");
            // Answer pending subscriptions at once so waiters use their timers.
            while let Ok(cmd) = cmds.try_recv() {
                if let SubCmd::Subscribe(_, ack) = cmd {
                    let _ = ack.send(false);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        backoff = Duration::from_millis(50);
        let mut healthy = true;
        for channel in hub.channels() {
            if !sink.subscribe(&channel, settings.op_timeout).await {
                healthy = false;
                break;
            }
        }
        hub.notify_all();
        while healthy {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(SubCmd::Subscribe(channel, ack)) => {
                        let ok = sink.subscribe(&channel, settings.op_timeout).await;
                        let _ = ack.send(ok);
                        healthy = ok;
                    }
                    Some(SubCmd::Reconnect) => healthy = false,
                    Some(SubCmd::Unsubscribe(channel)) => {
                        healthy = sink.unsubscribe(&channel, settings.op_timeout).await;
                    }
                },
                msg = next_message(&mut stream) => match msg {
                    Some(msg) => hub.notify_message(msg.get_channel_name(), msg.get_payload_bytes()),
                    None => healthy = false,
                },
            }
        }
        tracing::debug!("pub/sub connection lost; reconnecting");
    }
}

/// Where subscriptions are made: a classic pub/sub connection, or a sharded
/// cluster connection.
enum Listener {
    Classic(redis::aio::PubSubSink),
    Sharded(Box<redis::cluster_async::ClusterConnection>),
}

impl Listener {
    /// Connects, for the `attempt`th time: the listener, and the stream of
    /// messages of a classic one (a sharded one delivers to the hub itself).
    async fn connect(
        source: &PubSubSource,
        attempt: usize,
        sharded: bool,
        hub: &Arc<Hub>,
        settings: &RedisSettings,
    ) -> Option<(Listener, Option<redis::aio::PubSubStream>)> {
        match source {
            PubSubSource::Cluster(nodes) if sharded => {
                let infos: Vec<redis::ConnectionInfo> = nodes
                    .iter()
                    .map(|c| c.get_connection_info().clone())
                    .collect();
                let hub = Arc::downgrade(hub);
                let deliver = move |push: PushInfo| -> Result<(), ()> {
                    if let Some(hub) = hub.upgrade() {
                        deliver(&hub, push);
                    }
                    Ok(())
                };
                let conn = redis::cluster::ClusterClientBuilder::new(infos)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(deliver)
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.op_timeout)
                    .build()
                    .ok()?
                    .get_async_connection()
                    .await
                    .ok()?;
                Some((Listener::Sharded(Box::new(conn)), None))
            }
            _ => {
                let (sink, stream) = source
                    .client(attempt)
                    .await?
                    .get_async_pubsub()
                    .await
                    .ok()?
                    .split();
                Some((Listener::Classic(sink), Some(stream)))
            }
        }
    }

    /// Subscribes to `channel`; false if that failed or took over `limit`.
    async fn subscribe(&mut self, channel: &str, limit: Duration) -> bool {
        let done = match self {
            Listener::Classic(sink) => tokio::time::timeout(limit, sink.subscribe(channel)).await,
            Listener::Sharded(conn) => tokio::time::timeout(limit, conn.ssubscribe(channel)).await,
        };
        matches!(done, Ok(Ok(())))
    }

    /// Unsubscribes from `channel`; false if that failed or took over `limit`.
    async fn unsubscribe(&mut self, channel: &str, limit: Duration) -> bool {
        let done = match self {
            Listener::Classic(sink) => tokio::time::timeout(limit, sink.unsubscribe(channel)).await,
            Listener::Sharded(conn) => {
                tokio::time::timeout(limit, conn.sunsubscribe(channel)).await
            }
        };
        matches!(done, Ok(Ok(())))
    }
}

/// The next message of a classic connection (`None`: it closed); never, for
/// a sharded one.
async fn next_message(stream: &mut Option<redis::aio::PubSubStream>) -> Option<redis::Msg> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// One push from the sharded pub/sub connection, into the hub: a release
/// message wakes its channel's waiters; a lost node connection wakes every
/// waiter, since a message may be missed until the connection subscribes
/// again (the waiters' timers cover that gap).
fn deliver(hub: &Hub, push: PushInfo) {
    match push.kind {
        PushKind::SMessage => {
            if let [redis::Value::BulkString(channel), redis::Value::BulkString(payload), ..] =
                push.data.as_slice()
            {
                if let Ok(channel) = std::str::from_utf8(channel) {
                    hub.notify_message(channel, payload);
                }
            }
        }
        PushKind::Disconnection => hub.notify_all(),
        _ => {}
    }
}
