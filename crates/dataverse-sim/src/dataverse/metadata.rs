//! The org's schema as Dataverse publishes it: the `$metadata` CSDL
//! document, `EntityDefinitions` and `GlobalOptionSetDefinitions`.
//!
//! A real org has hundreds of tables (system and custom), so its CSDL is
//! several MB (docs/dataverse.md, "The Web API"). Besides the three tables
//! it serves rows of, the simulated org declares [`CUSTOM_TABLES`] custom
//! ones of a few dozen columns each, which brings `$metadata` to about
//! 5 MB. Every answer carries an `ETag` derived from the schema version,
//! and a matching `If-None-Match` is answered 304. [`SimHandle`] can
//! publish a change (`change_schema`), which adds a column and changes
//! every tag, as publishing customisations does.
//!
//! [`SimHandle`]: crate::SimHandle

use std::fmt::Write as _;

use super::definitions::{Refused, Relationship, Table};
use super::*;

/// Custom tables declared besides the ones with rows.
const CUSTOM_TABLES: usize = 600;
/// Columns of each custom table.
const CUSTOM_COLUMNS: usize = 56;

const WORDS: [&str; 24] = [
    "amount",
    "status",
    "region",
    "owner",
    "category",
    "priority",
    "source",
    "channel",
    "budget",
    "territory",
    "segment",
    "stage",
    "rating",
    "tier",
    "contract",
    "invoice",
    "product",
    "campaign",
    "warehouse",
    "carrier",
    "project",
    "milestone",
    "approval",
    "renewal",
];
const TYPES: [&str; 6] = [
    "Edm.String",
    "Edm.Int32",
    "Edm.Decimal",
    "Edm.DateTimeOffset",
    "Edm.Boolean",
    "Edm.Guid",
];

/// The schema version's tag for one resource.
fn etag(version: u64, resource: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{resource}-{version}\"")).expect("ascii")
}

/// The answer for `If-None-Match`, or `None` to send the document.
fn not_modified(headers: &HeaderMap, tag: &HeaderValue) -> Option<Response> {
    let tag = tag.to_str().ok()?;
    let named = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().trim_start_matches("W/") == tag);
    named.then(|| {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut()
            .insert(header::ETAG, HeaderValue::from_str(tag).expect("ascii"));
        resp
    })
}

/// `GET $metadata`.
pub(super) fn csdl(sim: &SimState, headers: &HeaderMap) -> Response {
    let version = sim.schema_version();
    let tag = etag(version, "metadata");
    if let Some(resp) = not_modified(headers, &tag) {
        return resp;
    }
    let document = {
        let mut cached = lock(&sim.csdl);
        match &*cached {
            Some((v, doc)) if *v == version => doc.clone(),
            _ => {
                let doc = Bytes::from(build_csdl(version));
                *cached = Some((version, doc.clone()));
                doc
            }
        }
    };
    let mut resp = (StatusCode::OK, document).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    h.insert(header::ETAG, tag);
    resp
}

/// The custom tables' names, in order.
fn custom_table(i: usize) -> String {
    format!("dvp_{}{}", WORDS[i % WORDS.len()], i)
}

/// Columns of custom table `i` (one more per published schema change on
/// the first table).
fn custom_columns(i: usize, version: u64) -> Vec<(String, &'static str)> {
    let extra = if i == 0 { version as usize - 1 } else { 0 };
    (0..CUSTOM_COLUMNS + extra)
        .map(|c| {
            let word = WORDS[(i * 7 + c * 5) % WORDS.len()];
            (format!("dvp_{word}_{c}"), TYPES[(i + c) % TYPES.len()])
        })
        .collect()
}

