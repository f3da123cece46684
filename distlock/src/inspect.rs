//! Inspection: who holds a lock, with which fencing token, for how long;
//! and which locks are held. Read-only, one round trip per lock.

use std::fmt;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};

use crate::backend::{RawHolder, Snapshot};
use crate::error::{Error, Result};
use crate::key::{validate_key, InspectKeys};
use crate::locker::Locker;

/// What a lock name is used as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LockType {
    /// A mutex: [`Locker::lock`].
    Mutex,
    /// A counting semaphore: [`Locker::semaphore`].
    Semaphore,
    /// A reader-writer lock: [`Locker::rw_lock`].
    RwLock,
}

impl fmt::Display for LockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockType::Mutex => "mutex",
            LockType::Semaphore => "semaphore",
            LockType::RwLock => "rw",
        })
    }
}

/// How a [`Holder`] holds its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Holds a mutex.
    Mutex,
    /// Holds one of a semaphore's permits.
    Permit,
    /// Reads under a reader-writer lock.
    Reader,
    /// Writes under a reader-writer lock (or, as
    /// [`LockStatus::waiting_writer`], waits to).
    Writer,
}

impl Role {
    /// The kind of lock this role belongs to.
    pub fn lock_type(self) -> LockType {
        match self {
            Role::Mutex => LockType::Mutex,
            Role::Permit => LockType::Semaphore,
            Role::Reader | Role::Writer => LockType::RwLock,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Mutex => "mutex",
            Role::Permit => "permit",
            Role::Reader => "reader",
            Role::Writer => "writer",
        })
    }
}

/// One holder of a lock, as [`Locker::inspect`] found it.
///
/// It names the holder by its owner tag only: the random part of its token is
/// the proof of ownership (it can release the lock) and is never shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    owner: String,
    role: Role,
    expires_in: Option<Duration>,
}

impl Holder {
    fn from_raw(raw: RawHolder) -> Self {
        Holder {
            owner: owner_tag(&raw.token).to_owned(),
            role: raw.role,
            expires_in: raw.ttl,
        }
    }

    /// The owner tag of the holder's locker, exactly as it was built with
    /// [`LockerBuilder::owner_tag`](crate::LockerBuilder::owner_tag), by
    /// default `host:pid:`. Empty when the key holds something other than a
    /// distlock token (written by hand, say).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How it holds the lock.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Time left on the server's clock when it was read: the key's `PTTL`
    /// for a mutex or a writer, the member's score less the server's `TIME`
    /// for a permit or a reader. The holder renews it before it runs out,
    /// unless it crashed or was cut off. `None` for a key with no expiry
    /// (not written by distlock).
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_in
    }
}

/// Who holds a lock, read in one round trip by [`Locker::inspect`] or listed
/// by [`Locker::locks`].
///
/// On Redlock, it is what a majority of the servers agree on: a holder is
/// listed when a majority hold its token, with the time until fewer than a
/// majority will (servers that did not answer count as not holding it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockStatus {
    key: String,
    kind: LockType,
    holders: Vec<Holder>,
    waiting_writer: Option<Holder>,
    fencing_token: Option<u64>,
    permits: Option<u32>,
}

impl LockStatus {
    /// `None` when nothing holds the name (and no writer waits).
    fn from_snapshot(key: &str, snapshot: Snapshot) -> Option<Self> {
        let holders: Vec<Holder> = snapshot.holders.into_iter().map(Holder::from_raw).collect();
        let waiting_writer = snapshot.intent.map(Holder::from_raw);
        let kind = match (holders.first(), &waiting_writer) {
            (Some(h), _) => h.role.lock_type(),
            (None, Some(_)) => LockType::RwLock,
            (None, None) => return None,
        };
        Some(LockStatus {
            key: key.to_owned(),
            kind,
            permits: snapshot.permits.filter(|_| kind == LockType::Semaphore),
            holders,
            waiting_writer,
            fencing_token: snapshot.fence,
        })
    }

    /// The lock's key, as passed to [`Locker::lock`] (without the prefix).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What the name is used as. (A name used as two kinds at once, which
    /// works but is a mistake, lists the holders of both; this is the kind of
    /// the first.)
    pub fn kind(&self) -> LockType {
        self.kind
    }

