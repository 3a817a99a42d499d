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

/// A target's id and its other fields.
type Target = (Uuid, Map<String, Value>);

fn bad(message: &str) -> Response {
    dv_error(StatusCode::BAD_REQUEST, "0x80040203", message)
}

impl Ctx {
    /// Runs `op` over the body's `Targets`.
    pub(super) fn bulk(&self, s: &'static Schema, op: Bulk, body: Map<String, Value>) -> Response {
        let targets = match checked_targets(s, body) {
            Ok(t) => t,
            Err(resp) => return resp,
        };
        let targets = match self.with_ids(s, op, targets) {
            Ok(t) => t,
            Err(resp) => return resp,
        };
        let mut ids = Vec::with_capacity(targets.len());
        for (id, mut fields) in targets {
            let resp = match op {
                Bulk::CreateMultiple => {
                    fields.insert(s.id_field.into(), json!(id));
                    self.create(s, &HeaderMap::new(), fields)
                }
                Bulk::UpdateMultiple => self.update(s, id, &HeaderMap::new(), fields),
            };
            // Everything that could refuse a target was checked above.
            if !resp.status().is_success() {
                return resp;
            }
            ids.push(id);
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

    /// Each target's id (a new one for a create that names none) and its
    /// other fields, once the ids fit the table (an update's record
    /// exists, a create's does not, none twice) and every `@odata.bind`
    /// names a record, so that no target can fail once writing starts.
    fn with_ids(
        &self,
        s: &'static Schema,
        op: Bulk,
        targets: Vec<Map<String, Value>>,
    ) -> Result<Vec<Target>, Response> {
        let db = lock(&self.sim.db);
        let table = db.tables.get(s.entity_set);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(targets.len());
        for mut t in targets {
            let id = match (op, t.remove(s.id_field)) {
                (_, Some(v)) => v
                    .as_str()
                    .and_then(|v| Uuid::parse_str(v).ok())
                    .ok_or_else(|| bad("Invalid id value."))?,
                (Bulk::CreateMultiple, None) => Uuid::new_v4(),
                (Bulk::UpdateMultiple, None) => {
                    let message = format!("Each item of 'Targets' must have its '{}'.", s.id_field);
                    return Err(bad(&message));
                }
            };
            let exists = table.is_some_and(|t| t.contains_key(&id));
            if op == Bulk::UpdateMultiple && !exists {
                let message = format!("{} With Id = {id} Does Not Exist", s.logical);
                return Err(dv_error(StatusCode::NOT_FOUND, "0x80040217", &message));
            }
            if (op == Bulk::CreateMultiple && exists) || !seen.insert(id) {
                return Err(dv_error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80040237",
                    "A record with matching key values already exists.",
                ));
            }
            navigation::bind_lookups(&db, s, &mut t.clone())?;
            out.push((id, t));
        }
        Ok(out)
    }
}

/// The targets, each of this table and with known columns, without their
/// `@odata.type`.
fn checked_targets(
    s: &'static Schema,
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
        out.push(t);
    }
    Ok(out)
}
