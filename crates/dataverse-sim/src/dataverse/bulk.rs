//! The bulk messages (docs/dataverse.md, "Bulk operations"):
//! `POST {set}/Microsoft.Dynamics.CRM.CreateMultiple` and
//! `…UpdateMultiple` with `Targets`, each target naming its table in
//! `@odata.type`. All targets are checked before any is written, so a bad
//! one leaves the table as it was, as Dataverse's transaction does.

use super::*;

/// A bulk message the simulator runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bulk {
    CreateMultiple,
    UpdateMultiple,
}

impl Bulk {
    /// The message a path segment names.
    pub(super) fn of(segment: &str) -> Option<Self> {
        match segment {
            "Microsoft.Dynamics.CRM.CreateMultiple" => Some(Self::CreateMultiple),
            "Microsoft.Dynamics.CRM.UpdateMultiple" => Some(Self::UpdateMultiple),
            _ => None,
        }
    }
}

fn bad(message: &str) -> Response {
    dv_error(StatusCode::BAD_REQUEST, "0x80040203", message)
}

impl Ctx {
    /// Runs `op` over the body's `Targets`.
    pub(super) fn bulk(&self, s: &'static Schema, op: Bulk, body: Map<String, Value>) -> Response {
        let targets = match checked_targets(s, op, body) {
            Ok(t) => t,
            Err(resp) => return resp,
        };
        if op == Bulk::UpdateMultiple
            && let Some(missing) = self.first_missing(s, &targets)
        {
            return dv_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("{} With Id = {missing} Does Not Exist", s.logical),
            );
        }
        let mut ids = Vec::with_capacity(targets.len());
        for target in targets {
            let id = target
                .get(s.id_field)
                .and_then(Value::as_str)
                .map(str::to_owned);
            let resp = match (op, id.as_deref().map(Uuid::parse_str)) {
                (Bulk::UpdateMultiple, Some(Ok(id))) => {
                    let mut fields = target;
                    fields.remove(s.id_field);
                    self.update(s, id, &HeaderMap::new(), fields)
                }
                _ => self.create(s, &HeaderMap::new(), target),
            };
            if !resp.status().is_success() {
                return resp;
            }
            if let Some(id) = resp
                .headers()
                .get("odata-entityid")
                .and_then(|v| v.to_str().ok())
                .and_then(|u| u.rsplit_once('(')?.1.strip_suffix(')').map(str::to_owned))
            {
                ids.push(id);
            }
        }
        match op {
            Bulk::CreateMultiple => json_response(
                StatusCode::OK,
                &json!({
                    "@odata.context": format!("{}/$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse", self.base),
                    "Ids": ids,
                }),
            ),
            Bulk::UpdateMultiple => StatusCode::NO_CONTENT.into_response(),
        }
    }

    /// The first target of an update whose record does not exist.
    fn first_missing(&self, s: &Schema, targets: &[Map<String, Value>]) -> Option<String> {
        let db = lock(&self.sim.db);
        let table = db.tables.get(s.entity_set)?;
        targets
            .iter()
            .filter_map(|t| t.get(s.id_field).and_then(Value::as_str))
            .find(|id| Uuid::parse_str(id).map_or(true, |id| !table.contains_key(&id)))
            .map(str::to_owned)
    }
}

/// The targets, each of this table, with known columns (and an id for an
/// update), without their `@odata.type`.
fn checked_targets(
    s: &'static Schema,
    op: Bulk,
    mut body: Map<String, Value>,
) -> Result<Vec<Map<String, Value>>, Response> {
    let Some(Value::Array(targets)) = body.remove("Targets") else {
        return Err(bad(
            "The parameter 'Targets' is missing or is not a collection.",
        ));
    };
    if targets.is_empty() || targets.len() > 1000 {
        return Err(bad("'Targets' must hold between 1 and 1,000 records."));
    }
    let ty = format!("Microsoft.Dynamics.CRM.{}", s.logical);
    let mut out = Vec::with_capacity(targets.len());
    for target in targets {
        let Value::Object(mut t) = target else {
            return Err(bad("Each item of 'Targets' must be a record."));
        };
        if t.remove("@odata.type").as_ref().and_then(Value::as_str) != Some(ty.as_str()) {
            return Err(bad(&format!(
                "Each item of 'Targets' must have \"@odata.type\": \"{ty}\"."
            )));
        }
        Ctx::check_columns(s, &t)?;
        if op == Bulk::UpdateMultiple && !t.contains_key(s.id_field) {
            return Err(bad(&format!(
                "Each item of 'Targets' must have its '{}'.",
                s.id_field
            )));
        }
        out.push(t);
    }
    Ok(out)
}