    /// The live holders: one for a mutex or a writer, up to the permit count
    /// for a semaphore, any number of readers. Empty when the only thing
    /// found was a [`waiting_writer`](LockStatus::waiting_writer).
    pub fn holders(&self) -> &[Holder] {
        &self.holders
    }

    /// A reader-writer lock's writer that waits for the readers to leave
    /// (new readers wait behind it); its `expires_in` is how long its intent
    /// lasts unless it tries again.
    pub fn waiting_writer(&self) -> Option<&Holder> {
        self.waiting_writer.as_ref()
    }

    /// The latest fencing token granted on this name: the value of its fencing
    /// counter. For a mutex or a writer that is the holder's token (unless the
    /// same name is also used as another kind of lock, which shares the
    /// counter); for a semaphore or readers, the newest holder's token, or a
    /// later one if a newer holder came and went. `None` if the counter is
    /// gone (it lives 7 days from its creation).
    ///
    /// On Redlock it is the highest value a majority of the servers that
    /// answered have reached: the holder's token when every server answers.
    /// In memory ([`Locker::memory`]) it is the newest token among the live
    /// holders.
    pub fn fencing_token(&self) -> Option<u64> {
        self.fencing_token
    }

    /// A semaphore's permit count (`max`), when known.
    pub fn permits(&self) -> Option<u32> {
        self.permits
    }
}

impl Locker {
    /// Who holds the lock on `key`, of any kind (mutex, semaphore, reader-writer
    /// lock): each holder's owner tag, role and time left on the server's clock,
    /// the latest fencing token, and whether a writer waits. `None` when
    /// nothing holds it.
    ///
    /// One round trip, one read-only script (on Redlock, one per server, sent
    /// at once, and the answer is what a majority holds; see [`LockStatus`]).
    /// It takes no lock and changes nothing, so it is safe to call from any
    /// replica at any time; what it reports may have changed by the time it
    /// returns.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// use distlock::{LockType, Locker, Role};
    ///
    /// let locker = Locker::builder().memory().owner_tag("worker-7:").build().await?;
    /// let guard = locker.lock("invoice:42").acquire().await?;
    ///
    /// let info = locker.inspect("invoice:42").await?.expect("held");
    /// assert_eq!(info.kind(), LockType::Mutex);
    /// let holder = &info.holders()[0];
    /// assert_eq!(holder.owner(), "worker-7:");
    /// assert_eq!(holder.role(), Role::Mutex);
    /// assert!(holder.expires_in() <= Some(guard.expiry()));
    /// assert_eq!(info.fencing_token(), Some(guard.fencing_token()));
    ///
    /// guard.release().await?;
    /// assert!(locker.inspect("invoice:42").await?.is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`], [`Error::Closed`], or the backend's errors
    /// ([`Error::Quorum`] on Redlock when fewer than a majority answer).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves nothing behind: it only reads.
    pub async fn inspect(&self, key: &str) -> Result<Option<LockStatus>> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let keys = InspectKeys::new(self.key_prefix(), key)?;
        let snapshot = self.backend().inspect(&keys).await?;
        Ok(LockStatus::from_snapshot(key, snapshot))
    }

    /// Every held lock under this locker's key prefix whose key matches the
    /// glob `pattern` (Redis's: `*`, `?`, `[abc]`, `[^a-z]`, `\` escapes; `"*"`
    /// for all), with what [`inspect`](Locker::inspect) reports for each,
    /// sorted by key.
    ///
    /// Found with `SCAN` (never `KEYS`, which blocks the server), on every
    /// master of a cluster and every server of a Redlock.
    ///
    /// # Cost
    ///
    /// One `SCAN` walk over the whole key space of each server (a call per
    /// thousand keys, each cheap for the server), then one inspection round
    /// trip per lock found, 16 at a time. Meant for operators and
    /// dashboards, not hot paths. A lock taken or released during the walk
    /// may be missed or listed; one released before its inspection is left
    /// out.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), distlock::Error> {
    /// let locker = distlock::Locker::memory();
    /// let _a = locker.lock("order:1").acquire().await?;
    /// let _b = locker.semaphore("order:pool", 4).acquire().await?;
    /// let _c = locker.lock("user:9").acquire().await?;
    ///
    /// for info in locker.locks("order:*").await? {
    ///     for holder in info.holders() {
    ///         println!("{} {} {} {:?}", info.key(), info.kind(), holder.owner(), holder.expires_in());
    ///     }
    /// }
    /// let keys: Vec<String> = locker.locks("order:*").await?.iter().map(|i| i.key().to_owned()).collect();
    /// assert_eq!(keys, ["order:1", "order:pool"]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for a pattern that no key could match (empty,
    /// with `{`, `}` or control characters), [`Error::Closed`], or the
    /// backend's errors.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves nothing behind: it only reads.
    pub async fn locks(&self, pattern: &str) -> Result<Vec<LockStatus>> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        validate_key(pattern)?;
        let prefix = self.key_prefix();
        let names = self.backend().held_names(prefix, pattern).await?;
        let found: Vec<Option<LockStatus>> = futures_util::stream::iter(names)
            .map(|name| async move {
                let keys = InspectKeys::new(prefix, &name)?;
                let snapshot = self.backend().inspect(&keys).await?;
                Ok::<_, Error>(LockStatus::from_snapshot(&name, snapshot))
            })
            .buffered(16)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }
}

