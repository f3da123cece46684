//! Leader election (`Locker::election`): campaign, leader, resign, observe and
//! the lead loop on one Redis, a Redis Cluster and in memory; and three
//! replica processes on one Redis, one killed and one paused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::{Election, Error, Leader, Locker};
use distlock_tests::RedisServer;
use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod common;
use common::Fixture;

const BOUND: Duration = Duration::from_secs(10);

suite! {
    the_leader_is_whoever_campaigned_until_it_resigns => check_leader;
    the_next_candidate_leads_at_once_after_a_resignation_with_a_higher_term => check_takeover;
    observers_see_every_leader_in_increasing_terms => check_observe;
    lead_drops_the_work_when_leadership_is_lost_and_campaigns_again => check_lead_loss;
    lead_resigns_when_the_work_completes_or_at_shutdown => check_lead_end;
}

fn election(locker: &Locker) -> Election {
    locker
        .election("scheduler")
        .expiry(Duration::from_secs(1))
        .observe_every(Duration::from_millis(200))
}

async fn check_leader(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    assert_eq!(election(&b).leader().await.unwrap(), None);

    let leadership = election(&a).campaign("10.0.0.7:8080").await.unwrap();
    assert_eq!(leadership.value(), "10.0.0.7:8080");
    let seen = election(&b).leader().await.unwrap().expect("a leads");
    assert_eq!(seen, *leadership.leader());
    assert_eq!(seen.term(), leadership.term());
    assert!(seen.term() > 0);
    // The election is an ordinary lock: inspection shows the value as holder.
    let status = b.inspect("election:scheduler").await.unwrap().unwrap();
    assert_eq!(status.holders()[0].owner(), "10.0.0.7:8080");

    leadership.resign().await.unwrap();
    assert_eq!(election(&b).leader().await.unwrap(), None);
}

async fn check_takeover(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    let first = election(&a).campaign("a").await.unwrap();
    let waiting = tokio::spawn({
        let e = election(&b);
        async move { e.campaign("b").await }
    });
    // b waits while a leads.
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        while !waiting.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(early.is_err(), "b was elected while a led");

    let resigned = Instant::now();
    let term_a = first.term();
    first.resign().await.unwrap();
    let second = tokio::time::timeout(BOUND, waiting)
        .await
        .expect("b is elected")
        .unwrap()
        .unwrap();
    let took = resigned.elapsed();
    assert!(second.term() > term_a, "{} after {term_a}", second.term());
    assert_eq!(second.value(), "b");
    // Woken by the release message, not by a timer: well under the 1 s expiry.
    assert!(took < Duration::from_millis(500), "took {took:?}");
}

async fn check_observe(fx: Fixture) {
    let watcher = fx.locker().await;
    let mut changes = Box::pin(election(&watcher).observe());
    assert_eq!(next(&mut changes).await, None, "nobody leads yet");

    let mut expected = Vec::new();
    for value in ["a", "b", "c"] {
        let locker = fx.locker().await;
        let leadership = election(&locker).campaign(value).await.unwrap();
        expected.push(leadership.leader().clone());
        // Each leader is reported before it resigns, then nobody.
        let mut seen = next(&mut changes).await;
        while seen.as_ref() != Some(leadership.leader()) {
            let s = seen.expect("only the leader, or nobody, is reported");
            assert!(
                s.term() < leadership.term(),
                "{s:?} before {:?}",
                leadership.leader()
            );
            seen = next(&mut changes).await;
        }
        leadership.resign().await.unwrap();
        assert_eq!(next(&mut changes).await, None);
    }
    let terms: Vec<u64> = expected.iter().map(Leader::term).collect();
    assert!(terms.windows(2).all(|w| w[0] < w[1]), "{terms:?}");
}

async fn next<S>(changes: &mut S) -> Option<Leader>
where
    S: futures_util::Stream<Item = distlock::Result<Option<Leader>>> + Unpin,
{
    tokio::time::timeout(BOUND, changes.next())
        .await
        .expect("a change is reported")
        .expect("the stream never ends")
        .expect("no error")
}

/// Counts how often the work started, and how often it was dropped.
#[derive(Default)]
struct Counts {
    started: AtomicUsize,
    dropped: AtomicUsize,
}

