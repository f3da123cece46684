//! What the commands print: aligned text tables, or JSON.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use distlock::{Holder, Leader, LockStatus};
use serde_json::{json, Value};

/// The error and its sources, `: `-separated (distlock's `Display` leaves the
/// source to `source()`), skipping a source that only repeats the text before
/// it (some of redis-rs's errors print their source and return it too).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            let _ = write!(out, ": {text}");
        }
        source = s.source();
    }
    out
}

/// One row per holder (a semaphore or readers have several), or JSON.
pub(crate) fn table(locks: &[LockStatus], json: bool) -> String {
    if json {
        let all: Vec<Value> = locks.iter().map(status_json).collect();
        return format!("{}\n", Value::Array(all));
    }
    if locks.is_empty() {
        return "no lock is held\n".to_owned();
    }
    let mut rows = vec![[
        "KEY".to_owned(),
        "KIND".to_owned(),
        "HOLDER".to_owned(),
        "ROLE".to_owned(),
        "TOKEN".to_owned(),
        "LEFT".to_owned(),
    ]];
    for status in locks {
        let token = status
            .fencing_token()
            .map_or_else(|| "-".to_owned(), |t| t.to_string());
        let kind = match status.permits() {
            Some(max) => format!("{} ({} of {max})", status.kind(), status.holders().len()),
            None => status.kind().to_string(),
        };
        for holder in status.holders() {
            rows.push([
                status.key().to_owned(),
                kind.clone(),
                owner(holder).to_owned(),
                holder.role().to_string(),
                token.clone(),
                left(holder.expires_in()),
            ]);
        }
        if let Some(w) = status.waiting_writer() {
            rows.push([
                status.key().to_owned(),
                kind.clone(),
                owner(w).to_owned(),
                "writer (waiting)".to_owned(),
                "-".to_owned(),
                left(w.expires_in()),
            ]);
        }
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One lock in detail, or that nobody holds it.
pub(crate) fn show(key: &str, status: Option<&LockStatus>, json: bool) -> String {
    let Some(status) = status else {
        return if json {
            format!("{}\n", json!({ "key": key, "held": false }))
        } else {
            format!("`{key}` is not held\n")
        };
    };
    if json {
        return format!("{}\n", status_json(status));
    }
    let mut out = String::new();
    let _ = writeln!(out, "key:           {}", status.key());
    let _ = writeln!(out, "kind:          {}", status.kind());
    if let Some(max) = status.permits() {
        let _ = writeln!(
            out,
            "permits:       {} of {max} taken",
            status.holders().len()
        );
    }
    let token = status
        .fencing_token()
        .map_or_else(|| "unknown".to_owned(), |t| t.to_string());
    let _ = writeln!(out, "fencing token: {token}");
    let _ = writeln!(out, "holders:");
    for holder in status.holders() {
        let _ = writeln!(
            out,
            "  {}  {}  {} left",
            owner(holder),
            holder.role(),
            left(holder.expires_in())
        );
    }
    if let Some(w) = status.waiting_writer() {
        let _ = writeln!(
            out,
            "waiting writer: {} (its intent lasts {} more)",
            owner(w),
            left(w.expires_in())
        );
    }
    out
}

/// Who leads the election `name`, or that nobody does.
pub(crate) fn leader(name: &str, leader: Option<&Leader>, json: bool) -> String {
    match (leader, json) {
        (Some(l), true) => format!(
            "{}\n",
            json!({ "election": name, "leader": l.value(), "term": l.term() })
        ),
        (None, true) => format!("{}\n", json!({ "election": name, "leader": null })),
        (Some(l), false) => format!("`{name}` is led by {} (term {})\n", l.value(), l.term()),
        (None, false) => format!("nobody leads `{name}`\n"),
    }
}

/// Who holds it, in a few words: `host:42: (token 17)`.
pub(crate) fn holders_line(status: &LockStatus) -> String {
    let owners: Vec<&str> = status.holders().iter().map(owner).collect();
    let token = status
        .fencing_token()
        .map(|t| format!(" (fencing token {t})"))
        .unwrap_or_default();
    format!("{}{token}", owners.join(", "))
}

pub(crate) fn unlock_json(key: &str, status: &LockStatus, released: bool) -> Value {
    json!({ "key": key, "released": released, "was": status_json(status) })
}

/// What `watch` compares to decide whether to print again: everything but the
/// time left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    key: String,
    token: Option<u64>,
    holders: Vec<(String, String)>,
    waiting_writer: bool,
}

pub(crate) fn shape(locks: &[LockStatus]) -> Vec<Shape> {
    locks
        .iter()
        .map(|s| Shape {
            key: s.key().to_owned(),
            token: s.fencing_token(),
            holders: s
                .holders()
                .iter()
                .map(|h| (h.owner().to_owned(), h.role().to_string()))
                .collect(),
            waiting_writer: s.waiting_writer().is_some(),
        })
        .collect()
}

/// The wall-clock time, to stamp what `watch` prints (for the reader only:
/// nothing is computed from it).
pub(crate) fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn status_json(s: &LockStatus) -> Value {
    json!({
        "key": s.key(),
        "kind": s.kind().to_string(),
        "fencing_token": s.fencing_token(),
        "permits": s.permits(),
        "holders": s.holders().iter().map(holder_json).collect::<Vec<_>>(),
        "waiting_writer": s.waiting_writer().map(holder_json),
    })
}

fn holder_json(h: &Holder) -> Value {
    json!({
        "owner": h.owner(),
        "role": h.role().to_string(),
        "expires_in_ms": h.expires_in().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    })
}

fn owner(h: &Holder) -> &str {
    match h.owner() {
        "" => "(not distlock)",
        o => o,
    }
}

fn left(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1}s", d.as_secs_f64()),
        None => "no expiry".to_owned(),
    }
}
