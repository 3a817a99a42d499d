//! Every table a request reaches, for the table policy: the path's
//! navigation segments and casts, `$expand` (nested, with its options),
//! navigation paths in `$filter`, `$orderby`, `$select`, `$apply` and
//! parameter aliases (lambda variables included), FetchXML `entity` and
//! `link-entity` names, and `@odata.bind` / `@odata.id` targets and deep
//! inserts in bodies. Navigation properties resolve through the org's
//! [`TableMap`]; what cannot be resolved with certainty is [`Unreadable`],
//! never guessed. Written here: no crate parses OData query options into
//! the navigation paths they name.

use super::tables::TableMap;

/// A request the proxy cannot read with certainty while a table list is set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// Entity sets reached (lower-case), collected as a request is read.
#[derive(Debug, Default)]
pub struct Reached(pub Vec<String>);

impl Reached {
    fn ty(&mut self, map: &TableMap, ty: &str) -> Result<(), Unreadable> {
        let set = map.set_of_type(ty).ok_or_else(|| {
            Unreadable(format!(
                "the table '{ty}' has no entity set in the org's metadata"
            ))
        })?;
        if !self.0.iter().any(|s| s == set) {
            self.0.push(set.to_owned());
        }
        Ok(())
    }
}

/// The tables the path and query reach. `rest` is the path after the
/// service root (`accounts(1)/primarycontactid`), percent-decoded.
pub fn of_target(map: &TableMap, rest: &str, query: &str) -> Result<Reached, Unreadable> {
    let mut reached = Reached::default();
    let ty = walk_path(map, rest, &mut reached)?;
    for (key, value) in query_pairs(query) {
        match (key.as_str(), ty.as_deref()) {
            ("sql", _) | ("savedQuery", _) | ("userQuery", _) => {
                return Err(Unreadable(format!(
                    "'{key}' runs a query the proxy cannot read (it may join any table); it is refused while the policy lists tables"
                )));
            }
            ("fetchXml", _) => fetch_xml(map, &value, &mut reached)?,
            ("$expand", Some(ty)) => expand(map, ty, &value, &mut reached, 0)?,
            ("$filter" | "$orderby" | "$select" | "$apply", Some(ty)) => {
                expression(map, ty, &value, &mut reached)?;
            }
            (k, Some(ty)) if k.starts_with('@') => expression(map, ty, &value, &mut reached)?,
            ("$expand" | "$filter" | "$orderby" | "$apply", None) if !value.is_empty() => {
                return Err(Unreadable(format!(
                    "'{key}' on a resource that is no table cannot be checked"
                )));
            }
            _ => {}
        }
    }
    Ok(reached)
}

/// Walks the path's segments from its entity set; the entity type it ends
/// on, when it ends on rows (not on a property, a function or an action).
fn walk_path(
    map: &TableMap,
    rest: &str,
    reached: &mut Reached,
) -> Result<Option<String>, Unreadable> {
    let segments = split_top(rest, b'/');
    let Some(first) = segments.first() else {
        return Ok(None);
    };
    let set = name_of(first).to_ascii_lowercase();
    let Some(mut ty) = map.type_of_set(&set).map(str::to_owned) else {
        return Ok(None);
    };
    for seg in &segments[1..] {
        let name = name_of(seg).to_ascii_lowercase();
        match name.as_str() {
            "$ref" | "$count" | "" => {}
            "$value" => return Ok(None),
            n if n.contains('.') => match cast(map, n) {
                Some(target) => {
                    reached.ty(map, &target)?;
                    ty = target;
                }
                // A bound function or action: what it returns is not a path.
                None => return Ok(None),
            },
            n => match map.navigation(&ty, n) {
                Some(target) => {
                    let target = target.to_owned();
                    reached.ty(map, &target)?;
                    ty = target;
                }
                None if map.has_property(&ty, n) => return Ok(None),
                None => {
                    return Err(Unreadable(format!(
                        "'{seg}' is neither a navigation nor a column of '{ty}'"
                    )));
                }
            },
        }
    }
    Ok(Some(ty))
}

/// A qualified type name (`Microsoft.Dynamics.CRM.contact`) as an entity
/// type the map knows.
fn cast(map: &TableMap, qualified: &str) -> Option<String> {
    let ty = qualified.rsplit('.').next()?;
    map.set_of_type(ty).map(|_| ty.to_owned())
}

