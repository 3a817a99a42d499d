//! A FetchXML subset for `GET {entityset}?fetchXml=…` (docs/dataverse.md,
//! "Long queries"): one `<entity name>`, its `<attribute name>`s, and
//! `<condition attribute operator value>`s joined by `and`, with `eq` or
//! `in` (`<value>` children); and one level of many-to-one
//! `<link-entity name from to alias>` with its own `<attribute>`s, whose
//! values come back as `{alias}.{attribute}`. That is the shape of the long queries clients
//! build (a list of ids or names); anything else is refused as Dataverse
//! refuses what it cannot parse. Written by hand: the simulator needs only
//! this much of XML.

/// A parsed fetch: the table's logical name, the columns, the conditions
/// (a column and the values it may have).
pub(crate) struct Fetch {
    pub(crate) entity: String,
    pub(crate) attributes: Vec<String>,
    pub(crate) conditions: Vec<(String, Vec<String>)>,
    pub(crate) links: Vec<Link>,
}

/// A `<link-entity>`: the joined table (logical name), its key (`from`),
/// this table's lookup (`to`), the alias, and its columns.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) entity: String,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) alias: String,
    pub(crate) attributes: Vec<String>,
}

/// One tag: its name (with a leading `/` for a closing tag), attributes,
/// and whether it closes itself.
struct Tag<'a> {
    name: &'a str,
    attrs: Vec<(&'a str, String)>,
}

pub(crate) fn parse(xml: &str) -> Result<Fetch, String> {
    let mut fetch = Fetch {
        entity: String::new(),
        attributes: Vec::new(),
        conditions: Vec::new(),
        links: Vec::new(),
    };
    let mut rest = xml;
    let mut in_value = false;
    let mut in_link = false;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        if in_value && let Some((_, values)) = fetch.conditions.last_mut() {
            values.push(unescape(text.trim()));
        }
        let close = rest[open..].find('>').ok_or("unterminated tag")? + open;
        let closes_itself = rest[open + 1..close].trim_end().ends_with('/');
        let tag = tag(&rest[open + 1..close])?;
        rest = &rest[close + 1..];
        let get = |k: &str| {
            tag.attrs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        match tag.name {
            "entity" => fetch.entity = get("name").ok_or("entity without a name")?,
            "attribute" => {
                let name = get("name").ok_or("attribute without a name")?;
                match fetch.links.last_mut().filter(|_| in_link) {
                    Some(link) => link.attributes.push(name),
                    None => fetch.attributes.push(name),
                }
            }
            "link-entity" if in_link => return Err("nested link-entity is not supported".into()),
            "link-entity" => {
                if get("link-type").is_some_and(|t| t != "inner" && t != "outer") {
                    return Err("only inner and outer links are supported".into());
                }
                let entity = get("name").ok_or("link-entity without a name")?;
                fetch.links.push(Link {
                    alias: get("alias").unwrap_or_else(|| entity.clone()),
                    from: get("from").ok_or("link-entity without from")?,
                    to: get("to").ok_or("link-entity without to")?,
                    entity,
                    attributes: Vec::new(),
                });
                in_link = !closes_itself;
            }
            "/link-entity" => in_link = false,
            "condition" if in_link => {
                return Err("conditions on a link-entity are not supported".into());
            }
            "condition" => {
                let column = get("attribute").ok_or("condition without an attribute")?;
                let values = match get("operator").as_deref() {
                    Some("eq") => vec![get("value").ok_or("eq without a value")?],
                    Some("in") => Vec::new(),
                    other => return Err(format!("operator {other:?} is not supported")),
                };
                fetch.conditions.push((column, values));
            }
            "value" => in_value = true,
            "/value" => in_value = false,
            "filter" => {
                if get("type").is_some_and(|t| t != "and") {
                    return Err("only filter type=\"and\" is supported".into());
                }
            }
            "fetch" | "/fetch" | "/entity" | "/filter" | "/condition" | "/attribute" | "order" => {}
            other => return Err(format!("element <{other}> is not supported")),
        }
    }
    if fetch.entity.is_empty() {
        return Err("no <entity> in the fetch".into());
    }
    Ok(fetch)
}