fn build_csdl(version: u64) -> String {
    let mut types = String::new();
    let mut sets = String::new();
    for s in SCHEMAS {
        let columns: Vec<(String, &str)> = s
            .all_columns()
            .map(|c| {
                let ty = if c.starts_with('_') {
                    "Edm.Guid"
                } else {
                    "Edm.String"
                };
                (c.to_owned(), ty)
            })
            .collect();
        entity_type(&mut types, s.logical, s.id_field, &columns);
        // Its relationships, before the type closes (entity_type ends it).
        types.truncate(types.len() - "</EntityType>".len());
        let mut bindings = String::new();
        for (nav, target, collection) in navigations(s) {
            let ty = if collection {
                format!("Collection(mscrm.{})", target.logical)
            } else {
                format!("mscrm.{}", target.logical)
            };
            let _ = write!(types, "<NavigationProperty Name=\"{nav}\" Type=\"{ty}\"/>");
            let _ = write!(
                bindings,
                "<NavigationPropertyBinding Path=\"{nav}\" Target=\"{}\"/>",
                target.entity_set
            );
        }
        types.push_str("</EntityType>");
        let _ = write!(
            sets,
            "<EntitySet Name=\"{}\" EntityType=\"Microsoft.Dynamics.CRM.{}\">{bindings}</EntitySet>",
            s.entity_set, s.logical
        );
    }
    for i in 0..CUSTOM_TABLES {
        let name = custom_table(i);
        entity_type(
            &mut types,
            &name,
            &format!("{name}id"),
            &custom_columns(i, version),
        );
        let _ = write!(
            sets,
            "<EntitySet Name=\"{name}s\" EntityType=\"Microsoft.Dynamics.CRM.{name}\"><NavigationPropertyBinding Path=\"owninguser\" Target=\"systemusers\"/></EntitySet>"
        );
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><edmx:Edmx Version=\"4.0\" xmlns:edmx=\"http://docs.oasis-open.org/odata/ns/edmx\"><edmx:DataServices><Schema Namespace=\"Microsoft.Dynamics.CRM\" Alias=\"mscrm\" xmlns=\"http://docs.oasis-open.org/odata/ns/edm\"><Annotation Term=\"Org.SchemaVersion\" Int=\"{version}\"/>{types}<EntityContainer Name=\"System\">{sets}</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>"
    )
}

/// The service document (`GET /api/data/v9.2/`): every entity set of the
/// `$metadata` container, as Dataverse lists them (docs/dataverse.md,
/// "The service document").
pub(super) fn service_document(base: &str) -> Response {
    let custom = (0..CUSTOM_TABLES).map(|i| format!("{}s", custom_table(i)));
    let sets: Vec<Value> = SCHEMAS
        .iter()
        .map(|s| s.entity_set.to_owned())
        .chain(custom)
        .map(|name| json!({"name": name, "kind": "EntitySet", "url": name}))
        .collect();
    super::json_response(
        StatusCode::OK,
        &json!({"@odata.context": format!("{base}/$metadata"), "value": sets}),
    )
}

/// A table's navigation properties: name, target, collection-valued.
fn navigations(s: &Schema) -> Vec<(&'static str, &'static Schema, bool)> {
    let single = s.lookups.iter().map(|l| (l.nav, l.target, false));
    let many = s.relations.iter().map(|r| (r.nav, r.target, true));
    single
        .chain(many)
        .filter_map(|(nav, target, collection)| schema(target).map(|t| (nav, t, collection)))
        .collect()
}

/// One `EntityType` with its key, columns, lookups and their annotations,
/// in the shape Dataverse writes them.
fn entity_type(out: &mut String, logical: &str, id: &str, columns: &[(String, &str)]) {
    let _ = write!(
        out,
        "<EntityType Name=\"{logical}\" BaseType=\"mscrm.crmbaseentity\"><Key><PropertyRef Name=\"{id}\"/></Key><Property Name=\"{id}\" Type=\"Edm.Guid\"/>"
    );
    for (name, ty) in columns {
        let _ = write!(
            out,
            "<Property Name=\"{name}\" Type=\"{ty}\"><Annotation Term=\"Org.OData.Core.V1.Description\" String=\"{name} of the {logical} table\"/></Property>"
        );
    }
    let _ = write!(
        out,
        "<Property Name=\"_owninguser_value\" Type=\"Edm.Guid\"/><NavigationProperty Name=\"owninguser\" Type=\"mscrm.systemuser\" Nullable=\"false\" Partner=\"user_{logical}\"><ReferentialConstraint Property=\"_owninguser_value\" ReferencedProperty=\"systemuserid\"/></NavigationProperty></EntityType>"
    );
}