/// `name(key)` → `name`.
fn name_of(segment: &str) -> &str {
    segment.split('(').next().unwrap_or("").trim()
}

/// The most `$expand` levels read (Dataverse allows far fewer).
const MAX_DEPTH: usize = 16;

/// `$expand` items: each navigation path, then its own options.
fn expand(
    map: &TableMap,
    ty: &str,
    value: &str,
    reached: &mut Reached,
    depth: usize,
) -> Result<(), Unreadable> {
    if depth > MAX_DEPTH {
        return Err(Unreadable("$expand is nested too deep".to_owned()));
    }
    for item in split_top(value, b',') {
        let item = item.trim();
        let (path, options) = match item.find('(') {
            Some(open) if item.ends_with(')') => (&item[..open], &item[open + 1..item.len() - 1]),
            Some(_) => return Err(Unreadable(format!("'$expand={item}' cannot be read"))),
            None => (item, ""),
        };
        let path = path.trim();
        if path == "*" || path.starts_with("*/") {
            for target in map.all_navigations(ty) {
                reached.ty(map, target)?;
            }
            if !options.is_empty() {
                return Err(Unreadable(
                    "options on '$expand=*' cannot be checked".to_owned(),
                ));
            }
            continue;
        }
        let mut target = ty.to_owned();
        for seg in path.split('/') {
            let seg = seg.trim().to_ascii_lowercase();
            if seg == "$ref" || seg == "$count" {
                continue;
            }
            target = if seg.contains('.') {
                cast(map, &seg)
            } else {
                map.navigation(&target, &seg).map(str::to_owned)
            }
            .ok_or_else(|| {
                Unreadable(format!("'{seg}' in $expand is no navigation of '{target}'"))
            })?;
            reached.ty(map, &target)?;
        }
        expand_options(map, &target, options, reached, depth)?;
    }
    Ok(())
}

/// The options inside `$expand=nav(…)`, separated by `;`.
fn expand_options(
    map: &TableMap,
    ty: &str,
    options: &str,
    reached: &mut Reached,
    depth: usize,
) -> Result<(), Unreadable> {
    for option in split_top(options, b';') {
        let option = option.trim();
        if option.is_empty() {
            continue;
        }
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        match key.trim() {
            "$expand" => expand(map, ty, value, reached, depth + 1)?,
            "$select" | "$filter" | "$orderby" | "$apply" => expression(map, ty, value, reached)?,
            "$top" | "$skip" | "$count" | "$levels" | "$search" => {}
            other => {
                return Err(Unreadable(format!(
                    "the $expand option '{other}' cannot be checked"
                )));
            }
        }
    }
    Ok(())
}

