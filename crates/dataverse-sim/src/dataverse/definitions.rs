//! `EntityDefinitions` queried as Dataverse answers it (docs/dataverse.md,
//! "Table definitions"): `$select` (with `MetadataId` always returned),
//! `$filter` (`eq` joined by `and` / `or`), `$expand=Attributes` with its
//! own `$select` and `$filter`, keys by `LogicalName` and `MetadataId`,
//! `/Attributes` (and its type casts), `/Keys` and the relationships. Any other query option gets Dataverse's error shape, never
//! an answer that ignores it.

use serde_json::{Map, Value, json};
use uuid::Uuid;

/// A table as its definition shows it.
pub(super) struct Table {
    pub(super) logical: String,
    pub(super) set: String,
    pub(super) primary_id: String,
    pub(super) primary_name: String,
    /// Columns and their OData types.
    pub(super) columns: Vec<(String, &'static str)>,
    /// Changes are tracked (delta links).
    pub(super) change_tracking: bool,
    /// Lookups of this table to others (many-to-one).
    pub(super) many_to_one: Vec<Relationship>,
    /// Lookups of other tables to this one (one-to-many).
    pub(super) one_to_many: Vec<Relationship>,
}

/// A one-to-many relationship: `referencing` rows name a `referenced` row
/// through `attribute`.
pub(super) struct Relationship {
    pub(super) schema_name: String,
    pub(super) referenced: String,
    pub(super) referenced_id: String,
    pub(super) referencing: String,
    pub(super) attribute: String,
    pub(super) referencing_nav: String,
    pub(super) referenced_nav: String,
}

/// A refused query: Dataverse's status, code and message.
pub(super) struct Refused(pub(super) http::StatusCode, pub(super) String);

/// The options of one query, read from its query string.
#[derive(Default)]
struct Query {
    select: Option<Vec<String>>,
    filter: Option<String>,
    expand: Option<String>,
}

/// The answer to `rest` (after the version) with `query`, or `None` for a
/// path that names nothing.
pub(super) fn answer(
    base: &str,
    rest: &str,
    query: &str,
    tables: &[Table],
) -> Result<Option<Value>, Refused> {
    let q = parse_query(query)?;
    let Some(key) = rest.strip_prefix("EntityDefinitions(") else {
        if rest != "EntityDefinitions" {
            return Ok(None);
        }
        let mut value = Vec::new();
        for t in tables {
            let d = definition(t);
            if matches(&d, q.filter.as_deref(), "EntityMetadata")? {
                value.push(shape(d, t, &q)?);
            }
        }
        return Ok(Some(json!({
            "@odata.context": format!("{base}/$metadata#EntityDefinitions"),
            "value": value,
        })));
    };
    let Some((key, tail)) = key.split_once(')') else {
        return Ok(None);
    };
    let Some(table) = tables.iter().find(|t| is_key_of(key, t)) else {
        return Ok(None);
    };
    match tail {
        "" => {
            let mut one = shape(definition(table), table, &q)?;
            one["@odata.context"] = json!(format!("{base}/$metadata#EntityDefinitions/$entity"));
            Ok(Some(one))
        }
        "/Attributes" => {
            let value = attributes(table, q.select.as_deref(), q.filter.as_deref())?;
            Ok(Some(json!({
                "@odata.context": format!("{base}/$metadata#EntityDefinitions('{}')/Attributes", table.logical),
                "value": value,
            })))
        }
        "/Keys" => Ok(Some(json!({
            // The simulated tables define no alternate keys.
            "@odata.context": format!("{base}/$metadata#EntityDefinitions('{}')/Keys", table.logical),
            "value": [],
        }))),
        "/ManyToOneRelationships" | "/OneToManyRelationships" => {
            let (name, list) = match tail {
                "/ManyToOneRelationships" => ("ManyToOneRelationships", &table.many_to_one),
                _ => ("OneToManyRelationships", &table.one_to_many),
            };
            let value: Vec<Value> = list.iter().map(relationship).collect();
            Ok(Some(json!({
                "@odata.context": format!("{base}/$metadata#EntityDefinitions('{}')/{name}", table.logical),
                "value": value,
            })))
        }
        _ => match tail.strip_prefix("/Attributes/Microsoft.Dynamics.CRM.") {
            Some(cast) if CASTS.iter().any(|(_, c)| *c == cast) => {
                let all = attributes(table, None, None)?;
                let value: Vec<Value> = all
                    .into_iter()
                    .filter(|a| cast_of(a["AttributeType"].as_str().unwrap_or("")) == Some(cast))
                    .map(|a| select(a, q.select.as_deref(), "AttributeMetadata"))
                    .collect::<Result<_, _>>()?;
                Ok(Some(json!({
                    "@odata.context": format!(
                        "{base}/$metadata#EntityDefinitions('{}')/Attributes/Microsoft.Dynamics.CRM.{cast}",
                        table.logical
                    ),
                    "value": value,
                })))
            }
            _ => Ok(None),
        },
    }
}

/// Attribute types and the metadata type a cast names.
const CASTS: [(&str, &str); 7] = [
    ("String", "StringAttributeMetadata"),
    ("DateTime", "DateTimeAttributeMetadata"),
    ("Integer", "IntegerAttributeMetadata"),
    ("Decimal", "DecimalAttributeMetadata"),
    ("Boolean", "BooleanAttributeMetadata"),
    ("Picklist", "PicklistAttributeMetadata"),
    ("Lookup", "LookupAttributeMetadata"),
];

fn cast_of(attribute_type: &str) -> Option<&'static str> {
    CASTS
        .iter()
        .find(|(t, _)| *t == attribute_type)
        .map(|(_, c)| *c)
}