/// `GET EntityDefinitions…` and `GET GlobalOptionSetDefinitions…`:
/// `rest` is the path after the version, decoded.
pub(super) fn definitions(
    sim: &SimState,
    (base, rest, query): (&str, &str, &str),
    headers: &HeaderMap,
) -> Response {
    let version = sim.schema_version();
    let resource = rest.split(['(', '/']).next().unwrap_or("");
    // Each query is its own answer, with its own tag.
    let query_hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (rest, query).hash(&mut h);
        h.finish()
    };
    let tag = etag(
        version,
        &format!("{}-{query_hash:x}", resource.to_ascii_lowercase()),
    );
    if let Some(resp) = not_modified(headers, &tag) {
        return resp;
    }
    let body = if resource == "GlobalOptionSetDefinitions" {
        option_sets(base)
    } else {
        match super::definitions::answer(base, rest, query, &tables(version)) {
            Ok(Some(body)) => body,
            Ok(None) => {
                return dv_error(
                    StatusCode::NOT_FOUND,
                    "0x80060888",
                    &format!("Resource not found for the segment '{rest}'."),
                );
            }
            Err(Refused(status, message)) => return dv_error(status, "0x80060888", &message),
        }
    };
    let mut resp = json_response(StatusCode::OK, &body);
    resp.headers_mut().insert(header::ETAG, tag);
    resp
}

/// The OData type of a sample table's column.
fn column_type(column: &str) -> &'static str {
    match column {
        "createdon" | "modifiedon" => "Edm.DateTimeOffset",
        _ => "Edm.String",
    }
}

/// The relationship of a lookup of `s`: `s` references its target.
fn lookup_relationship(s: &Schema, l: &Lookup) -> Option<Relationship> {
    let target = schema(l.target)?;
    let attribute = l.column.trim_start_matches('_').trim_end_matches("_value");
    Some(Relationship {
        schema_name: format!("{}_{}_{}", target.logical, s.logical, attribute),
        referenced: target.logical.to_owned(),
        referenced_id: target.id_field.to_owned(),
        referencing: s.logical.to_owned(),
        attribute: attribute.to_owned(),
        referencing_nav: l.nav.to_owned(),
        // The target's collection navigation for this lookup, where it has one.
        referenced_nav: target
            .relations
            .iter()
            .find(|r| r.target == s.entity_set && r.column == l.column)
            .map_or_else(
                || format!("{}_{}", s.entity_set, attribute),
                |r| r.nav.to_owned(),
            ),
    })
}

/// Every table as its definition shows it.
fn tables(version: u64) -> Vec<Table> {
    SCHEMAS
        .iter()
        .map(|s| Table {
            logical: s.logical.to_owned(),
            set: s.entity_set.to_owned(),
            primary_id: s.id_field.to_owned(),
            primary_name: s.columns.first().copied().unwrap_or(s.id_field).to_owned(),
            columns: std::iter::once((s.id_field.to_owned(), "Edm.Guid"))
                .chain(s.columns.iter().map(|c| ((*c).to_owned(), column_type(c))))
                .collect(),
            change_tracking: true,
            many_to_one: s
                .lookups
                .iter()
                .filter_map(|l| lookup_relationship(s, l))
                .collect(),
            one_to_many: SCHEMAS
                .iter()
                .flat_map(|other| other.lookups.iter().map(move |l| (other, l)))
                .filter(|(_, l)| l.target == s.entity_set)
                .filter_map(|(other, l)| lookup_relationship(other, l))
                .collect(),
        })
        .chain((0..CUSTOM_TABLES).map(|i| {
            let name = custom_table(i);
            Table {
                primary_id: format!("{name}id"),
                primary_name: format!("{name}id"),
                set: format!("{name}s"),
                columns: custom_columns(i, version),
                change_tracking: false,
                many_to_one: Vec::new(),
                one_to_many: Vec::new(),
                logical: name,
            }
        }))
        .collect()
}

fn option_sets(base: &str) -> Value {
    let value: Vec<Value> = WORDS
        .iter()
        .map(|w| {
            let options: Vec<Value> = (0..8)
                .map(|i| json!({"Value": 100_000_000 + i, "Label": {"UserLocalizedLabel": {"Label": format!("{w} {i}")}}}))
                .collect();
            json!({"Name": format!("dvp_{w}"), "OptionSetType": "Picklist", "Options": options})
        })
        .collect();
    json!({
        "@odata.context": format!("{base}/$metadata#GlobalOptionSetDefinitions"),
        "value": value,
    })
}