/// Navigation paths in an expression (`$filter`, `$orderby`, `$select`,
/// `$apply`, an alias): each member path is walked from `ty`; a lambda's
/// variable (`x` in `contacts/any(x: x/fullname eq 'a')`) stands for the
/// collection's target until its parenthesis closes.
fn expression(
    map: &TableMap,
    ty: &str,
    text: &str,
    reached: &mut Reached,
) -> Result<(), Unreadable> {
    let bytes = text.as_bytes();
    // Lambda variables in scope: name, type, the depth where they end.
    let mut scopes: Vec<(String, String, usize)> = Vec::new();
    let (mut i, mut depth) = (0, 0usize);
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' => i = skip_string(bytes, i),
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                scopes.retain(|(_, _, d)| *d < depth);
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'$' | b'_' | b'a'..=b'z' | b'A'..=b'Z' => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric()
                        || matches!(bytes[i], b'_' | b'.' | b'/' | b'$'))
                {
                    i += 1;
                }
                let path = &text[start..i];
                let lambda = member_path(map, ty, path, &scopes, reached)?;
                if let Some(target) = lambda
                    && let Some(var) = lambda_variable(&text[i..])
                {
                    scopes.push((var, target, depth + 1));
                }
            }
            b'0'..=b'9' | b'-' => {
                // Numbers, GUIDs and dates: no member path starts with these.
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'-' | b':' | b'.'))
                {
                    i += 1;
                }
            }
            // Outside strings, a `/` belongs to a member path (read above);
            // one anywhere else is something this reader does not know.
            b'/' => {
                return Err(Unreadable(format!(
                    "'{text}' cannot be read: a '/' outside a path"
                )));
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Walks one member path; for a path ending in `any` or `all`, the type
/// its lambda variable stands for.
fn member_path(
    map: &TableMap,
    ty: &str,
    path: &str,
    scopes: &[(String, String, usize)],
    reached: &mut Reached,
) -> Result<Option<String>, Unreadable> {
    let segments: Vec<&str> = path.split('/').collect();
    let first = segments[0];
    let (start, rest) = match scopes.iter().rev().find(|(v, _, _)| v == first) {
        Some((_, t, _)) => (t.as_str(), &segments[1..]),
        None if first == "$it" || first == "$this" => (ty, &segments[1..]),
        None if first.eq_ignore_ascii_case("$root") => {
            return Err(Unreadable("'$root' paths cannot be checked".to_owned()));
        }
        None => (ty, &segments[..]),
    };
    walk_members(map, start.to_owned(), rest, reached)
}

/// Walks `segments` from `cur`: every navigation and cast reaches its
/// table; a path may end on a column, a keyword or `any`/`all`, but a
/// segment nobody knows followed by more is unreadable.
fn walk_members(
    map: &TableMap,
    mut cur: String,
    segments: &[&str],
    reached: &mut Reached,
) -> Result<Option<String>, Unreadable> {
    let last = segments.len().saturating_sub(1);
    for (n, seg) in segments.iter().enumerate() {
        let lower = seg.to_ascii_lowercase();
        if let Some(next) = step(map, &cur, &lower, reached)? {
            cur = next;
            continue;
        }
        if n == last {
            return Ok(lambda_target(&lower, &cur));
        }
        if lower != "$count" {
            return Err(Unreadable(format!(
                "'{}' cannot be read: '{seg}' is no navigation of '{cur}'",
                segments.join("/")
            )));
        }
    }
    Ok(None)
}

/// One segment from `cur`: the type a navigation or cast leads to (the
/// table reached), or `None` for anything else (a column, a keyword, a
/// function, `$count`).
fn step(
    map: &TableMap,
    cur: &str,
    seg: &str,
    reached: &mut Reached,
) -> Result<Option<String>, Unreadable> {
    if let Some(target) = map.navigation(cur, seg) {
        let target = target.to_owned();
        reached.ty(map, &target)?;
        return Ok(Some(target));
    }
    if seg.contains('.')
        && let Some(target) = cast(map, seg)
    {
        reached.ty(map, &target)?;
        return Ok(Some(target));
    }
    Ok(None)
}

/// `any` / `all` after a collection: the type its variable stands for.
fn lambda_target(seg: &str, cur: &str) -> Option<String> {
    matches!(seg, "any" | "all").then(|| cur.to_owned())
}

/// `(x: …` → `x`.
fn lambda_variable(after: &str) -> Option<String> {
    let inner = after.trim_start().strip_prefix('(')?;
    let (var, _) = inner.split_once(':')?;
    let var = var.trim();
    (!var.is_empty() && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| var.to_owned())
}

/// The end of a quoted string starting at `start` (`''` is a quote inside).
fn skip_string(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            if bytes.get(i + 1) == Some(&b'\'') {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    i
}

/// `text` split at `sep` outside parentheses and quoted strings.
fn split_top(text: &str, sep: u8) -> Vec<&str> {
    let bytes = text.as_bytes();
    let (mut parts, mut depth, mut start, mut i) = (Vec::new(), 0i32, 0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => {
                i = skip_string(bytes, i);
                continue;
            }
            b'(' => depth += 1,
            b')' => depth -= 1,
            b if b == sep && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts
}

/// The query's pairs, percent-decoded (`+` is a plus in OData URLs).
fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        (decode(k), decode(v))
    })
}

/// Every `entity` and `link-entity` of a FetchXML query, by logical name.
fn fetch_xml(map: &TableMap, xml: &str, reached: &mut Reached) -> Result<(), Unreadable> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, options)
        .map_err(|e| Unreadable(format!("the FetchXML cannot be read: {e}")))?;
    if doc.root_element().tag_name().name() != "fetch" {
        return Err(Unreadable("the FetchXML has no <fetch> root".to_owned()));
    }
    for node in doc.descendants().filter(roxmltree::Node::is_element) {
        if matches!(node.tag_name().name(), "entity" | "link-entity") {
            let name = node.attribute("name").ok_or_else(|| {
                Unreadable("a FetchXML entity or link-entity has no name".to_owned())
            })?;
            reached.ty(map, &name.to_ascii_lowercase())?;
        }
    }
    Ok(())
}

