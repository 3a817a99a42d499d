//! Collections and rows: list, retrieve, create, update (and upsert), delete.

use super::*;

impl Ctx {
    /// A `fetchXml` query of this table, its columns checked.
    fn fetch(&self, s: &'static Schema, xml: &str) -> Result<fetch::Fetch, Response> {
        let bad = |msg: String| dv_error(StatusCode::BAD_REQUEST, "0x80041103", &msg);
        let f = fetch::parse(xml).map_err(|e| bad(format!("Invalid FetchXML: {e}.")))?;
        if f.entity != s.logical {
            return Err(bad(format!(
                "The entity name {} does not match the collection {}.",
                f.entity, s.entity_set
            )));
        }
        let columns = f
            .attributes
            .iter()
            .chain(f.conditions.iter().map(|(c, _)| c));
        if let Some(c) = columns
            .into_iter()
            .find(|c| *c != s.id_field && !s.all_columns().any(|k| k == *c))
        {
            return Err(bad(format!(
                "'{}' entity doesn't contain attribute with Name = '{c}'.",
                s.logical
            )));
        }
        for link in &f.links {
            let column = format!("_{}_value", link.to);
            let lookup = s.lookups.iter().find(|l| l.column == column);
            let target = lookup.and_then(|l| schema(l.target));
            match target {
                Some(t) if t.logical == link.entity && t.id_field == link.from => {
                    if let Some(c) = link
                        .attributes
                        .iter()
                        .find(|c| !t.all_columns().any(|k| k == *c))
                    {
                        return Err(bad(format!(
                            "'{}' entity doesn't contain attribute with Name = '{c}'.",
                            t.logical
                        )));
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "No relationship from {}.{} to {}.{} (the simulator joins along lookups only).",
                        s.logical, link.to, link.entity, link.from
                    )));
                }
            }
        }
        Ok(f)
    }

    pub(super) fn list(&self, s: &'static Schema, headers: &HeaderMap) -> Response {
        let q = Query::parse(&self.query);
        if let Some(refused) = unsupported_option(&q) {
            return refused;
        }
        if let Some(token) = q.get(changes::DELTA_TOKEN) {
            return self.delta(s, &q, token);
        }
        let tracking = changes::asked(headers);
        if tracking && let Some(refused) = changes::refusal(&q) {
            return refused;
        }
        let paging = match Paging::parse(&q, headers) {
            Ok(p) => p,
            Err(resp) => return resp,
        };
        let fetch = match q.get("fetchXml").map(|x| self.fetch(s, x)).transpose() {
            Ok(f) => f,
            Err(resp) => return resp,
        };
        let select = match &fetch {
            Some(f) if !f.attributes.is_empty() => Some(f.attributes.clone()),
            Some(_) => None,
            None => match self.select(s, &q) {
                Ok(sel) => sel,
                Err(resp) => return resp,
            },
        };
        let conditions = match q.get("$filter").map(parse_filter).transpose() {
            Ok(c) => c.unwrap_or_default(),
            Err(msg) => return dv_error(StatusCode::BAD_REQUEST, "0x80060888", &msg),
        };
        let expands = match navigation::expand_of(s, &q) {
            Ok(e) => e,
            Err(resp) => return resp,
        };
        let links = fetch.as_ref().map(|f| f.links.clone()).unwrap_or_default();
        let fetched = fetch.map(|f| f.conditions).unwrap_or_default();
        let db = lock(&self.sim.db);
        let Some(table) = db.tables.get(s.entity_set) else {
            return dv_error(StatusCode::NOT_FOUND, "0x80060888", "No such table.");
        };
        let keep = |(id, row): &(&Uuid, &Row)| {
            matches(&row.fields, s.id_field, **id, &conditions)
                && fetch::matches(&row.fields, (s.id_field, **id), &fetched)
        };
        let start = paging.after.map(|(_, last)| last);
        let mut matching = table
            .range((
                start.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                std::ops::Bound::Unbounded,
            ))
            .filter(keep);
        let page: Vec<(Uuid, &Row)> = matching
            .by_ref()
            .take(paging.limit)
            .map(|(id, r)| (*id, r))
            .collect();
        let more = paging.page_size.is_some() && matching.next().is_some();
        let total = q
            .get("$count")
            .filter(|c| *c == "true")
            .map(|_| table.iter().filter(keep).count().min(5000));
        let mut body = Map::new();
        body.insert(
            "@odata.context".into(),
            Value::String(self.context(s, select.as_deref(), false)),
        );
        if let Some(n) = total {
            body.insert("@odata.count".into(), json!(n));
        }
        let value = page.iter().map(|(id, row)| {
            let mut v = Self::project(s, *id, row, select.as_deref());
            navigation::add_expanded(&db, s, (*id, row), &expands, &mut v);
            fetch::add_linked(&db, s, row, &links, &mut v);
            v
        });
        body.insert("value".into(), Value::Array(value.collect()));
        if more && let (Some((first, _)), Some((last, _))) = (page.first(), page.last()) {
            let page_no = paging.after.map_or(2, |(n, _)| n + 1);
            body.insert(
                "@odata.nextLink".into(),
                Value::String(self.next_link(s, page_no, *first, *last)),
            );
        } else if tracking {
            body.insert(
                "@odata.deltaLink".into(),
                Value::String(self.delta_link(s, db.next_version)),
            );
        }
        drop(db);
        let mut resp = json_response(StatusCode::OK, &Value::Object(body));
        let applied: Vec<String> = paging
            .page_size
            .map(|n| format!("odata.maxpagesize={n}"))
            .into_iter()
            .chain(tracking.then(|| "odata.track-changes".to_owned()))
            .collect();
        if let Ok(v) = HeaderValue::from_str(&applied.join(","))
            && !applied.is_empty()
        {
            resp.headers_mut().insert("preference-applied", v);
        }
        resp
    }

    /// The next page's link: the caller's query byte for byte (minus any old
    /// skiptoken) and a new paging cookie.
    fn next_link(&self, s: &Schema, page_no: usize, first: Uuid, last: Uuid) -> String {
        let token = skiptoken(page_no, s.id_field, first, last);
        self.link_with(s, ("$skiptoken", &token))
    }

    /// The collection's link with the caller's query byte for byte, less
    /// any paging or delta token, and `option` set.
    pub(super) fn link_with(&self, s: &Schema, (name, value): (&str, &str)) -> String {
        let mut link = format!("{}/{}?", self.base, s.entity_set);
        for p in self.query.split('&').filter(|p| {
            let key = percent_encoding::percent_decode_str(p.split('=').next().unwrap_or(""))
                .decode_utf8_lossy();
            !p.is_empty() && key != "$skiptoken" && key != changes::DELTA_TOKEN
        }) {
            link.push_str(p);
            link.push('&');
        }
        link.push_str(&format!("{name}={value}"));
        link
    }

    pub(super) fn retrieve(&self, s: &'static Schema, id: Uuid, headers: &HeaderMap) -> Response {
        let q = Query::parse(&self.query);
        let select = match self.select(s, &q) {
            Ok(sel) => sel,
            Err(resp) => return resp,
        };
        let expands = match navigation::expand_of(s, &q) {
            Ok(e) => e,
            Err(resp) => return resp,
        };
        let db = lock(&self.sim.db);
        let Some(row) = db.tables.get(s.entity_set).and_then(|t| t.get(&id)) else {
            return not_found(s, id);
        };
        let tag = etag(row.version);
        if headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == tag)
        {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            insert_etag(resp.headers_mut(), &tag);
            return resp;
        }
        let mut body = Self::project(s, id, row, select.as_deref());
        navigation::add_expanded(&db, s, (id, row), &expands, &mut body);
        body["@odata.context"] = Value::String(self.context(s, select.as_deref(), true));
        drop(db);
        let mut resp = json_response(StatusCode::OK, &body);
        insert_etag(resp.headers_mut(), &tag);
        resp
    }

    pub(super) fn check_columns(s: &Schema, body: &Map<String, Value>) -> Result<(), Response> {
        for key in body.keys() {
            if key.starts_with('_') && key.ends_with("_value") {
                return Err(dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    &format!("The property '{key}' is read-only; set lookups with @odata.bind."),
                ));
            }
            let known = key == s.id_field
                || s.columns.contains(&key.as_str())
                || key.contains("@odata.bind")
                || key.starts_with('@');
            if !known {
                return Err(dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    &format!(
                        "Invalid property '{key}' was found in entity 'Microsoft.Dynamics.CRM.{}'.",
                        s.logical
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn create(
        &self,
        s: &'static Schema,
        headers: &HeaderMap,
        mut body: Map<String, Value>,
    ) -> Response {
        if let Err(resp) = Self::check_columns(s, &body) {
            return resp;
        }
        let id = match body.remove(s.id_field) {
            Some(Value::String(v)) => match Uuid::parse_str(&v) {
                Ok(id) => id,
                Err(_) => {
                    return dv_error(StatusCode::BAD_REQUEST, "0x80040203", "Invalid id value.");
                }
            },
            _ => Uuid::new_v4(),
        };
        let mut db = lock(&self.sim.db);
        if let Err(resp) = navigation::bind_lookups(&db, s, &mut body) {
            return resp;
        }
        if db
            .tables
            .get(s.entity_set)
            .is_some_and(|t| t.contains_key(&id))
        {
            return dv_error(
                StatusCode::PRECONDITION_FAILED,
                "0x80040237",
                "A record with matching key values already exists.",
            );
        }
        let now = utc_timestamp(now_epoch()).replace(' ', "T");
        body.insert("createdon".into(), Value::String(now.clone()));
        body.insert("modifiedon".into(), Value::String(now));
        body.entry("statecode").or_insert(json!(0));
        let acting = self.acting;
        body.insert("_createdby_value".into(), json!(acting.user));
        body.insert("_modifiedby_value".into(), json!(acting.user));
        body.insert(
            "_createdonbehalfby_value".into(),
            json!(acting.on_behalf_of),
        );
        let version = db.bump();
        let row = Row {
            fields: body,
            version,
            files: HashMap::new(),
        };
        let representation = wants_representation(headers).then(|| {
            let mut v = Self::project(s, id, &row, None);
            v["@odata.context"] = Value::String(self.context(s, None, true));
            v
        });
        if let Some(t) = db.tables.get_mut(s.entity_set) {
            t.insert(id, row);
        }
        drop(db);
        match representation {
            Some(body) => {
                let mut resp = json_response(StatusCode::CREATED, &body);
                let h = resp.headers_mut();
                h.insert(
                    "preference-applied",
                    HeaderValue::from_static("return=representation"),
                );
                insert_etag(h, &etag(version));
                resp
            }
            None => self.entity_id_response(s, id),
        }
    }

    pub(super) fn entity_id_response(&self, s: &Schema, id: Uuid) -> Response {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        if let Ok(v) = HeaderValue::from_str(&self.entity_url(s, id)) {
            resp.headers_mut().insert("odata-entityid", v.clone());
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }

    pub(super) fn update(
        &self,
        s: &'static Schema,
        id: Uuid,
        headers: &HeaderMap,
        body: Map<String, Value>,
    ) -> Response {
        if let Err(resp) = Self::check_columns(s, &body) {
            return resp;
        }
        let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
        let if_none_match = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok());
        let mut db = lock(&self.sim.db);
        let exists = db
            .tables
            .get(s.entity_set)
            .and_then(|t| t.get(&id))
            .map(|r| r.version);
        match (exists, if_match, if_none_match) {
            (None, Some(_), _) => return not_found(s, id),
            (None, None, _) => {
                // Upsert: PATCH to a missing key creates the row.
                drop(db);
                let mut body = body;
                body.insert(s.id_field.to_owned(), Value::String(id.to_string()));
                return self.create(s, headers, body);
            }
            (Some(_), _, Some("*")) => {
                return dv_error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80040237",
                    "A record with matching key values already exists.",
                );
            }
            (Some(v), Some(tag), _) if tag != "*" && tag != etag(v) => {
                return dv_error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property provided.",
                );
            }
            (Some(_), _, _) => {}
        }
        let mut body = body;
        if let Err(resp) = navigation::bind_lookups(&db, s, &mut body) {
            return resp;
        }
        let version = db.bump();
        let now = utc_timestamp(now_epoch()).replace(' ', "T");
        let Some(row) = db.tables.get_mut(s.entity_set).and_then(|t| t.get_mut(&id)) else {
            return not_found(s, id);
        };
        for (k, v) in body {
            if k != s.id_field {
                row.fields.insert(k, v);
            }
        }
        row.fields.insert("modifiedon".into(), Value::String(now));
        row.fields
            .insert("_modifiedby_value".into(), json!(self.acting.user));
        row.version = version;
        if wants_representation(headers) {
            let mut v = Self::project(s, id, row, None);
            v["@odata.context"] = Value::String(self.context(s, None, true));
            drop(db);
            let mut resp = json_response(StatusCode::OK, &v);
            resp.headers_mut().insert(
                "preference-applied",
                HeaderValue::from_static("return=representation"),
            );
            insert_etag(resp.headers_mut(), &etag(version));
            return resp;
        }
        drop(db);
        let mut resp = self.entity_id_response(s, id);
        resp.headers_mut().remove(header::LOCATION);
        insert_etag(resp.headers_mut(), &etag(version));
        resp
    }

    pub(super) fn delete(&self, s: &'static Schema, id: Uuid) -> Response {
        let mut db = lock(&self.sim.db);
        let removed = db.tables.get_mut(s.entity_set).and_then(|t| t.remove(&id));
        match removed {
            Some(_) => {
                let version = db.bump();
                db.deleted.push(Deleted {
                    set: s.entity_set,
                    id,
                    version,
                });
                StatusCode::NO_CONTENT.into_response()
            }
            None => not_found(s, id),
        }
    }
}

/// How much of a collection to return: `$top`, `Prefer: odata.maxpagesize`
/// and where the last page ended (`$skiptoken`).
struct Paging {
    page_size: Option<usize>,
    limit: usize,
    after: Option<(usize, Uuid)>,
}

impl Paging {
    fn parse(q: &Query, headers: &HeaderMap) -> Result<Self, Response> {
        let top = q
            .get("$top")
            .map(str::parse::<usize>)
            .transpose()
            .map_err(|_| {
                dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    "The value of $top must be a non-negative integer.",
                )
            })?;
        let page_size = max_page_size(headers).map(|n| n.clamp(1, MAX_PAGE));
        let after = match q.get("$skiptoken") {
            None => None,
            Some(tok) => Some(parse_skiptoken(tok).ok_or_else(|| {
                dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80040203",
                    "The $skiptoken paging cookie is invalid.",
                )
            })?),
        };
        // `$top` is ignored when a page size is asked for (docs/dataverse.md).
        let limit = match (page_size, top) {
            (Some(n), _) => n,
            (None, Some(t)) => t.min(MAX_PAGE),
            (None, None) => MAX_PAGE,
        };
        Ok(Self {
            page_size,
            limit,
            after,
        })
    }
}

/// The query options a collection read understands here; any other
/// system query option (`$orderby`, `$apply`, …) or the `sql` parameter is
/// refused as Dataverse refuses what it cannot run, rather than ignored
/// (an answer in another order or unaggregated would be a silent lie).
const OPTIONS: &[&str] = &[
    "$select",
    "$filter",
    "$expand",
    "$top",
    "$count",
    "$skiptoken",
    changes::DELTA_TOKEN,
    "fetchXml",
];

fn unsupported_option(q: &Query) -> Option<Response> {
    let (name, _) = q
        .options
        .iter()
        .find(|(k, _)| (k.starts_with('$') || k == "sql") && !OPTIONS.contains(&k.as_str()))?;
    Some(dv_error(
        StatusCode::BAD_REQUEST,
        "0x80060888",
        &format!("The query parameter {name} is not supported"),
    ))
}
