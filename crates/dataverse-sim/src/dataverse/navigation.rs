//! Related rows (docs/dataverse.md, "Related rows"): `$expand` of single-
//! and collection-valued navigation properties with a nested `$select`,
//! navigation paths in the URL (`accounts(id)/primarycontactid`), and
//! lookups set with `@odata.bind`. Other options inside `$expand` are
//! refused in Dataverse's error shape, never ignored.

use super::*;

/// One `$expand` item: the navigation and the columns to show of it.
pub(super) struct Expand {
    nav: String,
    target: &'static Schema,
    collection: bool,
    select: Option<Vec<String>>,
}

fn bad(msg: &str) -> Response {
    dv_error(StatusCode::BAD_REQUEST, "0x80060888", msg)
}

/// The query's `$expand` of `s`, read (none: empty).
pub(super) fn expand_of(s: &Schema, q: &Query) -> Result<Vec<Expand>, Response> {
    q.get("$expand")
        .map_or(Ok(Vec::new()), |e| parse_expand(s, e))
}

/// The `$expand` option of `s`, read.
pub(super) fn parse_expand(s: &Schema, value: &str) -> Result<Vec<Expand>, Response> {
    let mut out = Vec::new();
    for item in split_outside_parens(value, ',') {
        let item = item.trim();
        let (nav, options) = match item.split_once('(') {
            Some((nav, rest)) => (
                nav.trim(),
                rest.strip_suffix(')')
                    .ok_or_else(|| bad("Bad Request - Error in query syntax."))?,
            ),
            None => (item, ""),
        };
        let (target, collection) = s.navigation(nav).ok_or_else(|| {
            bad(&format!(
                "Could not find a property named '{nav}' on type 'Microsoft.Dynamics.CRM.{}'.",
                s.logical
            ))
        })?;
        let mut select = None;
        for option in split_outside_parens(options, ';')
            .into_iter()
            .filter(|o| !o.trim().is_empty())
        {
            match option.trim().split_once('=') {
                Some(("$select", cols)) => {
                    let cols: Vec<String> = cols.split(',').map(|c| c.trim().to_owned()).collect();
                    if let Some(c) = cols
                        .iter()
                        .find(|c| **c != target.id_field && !target.all_columns().any(|k| k == *c))
                    {
                        return Err(bad(&format!(
                            "Could not find a property named '{c}' on type 'Microsoft.Dynamics.CRM.{}'.",
                            target.logical
                        )));
                    }
                    select = Some(cols);
                }
                _ => {
                    return Err(bad(&format!(
                        "The query option '{}' inside $expand is not supported by the simulator (only $select).",
                        option.trim()
                    )));
                }
            }
        }
        out.push(Expand {
            nav: nav.to_owned(),
            target,
            collection,
            select,
        });
    }
    Ok(out)
}

fn split_outside_parens(text: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Adds each expanded navigation to `out`, the projection of `row` of `s`.
pub(super) fn add_expanded(
    db: &Db,
    s: &Schema,
    (id, row): (Uuid, &Row),
    expands: &[Expand],
    out: &mut Value,
) {
    for e in expands {
        let value = if e.collection {
            Value::Array(
                related(db, s, id, &e.nav)
                    .into_iter()
                    .map(|(rid, r)| Ctx::project(e.target, rid, r, e.select.as_deref()))
                    .collect(),
            )
        } else {
            lookup(db, s, row, &e.nav).map_or(Value::Null, |(rid, r)| {
                Ctx::project(e.target, rid, r, e.select.as_deref())
            })
        };
        out[&e.nav] = value;
    }
}

/// The row a lookup of `row` names, if any.
pub(super) fn lookup<'a>(db: &'a Db, s: &Schema, row: &Row, nav: &str) -> Option<(Uuid, &'a Row)> {
    let l = s.lookups.iter().find(|l| l.nav == nav)?;
    let id = row
        .fields
        .get(l.column)?
        .as_str()
        .and_then(|v| Uuid::parse_str(v).ok())?;
    db.tables.get(l.target)?.get(&id).map(|r| (id, r))
}

/// The rows of a one-to-many relation of row `id` of `s`.
pub(super) fn related<'a>(db: &'a Db, s: &Schema, id: Uuid, nav: &str) -> Vec<(Uuid, &'a Row)> {
    let Some(r) = s.relations.iter().find(|r| r.nav == nav) else {
        return Vec::new();
    };
    let key = id.to_string();
    db.tables.get(r.target).map_or_else(Vec::new, |t| {
        t.iter()
            .filter(|(_, row)| {
                row.fields.get(r.column).and_then(Value::as_str) == Some(key.as_str())
            })
            .map(|(rid, row)| (*rid, row))
            .collect()
    })
}

/// `nav@odata.bind` keys of a create or update: each sets its lookup
/// column to the row its URL names, which must exist in the lookup's table.
pub(super) fn bind_lookups(
    db: &Db,
    s: &Schema,
    body: &mut Map<String, Value>,
) -> Result<(), Response> {
    let binds: Vec<String> = body
        .keys()
        .filter(|k| k.ends_with("@odata.bind"))
        .cloned()
        .collect();
    for key in binds {
        let nav = key.trim_end_matches("@odata.bind");
        let Some(l) = s.lookups.iter().find(|l| l.nav == nav) else {
            return Err(bad(&format!(
                "An undeclared property '{nav}' which only has property annotations in the payload but no property value was found in the payload."
            )));
        };
        let url = body
            .remove(&key)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let tail = url.rsplit('/').next().unwrap_or("");
        let (set, id) = tail.split_once('(').unwrap_or((tail, ""));
        let id = Uuid::parse_str(id.trim_end_matches(')')).ok();
        match id {
            Some(id)
                if set == l.target && db.tables.get(set).is_some_and(|t| t.contains_key(&id)) =>
            {
                body.insert(l.column.to_owned(), json!(id.to_string()));
            }
            _ => {
                return Err(dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80040217",
                    &format!("The record '{url}' bound to '{nav}' does not exist."),
                ));
            }
        }
    }
    Ok(())
}

impl Ctx {
    /// `GET {set}(id)/{nav}`: the related row (204 when the lookup is
    /// empty) or the related rows.
    pub(super) fn navigate(&self, s: &'static Schema, id: Uuid, nav: &str) -> Response {
        let Some((target, collection)) = s.navigation(nav) else {
            return bad(&format!(
                "Could not find a property named '{nav}' on type 'Microsoft.Dynamics.CRM.{}'.",
                s.logical
            ));
        };
        let db = lock(&self.sim.db);
        let Some(row) = db.tables.get(s.entity_set).and_then(|t| t.get(&id)) else {
            return not_found(s, id);
        };
        if collection {
            let rows: Vec<Value> = related(&db, s, id, nav)
                .into_iter()
                .map(|(rid, r)| Self::project(target, rid, r, None))
                .collect();
            let body = json!({
                "@odata.context": format!("{}/$metadata#{}", self.base, target.entity_set),
                "value": rows,
            });
            return json_response(StatusCode::OK, &body);
        }
        match lookup(&db, s, row, nav) {
            Some((rid, r)) => {
                let mut v = Self::project(target, rid, r, None);
                v["@odata.context"] = Value::String(self.context(target, None, true));
                json_response(StatusCode::OK, &v)
            }
            None => StatusCode::NO_CONTENT.into_response(),
        }
    }
}
