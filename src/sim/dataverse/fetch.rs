//! A FetchXML subset for `GET {entityset}?fetchXml=…` (docs/dataverse.md,
//! "Long queries"): one `<entity name>`, its `<attribute name>`s, and
//! `<condition attribute operator value>`s joined by `and`, with `eq` or
//! `in` (`<value>` children). That is the shape of the long queries clients
//! build (a list of ids or names); anything else is refused as Dataverse
//! refuses what it cannot parse. Written by hand: the simulator needs only
//! this much of XML.

/// A parsed fetch: the table's logical name, the columns, the conditions
/// (a column and the values it may have).
pub(in crate::sim) struct Fetch {
    pub(in crate::sim) entity: String,
    pub(in crate::sim) attributes: Vec<String>,
    pub(in crate::sim) conditions: Vec<(String, Vec<String>)>,
}

/// One tag: its name (with a leading `/` for a closing tag), attributes,
/// and whether it closes itself.
struct Tag<'a> {
    name: &'a str,
    attrs: Vec<(&'a str, String)>,
}

pub(in crate::sim) fn parse(xml: &str) -> Result<Fetch, String> {
    let mut fetch = Fetch {
        entity: String::new(),
        attributes: Vec::new(),
        conditions: Vec::new(),
    };
    let mut rest = xml;
    let mut in_value = false;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        if in_value && let Some((_, values)) = fetch.conditions.last_mut() {
            values.push(unescape(text.trim()));
        }
        let close = rest[open..].find('>').ok_or("unterminated tag")? + open;
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
            "attribute" => fetch
                .attributes
                .push(get("name").ok_or("attribute without a name")?),
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

/// Whether a row meets every condition: its column's value is one of the
/// condition's values (text compared without case, numbers by value).
pub(in crate::sim) fn matches(
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
        assert!(parse("<fetch><entity name='a'><link-entity name='b'/></entity></fetch>").is_err());
        assert!(parse("<fetch/>").is_err());
    }
}