/// The entity type a path's rows are of (`accounts(1)` → `account`), when
/// it addresses rows: the table a body sent there is written to.
pub fn table_written(map: &TableMap, rest: &str) -> Option<String> {
    walk_path(map, rest, &mut Reached::default()).ok().flatten()
}

/// The tables a JSON body reaches: `@odata.bind` and `@odata.id` targets,
/// and deep inserts through navigation properties of `ty` (the table the
/// body is written to, when known).
pub fn of_body(
    map: &TableMap,
    ty: Option<&str>,
    body: &serde_json::Value,
) -> Result<Reached, Unreadable> {
    let mut reached = Reached::default();
    body_value(map, ty, body, &mut reached, 0)?;
    Ok(reached)
}

fn body_value(
    map: &TableMap,
    ty: Option<&str>,
    value: &serde_json::Value,
    reached: &mut Reached,
    depth: usize,
) -> Result<(), Unreadable> {
    use serde_json::Value;
    if depth > MAX_DEPTH {
        return Err(Unreadable("the body is nested too deep".to_owned()));
    }
    let Value::Object(fields) = value else {
        if let Value::Array(items) = value {
            for item in items {
                body_value(map, ty, item, reached, depth + 1)?;
            }
        }
        return Ok(());
    };
    // A typed record (an action's `Targets`, a derived type) is of that table.
    let typed = fields
        .get("@odata.type")
        .and_then(Value::as_str)
        .map(|t| {
            let t = t.trim_start_matches('#');
            cast(map, &t.to_ascii_lowercase())
                .ok_or_else(|| Unreadable(format!("'{t}' in the body names no table of the org")))
        })
        .transpose()?;
    if let Some(t) = &typed {
        reached.ty(map, t)?;
    }
    let ty = typed.as_deref().or(ty);
    for (key, v) in fields {
        if key.ends_with("@odata.bind") || key == "@odata.id" {
            let targets: Vec<&Value> = match v {
                Value::Array(items) => items.iter().collect(),
                one => vec![one],
            };
            for t in targets {
                let s = t
                    .as_str()
                    .ok_or_else(|| Unreadable(format!("'{key}' is not a URL")))?;
                bound_target(map, s, reached)?;
            }
        } else if key.contains('@') {
            // Other annotations (`@odata.type`, `…@OData.Community.Display…`).
        } else if matches!(v, Value::Object(_) | Value::Array(_)) {
            let lower = key.to_ascii_lowercase();
            let target = match ty {
                Some(ty) => Some(map.navigation(ty, &lower).ok_or_else(|| {
                    Unreadable(format!("'{key}' in the body is no navigation of '{ty}'"))
                })?),
                None => None,
            };
            if let Some(t) = target {
                reached.ty(map, t)?;
            }
            body_value(map, target, v, reached, depth + 1)?;
        }
    }
    Ok(())
}

/// The entity set an `@odata.bind` / `@odata.id` URL names: absolute, from
/// the root (`/contacts(…)`), or relative; `$n` names a row of the same
/// change set (already checked).
fn bound_target(map: &TableMap, url: &str, reached: &mut Reached) -> Result<(), Unreadable> {
    if url.starts_with('$') {
        return Ok(());
    }
    let path = match url.find("://") {
        Some(i) => url[i + 3..].find('/').map_or("", |j| &url[i + 3 + j..]),
        None => url,
    };
    let path = path.trim_start_matches('/');
    let path = match path.strip_prefix("api/data/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, r)| r),
        None => path,
    };
    let set = name_of(path.split('/').next().unwrap_or("")).to_ascii_lowercase();
    let ty = map
        .type_of_set(&set)
        .ok_or_else(|| Unreadable(format!("'{url}' names no table of the org")))?
        .to_owned();
    reached.ty(map, &ty)?;
    walk_path(map, path, reached)?;
    Ok(())
}

#[cfg(test)]
mod tests;