fn tag(inner: &str) -> Result<Tag<'_>, String> {
    let inner = inner.trim().trim_end_matches('/').trim_end();
    let (name, mut rest) = inner.split_once(char::is_whitespace).unwrap_or((inner, ""));
    let mut attrs = Vec::new();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'');
        let quote = quote.ok_or_else(|| format!("attribute {key} is not quoted"))?;
        let end = after[1..].find(quote).ok_or("unterminated attribute")? + 1;
        attrs.push((key, unescape(&after[1..end])));
        rest = &after[end + 1..];
    }
    Ok(Tag { name, attrs })
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Adds each link's columns of the row `row`'s lookup names, as
/// `{alias}.{column}` (null where the lookup is empty).
pub(crate) fn add_linked(
    db: &super::Db,
    s: &super::Schema,
    row: &super::Row,
    links: &[Link],
    out: &mut serde_json::Value,
) {
    for link in links {
        let column = format!("_{}_value", link.to);
        let target = s
            .lookups
            .iter()
            .find(|l| l.column == column)
            .and_then(|l| db.tables.get(l.target))
            .zip(row.fields.get(&column).and_then(|v| v.as_str()))
            .and_then(|(table, id)| table.get(&uuid::Uuid::parse_str(id).ok()?));
        for attr in &link.attributes {
            let value = target
                .and_then(|r| r.fields.get(attr).cloned())
                .unwrap_or(serde_json::Value::Null);
            out[format!("{}.{attr}", link.alias)] = value;
        }
    }
}

/// Whether a row meets every condition: its column's value is one of the
/// condition's values (text compared without case, numbers by value).
pub(crate) fn matches(
    fields: &serde_json::Map<String, serde_json::Value>,
    (id_field, id): (&str, uuid::Uuid),
    conditions: &[(String, Vec<String>)],
) -> bool {
    use serde_json::Value;
    conditions.iter().all(|(column, values)| {
        if column == id_field {
            return values
                .iter()
                .any(|v| uuid::Uuid::parse_str(v.trim_matches(['{', '}'])).ok() == Some(id));
        }
        let actual = fields.get(column).unwrap_or(&Value::Null);
        values.iter().any(|v| match actual {
            Value::String(s) => s.eq_ignore_ascii_case(v),
            Value::Number(n) => v.parse::<f64>().ok() == n.as_f64(),
            Value::Bool(b) => v == if *b { "1" } else { "0" } || v == &b.to_string(),
            _ => false,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_entity_attributes_and_conditions() {
        let f = parse(
            r#"<fetch mapping="logical"><entity name="account"><attribute name="name"/>
            <filter type="and"><condition attribute="name" operator="in"><value>A &amp; B</value><value>C</value></condition>
            <condition attribute="statecode" operator="eq" value="0"/></filter></entity></fetch>"#,
        )
        .expect("parsed");
        assert_eq!(f.entity, "account");
        assert_eq!(f.attributes, ["name"]);
        assert_eq!(
            f.conditions[0],
            ("name".to_owned(), vec!["A & B".to_owned(), "C".to_owned()])
        );
        assert_eq!(
            f.conditions[1],
            ("statecode".to_owned(), vec!["0".to_owned()])
        );
        let f = parse("<fetch><entity name='account'><link-entity name='contact' from='contactid' to='primarycontactid' alias='pc'><attribute name='fullname'/></link-entity></entity></fetch>")
            .expect("a link");
        assert_eq!(f.links[0].alias, "pc");
        assert_eq!(f.links[0].attributes, ["fullname"]);
        assert!(parse("<fetch><entity name='a'><link-entity name='b'/></entity></fetch>").is_err());
        assert!(parse("<fetch/>").is_err());
    }
}