fn relationship(r: &Relationship) -> Value {
    json!({
        "MetadataId": metadata_id(&r.schema_name),
        "SchemaName": r.schema_name,
        "RelationshipType": "OneToManyRelationship",
        "ReferencedEntity": r.referenced,
        "ReferencedAttribute": r.referenced_id,
        "ReferencingEntity": r.referencing,
        "ReferencingAttribute": r.attribute,
        "ReferencingEntityNavigationPropertyName": r.referencing_nav,
        "ReferencedEntityNavigationPropertyName": r.referenced_nav,
    })
}

fn parse_query(query: &str) -> Result<Query, Refused> {
    let mut q = Query::default();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "$select" => q.select = Some(list(&v)),
            "$filter" => q.filter = Some(v.into_owned()),
            "$expand" => q.expand = Some(v.into_owned()),
            other if other.starts_with('$') => {
                return Err(Refused(
                    http::StatusCode::BAD_REQUEST,
                    format!("The query option '{other}' is not supported on EntityDefinitions."),
                ));
            }
            _ => {}
        }
    }
    Ok(q)
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `LogicalName='account'` or a `MetadataId`.
fn is_key_of(key: &str, t: &Table) -> bool {
    match key
        .strip_prefix("LogicalName='")
        .and_then(|k| k.strip_suffix('\''))
    {
        Some(logical) => logical == t.logical,
        None => Uuid::parse_str(key).is_ok_and(|id| id == metadata_id(&t.logical)),
    }
}

fn metadata_id(name: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
}

fn definition(t: &Table) -> Value {
    json!({
        "MetadataId": metadata_id(&t.logical),
        "LogicalName": t.logical,
        "SchemaName": t.logical,
        "EntitySetName": t.set,
        "LogicalCollectionName": t.set,
        "PrimaryIdAttribute": t.primary_id,
        "PrimaryNameAttribute": t.primary_name,
        "IsCustomEntity": t.logical.starts_with("dvp_"),
        "IsPrivate": false,
        "DisplayName": {"UserLocalizedLabel": {"Label": t.logical, "LanguageCode": 1033}},
        "AttributeCount": t.columns.len(),
        "ChangeTrackingEnabled": t.change_tracking,
        "CanChangeTrackingBeEnabled": {"Value": t.change_tracking, "CanBeChanged": false},
    })
}

/// The definition with `$select` and `$expand` applied.
fn shape(d: Value, t: &Table, q: &Query) -> Result<Value, Refused> {
    let mut out = select(d, q.select.as_deref(), "EntityMetadata")?;
    if let Some(expand) = &q.expand {
        let (name, inner) = match expand.split_once('(') {
            Some((name, inner)) => (name.trim(), inner.strip_suffix(')').unwrap_or(inner)),
            None => (expand.trim(), ""),
        };
        if name != "Attributes" {
            return Err(no_property(name, "EntityMetadata"));
        }
        let mut sel = None;
        let mut filter = None;
        for option in inner.split(';').filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some(("$select", v)) => sel = Some(list(v)),
                Some(("$filter", v)) => filter = Some(v.to_owned()),
                _ => {
                    return Err(Refused(
                        http::StatusCode::BAD_REQUEST,
                        format!(
                            "The query option '{option}' is not supported inside $expand on EntityDefinitions."
                        ),
                    ));
                }
            }
        }
        out["Attributes"] = Value::Array(attributes(t, sel.as_deref(), filter.as_deref())?);
    }
    Ok(out)
}

