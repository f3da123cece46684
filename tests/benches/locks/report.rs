//! The results: one row per target, printed as a Markdown table and written as JSON.

use serde_json::{json, Value};

/// Whether a row meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Met,
    Missed,
}

impl Status {
    pub(crate) fn of(met: bool) -> Status {
        if met {
            Status::Met
        } else {
            Status::Missed
        }
    }

    fn label(self) -> &'static str {
        match self {
            Status::Met => "met",
            Status::Missed => "MISSED",
        }
    }
}

/// One target of one scenario.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// "P1", "P2", ...
    pub(crate) id: &'static str,
    /// What was measured.
    pub(crate) scenario: String,
    /// The measured figure, formatted.
    pub(crate) figure: String,
    /// The baseline it is compared with, formatted.
    pub(crate) baseline: String,
    /// The comparison (a ratio), formatted; empty for absolute targets.
    pub(crate) ratio: String,
    /// The target, in words.
    pub(crate) target: String,
    pub(crate) status: Status,
    /// The raw numbers.
    pub(crate) data: Value,
}

/// The Markdown table of every row.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| # | scenario | figure | baseline (same run) | ratio | target | status |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.id,
            r.scenario,
            r.figure,
            r.baseline,
            r.ratio,
            r.target,
            r.status.label()
        ));
    }
    out
}

/// The JSON document of a run.
pub(crate) fn to_json(header: Value, rows: &[Row]) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "scenario": r.scenario,
                "figure": r.figure,
                "baseline": r.baseline,
                "ratio": r.ratio,
                "target": r.target,
                "status": r.status.label(),
                "data": r.data,
            })
        })
        .collect();
    json!({ "run": header, "rows": rows })
}
