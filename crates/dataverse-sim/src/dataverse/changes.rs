//! Change tracking (docs/dataverse.md, "Change tracking"): a collection
//! read with `Prefer: odata.track-changes` says `Preference-Applied` and
//! ends with an `@odata.deltaLink`; following it gives the rows created or
//! changed since, the deleted ones as `$deletedEntity`, and a new delta
//! link. The token is the row version the read saw last.

use super::*;

/// The option a delta link carries.
pub(super) const DELTA_TOKEN: &str = "$deltatoken";

/// Query options change tracking refuses.
const REFUSED: [&str; 4] = ["$filter", "$orderby", "$expand", "$top"];

/// Whether the caller asks to track changes.
pub(super) fn asked(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("odata.track-changes"))
}

/// Dataverse's refusal of an option change tracking does not take.
pub(super) fn refusal(q: &Query) -> Option<Response> {
    let option = REFUSED.iter().find(|o| q.get(o).is_some())?;
    Some(dv_error(
        StatusCode::BAD_REQUEST,
        "0x80060888",
        &format!("The query option '{option}' is not supported with change tracking."),
    ))
}

impl Ctx {
    /// The delta link of a read that saw versions up to `token`.
    pub(super) fn delta_link(&self, s: &Schema, token: u64) -> String {
        self.link_with(s, (DELTA_TOKEN, &token.to_string()))
    }

    /// The changes of `s` since `token`, with the next delta link.
    pub(super) fn delta(&self, s: &'static Schema, q: &Query, token: &str) -> Response {
        if let Some(refused) = refusal(q) {
            return refused;
        }
        let Ok(since) = token.parse::<u64>() else {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                "Invalid delta token.",
            );
        };
        let select = match self.select(s, q) {
            Ok(sel) => sel,
            Err(resp) => return resp,
        };
        let db = lock(&self.sim.db);
        let mut value: Vec<Value> = db
            .tables
            .get(s.entity_set)
            .into_iter()
            .flat_map(|t| t.iter())
            .filter(|(_, row)| row.version > since)
            .map(|(id, row)| Self::project(s, *id, row, select.as_deref()))
            .collect();
        let deleted = format!("{}/$metadata#{}/$deletedEntity", self.base, s.entity_set);
        value.extend(
            db.deleted
                .iter()
                .filter(|d| d.set == s.entity_set && d.version > since)
                .map(|d| json!({"@odata.context": deleted, "id": d.id, "reason": "deleted"})),
        );
        let now = db.next_version;
        drop(db);
        let context = format!("{}/$delta", self.context(s, select.as_deref(), false));
        json_response(
            StatusCode::OK,
            &json!({
                "@odata.context": context,
                "value": value,
                "@odata.deltaLink": self.delta_link(s, now),
            }),
        )
    }

    /// `GET {set}/$count`: the rows (at most 5,000), or with a delta token
    /// the changes since it; plain text.
    pub(super) fn count(&self, s: &'static Schema) -> Response {
        let q = Query::parse(&self.query);
        let db = lock(&self.sim.db);
        let n = match q.get(DELTA_TOKEN).map(str::parse::<u64>) {
            Some(Ok(since)) => {
                let changed = db
                    .tables
                    .get(s.entity_set)
                    .map_or(0, |t| t.values().filter(|r| r.version > since).count());
                let gone = db
                    .deleted
                    .iter()
                    .filter(|d| d.set == s.entity_set && d.version > since)
                    .count();
                changed + gone
            }
            Some(Err(_)) => {
                return dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    "Invalid delta token.",
                );
            }
            None => db.tables.get(s.entity_set).map_or(0, |t| t.len().min(5000)),
        };
        let mut resp = n.to_string().into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    }
}