fn attributes(
    t: &Table,
    sel: Option<&[String]>,
    filter: Option<&str>,
) -> Result<Vec<Value>, Refused> {
    let mut out = Vec::new();
    for (name, ty) in &t.columns {
        let (kind, kind_name) = match *ty {
            "Edm.Guid" => ("Uniqueidentifier", "UniqueidentifierType"),
            "Edm.Int32" => ("Integer", "IntegerType"),
            "Edm.Decimal" => ("Decimal", "DecimalType"),
            "Edm.Boolean" => ("Boolean", "BooleanType"),
            "Edm.DateTimeOffset" => ("DateTime", "DateTimeType"),
            _ => ("String", "StringType"),
        };
        let a = json!({
            "MetadataId": metadata_id(&format!("{}.{name}", t.logical)),
            "LogicalName": name,
            "SchemaName": name,
            "EntityLogicalName": t.logical,
            "AttributeType": kind,
            "AttributeTypeName": {"Value": kind_name},
            "IsPrimaryId": *name == t.primary_id,
            "IsPrimaryName": *name == t.primary_name,
            "IsValidForRead": true,
            "IsValidForCreate": *name != t.primary_id,
            "IsValidForUpdate": *name != t.primary_id,
        });
        let mut a = a;
        if kind == "DateTime" {
            a["DateTimeBehavior"] = json!({"Value": "UserLocal"});
            a["Format"] = json!("DateAndTime");
        }
        if matches(&a, filter, "AttributeMetadata")? {
            out.push(select(a, sel, "AttributeMetadata")?);
        }
    }
    Ok(out)
}

/// Only the selected properties, and `MetadataId` always.
fn select(d: Value, sel: Option<&[String]>, ty: &str) -> Result<Value, Refused> {
    let (Some(sel), Value::Object(all)) = (sel, &d) else {
        return Ok(d);
    };
    let mut out = Map::new();
    out.insert("MetadataId".into(), all["MetadataId"].clone());
    for name in sel {
        let v = all.get(name).ok_or_else(|| no_property(name, ty))?;
        out.insert(name.clone(), v.clone());
    }
    Ok(Value::Object(out))
}

/// Whether `d` passes `filter`: `Name eq 'text'`, `Name eq true` or
/// `Name eq <guid>`, joined by `and` (binding first) and `or`.
fn matches(d: &Value, filter: Option<&str>, ty: &str) -> Result<bool, Refused> {
    let Some(filter) = filter else {
        return Ok(true);
    };
    if filter.contains(['(', ')']) {
        // Grouping would change what `and` and `or` join: refused rather
        // than read wrongly.
        return Err(Refused(
            http::StatusCode::BAD_REQUEST,
            format!(
                "The filter '{filter}' groups terms in parentheses, which definitions here do not support."
            ),
        ));
    }
    let mut any = false;
    for alternative in filter.split(" or ") {
        let mut all = true;
        for term in alternative.split(" and ") {
            all &= term_holds(d, term.trim(), ty)?;
        }
        any |= all;
    }
    Ok(any)
}

fn term_holds(d: &Value, term: &str, ty: &str) -> Result<bool, Refused> {
    let Some((name, literal)) = term.split_once(" eq ") else {
        return Err(Refused(
            http::StatusCode::BAD_REQUEST,
            format!(
                "The filter '{term}' is not supported on definitions here: use Name eq value, joined by and / or."
            ),
        ));
    };
    let value = d
        .get(name.trim())
        .ok_or_else(|| no_property(name.trim(), ty))?;
    let literal = literal.trim();
    Ok(
        match literal
            .strip_prefix('\'')
            .and_then(|l| l.strip_suffix('\''))
        {
            Some(text) => value.as_str().is_some_and(|v| v.eq_ignore_ascii_case(text)),
            None => match literal {
                "true" | "false" => value.as_bool() == Some(literal == "true"),
                other => value
                    .as_str()
                    .is_some_and(|v| v.eq_ignore_ascii_case(other)),
            },
        },
    )
}

fn no_property(name: &str, ty: &str) -> Refused {
    Refused(
        http::StatusCode::BAD_REQUEST,
        format!("Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{ty}'."),
    )
}