struct OnDrop(Arc<Counts>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

async fn check_lead_loss(fx: Fixture) {
    let locker = fx.locker().await;
    let counts = Arc::new(Counts::default());
    let (terms_tx, mut terms) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let lead = tokio::spawn({
        let e = election(&locker);
        let counts = Arc::clone(&counts);
        let shutdown = shutdown.clone();
        async move {
            e.lead("worker", shutdown, move |leader| {
                let counts = Arc::clone(&counts);
                let terms_tx = terms_tx.clone();
                async move {
                    counts.started.fetch_add(1, Ordering::SeqCst);
                    let _dropped = OnDrop(counts);
                    terms_tx.send(leader.term()).unwrap();
                    std::future::pending::<()>().await;
                }
            })
            .await
        }
    });
    let first = tokio::time::timeout(BOUND, terms.recv())
        .await
        .unwrap()
        .unwrap();
    // An operator deletes the key: the leader learns at its next renewal,
    // its work is dropped, and it campaigns (and wins) again.
    fx.delete("election:scheduler").await;
    let second = tokio::time::timeout(BOUND, terms.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(second > first, "{second} after {first}");
    assert_eq!(
        counts.dropped.load(Ordering::SeqCst),
        1,
        "the first work was dropped"
    );
    assert_eq!(counts.started.load(Ordering::SeqCst), 2);

    shutdown.cancel();
    tokio::time::timeout(BOUND, lead)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 2);
    assert_eq!(election(&locker).leader().await.unwrap(), None, "resigned");
}

async fn check_lead_end(fx: Fixture) {
    let a = fx.locker().await;
    let b = fx.locker().await;
    // The work completes: lead resigns and returns; b leads at once. b
    // campaigns only once a leads (a campaign of b's started first could win,
    // and a would then wait for ever).
    let (led_tx, led_rx) = tokio::sync::oneshot::channel::<()>();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let ran = Arc::new(AtomicUsize::new(0));
    let leading = tokio::spawn({
        let e = election(&a);
        let ran = Arc::clone(&ran);
        let mut signals = Some((led_tx, finish_rx));
        async move {
            e.lead("a", CancellationToken::new(), move |leader| {
                let ran = Arc::clone(&ran);
                let signals = signals.take();
                async move {
                    assert!(matches!(leader.value(), "a"));
                    ran.fetch_add(1, Ordering::SeqCst);
                    if let Some((led, finish)) = signals {
                        let _ = led.send(());
                        let _ = finish.await;
                    }
                }
            })
            .await
        }
    });
    tokio::time::timeout(BOUND, led_rx).await.unwrap().unwrap();
    let waiting = tokio::spawn({
        let e = election(&b);
        async move { e.campaign("b").await }
    });
    finish_tx.send(()).unwrap();
    tokio::time::timeout(BOUND, leading)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let b_leads = tokio::time::timeout(BOUND, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(b_leads.value(), "b");

    // Shutdown while campaigning: lead returns without having led.
    let shutdown = CancellationToken::new();
    let lead = tokio::spawn({
        let e = election(&a);
        let shutdown = shutdown.clone();
        async move {
            e.lead("a", shutdown, |_| async { panic!("a never leads") })
                .await
        }
    });
    shutdown.cancel();
    tokio::time::timeout(BOUND, lead)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(election(&a).leader().await.unwrap().unwrap().value(), "b");
}

#[tokio::test]
async fn a_value_too_long_or_with_control_characters_is_refused() {
    let locker = Locker::memory();
    for bad in ["x".repeat(257), "a\nb".to_owned()] {
        let err = election(&locker).campaign(bad.clone()).await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        let err = election(&locker)
            .lead(bad, CancellationToken::new(), |_| async {})
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
    }
    assert!(election(&locker).campaign("x".repeat(256)).await.is_ok());
}

/// One replica process and the lines it printed so far.
struct Member {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Vec<String>,
}

impl Member {
    fn spawn(url: &str, value: &str, expiry_ms: u64) -> Member {
        let mut child = Command::new(env!("CARGO_BIN_EXE_election_member"))
            .args([url, "failover", value, &expiry_ms.to_string()])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Member {
            child,
            lines,
            log: Vec::new(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap())
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }
}

/// An accepted act: its term and when it ran (monotonic ns).
#[derive(Debug, Clone, Copy)]
struct Act {
    term: u64,
    from: u64,
    to: u64,
}

fn acts(log: &[String], outcome: &str) -> Vec<Act> {
    log.iter()
        .filter_map(|l| l.strip_prefix("act "))
        .filter(|l| l.ends_with(outcome))
        .map(|l| {
            let f: Vec<u64> = l.split(' ').take(3).map(|x| x.parse().unwrap()).collect();
            Act {
                term: f[0],
                from: f[1],
                to: f[2],
            }
        })
        .collect()
}

/// Three replicas campaign; the leader is killed (`SIGKILL`), then the next
/// one is paused (`SIGSTOP`) past the expiry and resumed. No two leaders'
/// accepted acts overlap, every stale act is refused by the fence, failover
/// takes at most the expiry and a wake-up, and an observer sees every term in
/// increasing order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_fail_over_through_a_kill_and_a_pause() {
    const EXPIRY_MS: u64 = 1000;
    let server = RedisServer::start().await;
    let url = server.url();
    let watcher = Locker::connect(&url).await.unwrap();
    let observed = Arc::new(std::sync::Mutex::new(Vec::<Leader>::new()));
    let observer = tokio::spawn({
        let changes = watcher
            .election("failover")
            .observe_every(Duration::from_millis(100))
            .observe();
        let observed = Arc::clone(&observed);
        async move {
            let mut changes = Box::pin(changes);
            while let Some(item) = changes.next().await {
                if let Ok(Some(leader)) = item {
                    observed.lock().unwrap().push(leader);
                }
            }
        }
    });
    let election = watcher.election("failover");
    let mut members: Vec<Member> = ["m0", "m1", "m2"]
        .iter()
        .map(|v| Member::spawn(&url, v, EXPIRY_MS))
        .collect();

    let first = wait_leader(&election, None).await;
    let killed = index_of(&first);
    // Let it act a little, then kill it.
    let t = Instant::now();
    while acts(&members[killed].log, "ok").len() < 3 {
        members[killed].drain();
        assert!(t.elapsed() < BOUND, "the leader acts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(members[killed].pid(), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let second = wait_leader(&election, Some(first.term())).await;
    let failover = killed_at.elapsed();
    assert!(
        failover < Duration::from_millis(EXPIRY_MS + 1000),
        "failover after a kill took {failover:?}"
    );

    // Pause the second leader past its expiry; the third takes over.
    let paused = index_of(&second);
    kill(members[paused].pid(), Signal::SIGSTOP).unwrap();
    let third = wait_leader(&election, Some(second.term())).await;
    assert_ne!(index_of(&third), paused);
    assert_ne!(index_of(&third), killed);
    // Resumed, the deposed leader stops its work (the lost signal) and any
    // act it still makes is refused by the fence.
    kill(members[paused].pid(), Signal::SIGCONT).unwrap();
    // The third keeps leading and acting.
    let third_i = index_of(&third);
    let t = Instant::now();
    while acts(&members[third_i].log, "ok")
        .iter()
        .filter(|a| a.term == third.term())
        .count()
        < 3
    {
        members[third_i].drain();
        assert!(t.elapsed() < BOUND, "the third leader acts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // If its work had started (it may have been paused before it began, and
    // then `lead` never starts it for a lost term), it is dropped.
    members[paused].drain();
    let elected = format!("elected {} ", second.term());
    let stopped = format!("stopped {} ", second.term());
    if members[paused].log.iter().any(|l| l.starts_with(&elected)) {
        let t = Instant::now();
        while !members[paused].log.iter().any(|l| l.starts_with(&stopped)) {
            assert!(
                t.elapsed() < BOUND,
                "the paused leader's work is dropped after it resumes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            members[paused].drain();
        }
    }
    assert_eq!(
        election.leader().await.unwrap().unwrap().term(),
        third.term()
    );

    // The observer reads every 100 ms: it reports the third leader by then.
    let t = Instant::now();
    while !observed
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.term() == third.term())
    {
        assert!(t.elapsed() < BOUND, "the observer reports the third leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for m in &mut members {
        let _ = m.child.start_kill();
        let _ = m.child.wait().await;
        m.drain();
    }
    observer.abort();

    // No two leaders' accepted acts overlap in time: each term's accepted
    // acts all end before the next term's first one begins.
    let accepted: Vec<Act> = members.iter().flat_map(|m| acts(&m.log, "ok")).collect();
    let by_term: BTreeMap<u64, (u64, u64)> = accepted.iter().fold(BTreeMap::new(), |mut m, a| {
        let e = m.entry(a.term).or_insert((a.from, a.to));
        e.0 = e.0.min(a.from);
        e.1 = e.1.max(a.to);
        m
    });
    let spans: Vec<(u64, (u64, u64))> = by_term.into_iter().collect();
    for w in spans.windows(2) {
        assert!(
            w[0].1 .1 <= w[1].1 .0,
            "term {} acted after term {} began: {spans:?}",
            w[0].0,
            w[1].0
        );
    }
    // Each member was elected in increasing terms; the observer saw each
    // leader's term, in increasing order.
    let seen: Vec<u64> = observed.lock().unwrap().iter().map(Leader::term).collect();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "observed {seen:?}");
    for t in [first.term(), second.term(), third.term()] {
        assert!(seen.contains(&t), "term {t} not observed: {seen:?}");
    }
    let stale = members
        .iter()
        .map(|m| acts(&m.log, "stale").len())
        .sum::<usize>();
    println!(
        "failover after SIGKILL: {failover:?}; terms {} {} {}; stale acts refused: {stale}",
        first.term(),
        second.term(),
        third.term()
    );
}

/// Waits for a leader with a term above `after`.
async fn wait_leader(election: &Election, after: Option<u64>) -> Leader {
    let start = Instant::now();
    loop {
        if let Some(l) = election.leader().await.unwrap() {
            if after.is_none_or(|t| l.term() > t) {
                return l;
            }
        }
        assert!(start.elapsed() < BOUND, "no new leader within {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn index_of(leader: &Leader) -> usize {
    leader.value().trim_start_matches('m').parse().unwrap()
}
