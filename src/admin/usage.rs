//! `GET /usage`: the Power Platform requests spent, one CSV row per UTC day,
//! org, lane, caller and user, for every day kept (`usage.retention_days`).
//! The first columns follow the admin center's per-user report (Caller ID:
//! the lane's application user, or the user of a user's own token); the
//! proxy adds who behind that application user spent them.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::app::AppState;
use crate::usage::{Bucket, Who};

const HEAD: &str =
    "Date,Caller ID,Caller Type,Environment,Lane,Proxy Caller,Executed,Refused,Dataverse Seconds\n";

pub async fn usage(State(state): State<AppState>) -> impl IntoResponse {
    let days = state.usage.days().await;
    let mut rows: Vec<(i64, &Who, &crate::usage::Counts)> = days
        .buckets
        .iter()
        .filter_map(|(b, row)| match b {
            Bucket::Day(d) => Some(row.iter().map(move |(w, c)| (*d, w, c))),
            _ => None,
        })
        .flatten()
        .collect();
    rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let running = state
        .running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .0
        .clone();
    let mut csv = String::from(HEAD);
    for (day, who, counts) in rows {
        let (caller_id, caller_type) = caller_id(&running, who);
        let environment = state
            .orgs
            .iter()
            .find(|o| o.name == *who.org)
            .map_or("", |o| o.origin.as_str());
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{:.3}",
            date(day),
            field(&caller_id),
            caller_type,
            field(environment),
            field(&who.lane),
            field(&who.caller),
            counts.executed,
            counts.refused,
            counts.dataverse_ms as f64 / 1_000.0,
        );
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        csv,
    )
}

/// Whose allocation Dataverse counts: the user of a user's own token, else
/// the lane's application user (its client id, as the admin center names
/// application users).
fn caller_id(running: &crate::config::Config, who: &Who) -> (String, &'static str) {
    if &*who.lane == "user" {
        return (who.user.to_string(), "User");
    }
    let client_id = running
        .orgs
        .iter()
        .find(|o| o.name == *who.org)
        .and_then(|o| o.lanes.iter().find(|l| l.name == *who.lane))
        .and_then(|l| l.client_id.clone())
        .unwrap_or_else(|| who.lane.to_string());
    (client_id, "Application")
}

/// `YYYY-MM-DD` of a day number.
fn date(day: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(day * 86_400)
        .map(|t| t.date().to_string())
        .unwrap_or_default()
}

/// A CSV field: quoted when it holds a comma, quote or line break; a
/// leading `=`, `+`, `-` or `@` is quoted too, so a spreadsheet never runs it.
fn field(value: &str) -> String {
    let risky = value.contains([',', '"', '\n', '\r'])
        || value.starts_with(['=', '+', '@'])
        || (value.starts_with('-') && value.len() > 1);
    match risky {
        true => format!("\"'{}\"", value.replace('"', "\"\"")),
        false => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields_never_break_a_row_or_run_in_a_spreadsheet() {
        assert_eq!(super::field("orders"), "orders");
        assert_eq!(super::field("-"), "-");
        assert_eq!(super::field("a,b"), "\"'a,b\"");
        assert_eq!(super::field("=cmd()"), "\"'=cmd()\"");
        assert_eq!(super::date(20_430), "2025-12-08");
    }
}