/// The owner-tag part of a token (`tag` followed by 32 hex digits), or `""`
/// for anything else: the random part never leaves this function.
fn owner_tag(token: &str) -> &str {
    let Some(split) = token.len().checked_sub(32) else {
        return "";
    };
    match (token.get(..split), token.get(split..)) {
        (Some(tag), Some(random)) if random.bytes().all(|b| b.is_ascii_hexdigit()) => tag,
        _ => "",
    }
}

/// Redis's glob (`SCAN MATCH`, `KEYS`): `*` any run, `?` any one character,
/// `[...]` a class (`^` negates, `a-z` ranges), `\` escapes the next.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0, 0);
    // Where the last `*` was, and the position in `s` it next resumes from.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if let Some(&c) = p.get(pi) {
            if c == '*' {
                star = Some((pi, si));
                pi += 1;
                continue;
            }
            if let Some(used) = match_one(&p[pi..], s[si]) {
                pi += used;
                si += 1;
                continue;
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether the pattern's first element (not `*`) matches `c`, and how many
/// pattern characters it spans.
fn match_one(p: &[char], c: char) -> Option<usize> {
    match p {
        ['?', ..] => Some(1),
        ['\\', e, ..] => (*e == c).then_some(2),
        ['[', rest @ ..] => {
            let negate = rest.first() == Some(&'^');
            let mut i = usize::from(negate);
            let mut hit = false;
            loop {
                match rest.get(i..) {
                    None | Some([]) => return ('[' == c).then_some(1),
                    Some([']', ..]) => break,
                    Some(['\\', e, ..]) => {
                        hit |= *e == c;
                        i += 2;
                    }
                    Some([lo, '-', hi, ..]) if *hi != ']' => {
                        let (lo, hi) = if lo <= hi { (*lo, *hi) } else { (*hi, *lo) };
                        hit |= (lo..=hi).contains(&c);
                        i += 3;
                    }
                    Some([x, ..]) => {
                        hit |= *x == c;
                        i += 1;
                    }
                }
            }
            (hit != negate).then_some(i + 2)
        }
        [x, ..] => (*x == c).then_some(1),
        [] => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_tag_is_all_that_is_left_of_a_token() {
        let token = crate::token::mint("web-1:4242:").unwrap();
        assert_eq!(owner_tag(&token), "web-1:4242:");
        assert_eq!(owner_tag(&crate::token::mint("").unwrap()), "");
        for foreign in [
            "",
            "short",
            "x".repeat(40).as_str(),
            "tag:ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ",
        ] {
            assert_eq!(owner_tag(foreign), "", "{foreign}");
        }
        // Multi-byte characters right before the random part are no panic.
        assert_eq!(owner_tag(&format!("é{}", "0".repeat(31))), "");
    }

    #[test]
    fn globs_match_as_redis_does() {
        for (pattern, name, want) in [
            ("*", "anything", true),
            ("order:*", "order:42", true),
            ("order:*", "orders", false),
            ("*:42", "order:42", true),
            ("o?der", "order", true),
            ("o?der", "oder", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("[ab]x", "bx", true),
            ("[^ab]x", "bx", false),
            ("[a-c]x", "cx", true),
            ("[c-a]x", "bx", true),
            ("\\*", "*", true),
            ("\\*", "x", false),
            ("[", "[", true),
            ("a**", "a", true),
        ] {
            assert_eq!(glob_match(pattern, name), want, "{pattern} ~ {name}");
        }
    }
}
