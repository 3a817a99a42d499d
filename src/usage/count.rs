//! How many Power Platform requests a call is, as Dataverse counts them
//! against the tenant's daily entitlement (docs/dataverse.md, "Power
//! Platform requests"): one per create, read, update, delete, assign or
//! share; one per operation inside a `$batch`; one per item of `Targets`
//! in a bulk message; none for the system's metadata.

/// The operations of a Web API call, from its path after
/// `/api/data/v9.x/`: 0 for metadata, else 1 (a `$batch` and a bulk
/// message are counted from their bodies by [`batch_operations`] and
/// [`bulk_targets`]).
pub fn of_path(api_path: &str) -> u32 {
    if is_metadata(api_path) { 0 } else { 1 }
}

/// The service document, `$metadata` and the definitions: reading the
/// system's metadata is not a Power Platform request.
pub fn is_metadata(api_path: &str) -> bool {
    let first = api_path
        .trim_start_matches('/')
        .split(['/', '?', '('])
        .next()
        .unwrap_or("");
    matches!(
        first,
        "" | "$metadata"
            | "EntityDefinitions"
            | "RelationshipDefinitions"
            | "GlobalOptionSetDefinitions"
            | "ManagedPropertyDefinitions"
    )
}

/// Whether the call is a bulk message (`…/Microsoft.Dynamics.CRM.CreateMultiple`
/// and its kin), whose `Targets` are counted one by one.
pub fn is_bulk(api_path: &str) -> bool {
    let last = api_path
        .split('?')
        .next()
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("");
    let message = last.rsplit('.').next().unwrap_or("");
    matches!(
        message,
        "CreateMultiple" | "UpdateMultiple" | "UpsertMultiple" | "DeleteMultiple"
    )
}

/// The operations in a `$batch` body: its request lines (`GET …
/// HTTP/1.1` inside each part, change sets included).
pub fn batch_operations(body: &[u8]) -> u32 {
    body.split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| is_request_line(line))
        .count()
        .try_into()
        .unwrap_or(u32::MAX)
}

fn is_request_line(line: &[u8]) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let mut words = line.split(' ');
    let method = words.next().unwrap_or("");
    matches!(method, "GET" | "POST" | "PATCH" | "PUT" | "DELETE" | "HEAD")
        && words.next().is_some_and(|target| !target.is_empty())
        && words.next().is_some_and(|v| v.starts_with("HTTP/1."))
        && words.next().is_none()
}

/// The items of a bulk message's `Targets`; `None` when the body has none
/// (Dataverse refuses such a message, which then counts once).
pub fn bulk_targets(body: &[u8]) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Message {
        #[serde(rename = "Targets")]
        targets: Vec<serde::de::IgnoredAny>,
    }
    let message: Message = serde_json::from_slice(body).ok()?;
    Some(message.targets.len().try_into().unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_counts_nothing_and_data_counts_one() {
        for path in [
            "",
            "$metadata",
            "EntityDefinitions(LogicalName='account')/Attributes",
            "EntityDefinitions?$select=LogicalName",
            "RelationshipDefinitions",
        ] {
            assert_eq!(of_path(path), 0, "{path}");
        }
        for path in [
            "accounts",
            "accounts(1)",
            "WhoAmI",
            "$batch",
            "contacts?$top=1",
        ] {
            assert_eq!(of_path(path), 1, "{path}");
        }
    }

    #[test]
    fn a_batch_counts_each_operation_change_sets_included() {
        let body = "--batch_1\r\nContent-Type: multipart/mixed; boundary=changeset_1\r\n\r\n\
            --changeset_1\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\n\
            POST /api/data/v9.2/contacts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{}\r\n\
            --changeset_1\r\nContent-Type: application/http\r\nContent-ID: 2\r\n\r\n\
            PATCH /api/data/v9.2/accounts(1) HTTP/1.1\r\n\r\n{\"description\":\"GET x HTTP/1.1 inside\"}\r\n\
            --changeset_1--\r\n--batch_1\r\nContent-Type: application/http\r\n\r\n\
            GET /api/data/v9.2/accounts?$top=1 HTTP/1.1\r\n\r\n--batch_1--\r\n";
        assert_eq!(batch_operations(body.as_bytes()), 3);
    }

    #[test]
    fn bulk_messages_count_their_targets() {
        assert!(is_bulk("accounts/Microsoft.Dynamics.CRM.CreateMultiple"));
        assert!(is_bulk(
            "contacts/Microsoft.Dynamics.CRM.UpsertMultiple?x=1"
        ));
        assert!(!is_bulk("accounts"));
        let body = br#"{"Targets":[{"@odata.type":"Microsoft.Dynamics.CRM.account","name":"a"},{"name":"b"}]}"#;
        assert_eq!(bulk_targets(body), Some(2));
        assert_eq!(bulk_targets(b"{}"), None);
        assert_eq!(bulk_targets(b"not json"), None);
    }
}
