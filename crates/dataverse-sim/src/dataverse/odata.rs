//! OData query options and headers: `Prefer`, `$select`, `$filter`,
//! `$top`, paging with `$skiptoken`, ETags.

use super::*;

/// The `Prefer` preferences of a request, lower-cased.
pub(super) fn prefers(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase())
        .collect()
}

pub(super) fn max_page_size(headers: &HeaderMap) -> Option<usize> {
    prefers(headers).iter().find_map(|p| {
        p.strip_prefix("odata.maxpagesize=")
            .and_then(|n| n.trim().parse::<usize>().ok())
    })
}

pub(super) fn wants_representation(headers: &HeaderMap) -> bool {
    prefers(headers)
        .iter()
        .any(|p| p == "return=representation")
}

pub(super) fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

/// One parsed `$filter` condition: `column eq literal`.
pub(super) struct Condition {
    pub(super) column: String,
    pub(super) value: Value,
}

pub(super) fn parse_filter(filter: &str) -> Result<Vec<Condition>, String> {
    filter
        .split(" and ")
        .map(|clause| {
            let clause = clause.trim();
            let mut parts = clause.splitn(3, ' ');
            let (Some(column), Some(op), Some(literal)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("Syntax error at '{clause}'."));
            };
            if op != "eq" {
                return Err(format!(
                    "The simulator supports only 'eq' in $filter, not '{op}'."
                ));
            }
            let literal = literal.trim();
            let value = if let Some(s) = literal
                .strip_prefix('\'')
                .and_then(|l| l.strip_suffix('\''))
            {
                Value::String(s.replace("''", "'"))
            } else if literal == "null" {
                Value::Null
            } else if let Ok(v) = serde_json::from_str::<Value>(literal) {
                v
            } else if Uuid::parse_str(literal).is_ok() {
                Value::String(literal.to_owned())
            } else {
                return Err(format!("Syntax error: '{literal}' is not a literal."));
            };
            Ok(Condition {
                column: column.to_owned(),
                value,
            })
        })
        .collect()
}

pub(super) fn matches(
    fields: &Map<String, Value>,
    id_field: &str,
    id: Uuid,
    conditions: &[Condition],
) -> bool {
    conditions.iter().all(|c| {
        if c.column == id_field {
            return c.value.as_str().and_then(|s| Uuid::parse_str(s).ok()) == Some(id);
        }
        let actual = fields.get(&c.column).unwrap_or(&Value::Null);
        match (actual, &c.value) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a == b,
        }
    })
}

/// The query options of a request, decoded once.
pub(super) struct Query {
    pub(super) options: Vec<(String, String)>,
}

impl Query {
    pub(super) fn parse(raw: &str) -> Self {
        Self {
            options: url::form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Paging cookie as Dataverse writes it in `$skiptoken` (docs/dataverse.md, "The Web API"):
/// an XML cookie whose `pagingcookie` attribute is itself URL-encoded, and
/// the whole token URL-encoded again in the link.
pub(super) fn skiptoken(page: usize, id_field: &str, first: Uuid, last: Uuid) -> String {
    let f = first.to_string().to_uppercase();
    let l = last.to_string().to_uppercase();
    format!(
        "%3Ccookie%20pagenumber=%22{page}%22%20pagingcookie=%22%253ccookie%2520page%253d%2522{prev}%2522%253e%253c{id_field}%2520last%253d%2522%257b{l}%257d%2522%2520first%253d%2522%257b{f}%257d%2522%2520%252f%253e%253c%252fcookie%253e%22%20istracking=%22False%22%20/%3E",
        prev = page - 1,
    )
}

/// Reads `(page number, last id)` back from a decoded `$skiptoken`.
pub(super) fn parse_skiptoken(decoded: &str) -> Option<(usize, Uuid)> {
    let page = decoded
        .split("pagenumber=\"")
        .nth(1)?
        .split('"')
        .next()?
        .parse()
        .ok()?;
    let last = decoded.split("last%3d%22%7b").nth(1)?.split("%7d").next()?;
    Some((page, Uuid::parse_str(last).ok()?))
}
