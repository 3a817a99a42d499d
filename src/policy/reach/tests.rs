use super::*;

fn map() -> TableMap {
    TableMap::from_csdl(crate::policy::tables::TEST_CSDL).expect("csdl")
}

fn target(rest: &str, query: &str) -> Result<Vec<String>, Unreadable> {
    of_target(&map(), rest, query).map(|r| r.0)
}

#[test]
fn paths_reach_their_navigations() {
    assert_eq!(target("accounts", "").expect("ok"), Vec::<String>::new());
    assert_eq!(
        target("accounts(1)/primarycontactid", "").expect("ok"),
        ["contacts"]
    );
    assert_eq!(
        target("accounts(1)/contact_customer_accounts/$ref", "").expect("ok"),
        ["contacts"]
    );
    assert_eq!(
        target("accounts(1)/name", "").expect("ok"),
        Vec::<String>::new()
    );
    assert!(target("accounts(1)/nope", "").is_err());
}

#[test]
fn expand_nested_and_with_options() {
    let q = "$expand=primarycontactid($select=fullname)";
    assert_eq!(target("accounts", q).expect("ok"), ["contacts"]);
    let q = "$expand=contact_customer_accounts($filter=parentcustomerid_account/name%20eq%20'a';$expand=parentcustomerid_account)";
    assert_eq!(target("accounts", q).expect("ok"), ["contacts", "accounts"]);
    assert_eq!(target("accounts", "$expand=*").expect("ok"), ["contacts"]);
    assert!(target("accounts", "$expand=unknown").is_err());
    assert!(target("accounts", "$expand=primarycontactid($weird=1)").is_err());
}

#[test]
fn filters_orderby_select_apply_and_lambdas() {
    for q in [
        "$filter=primarycontactid/fullname%20eq%20'x'",
        "$orderby=primarycontactid/fullname%20desc",
        "$filter=contact_customer_accounts/any(c:%20c/fullname%20eq%20'a')",
        "$apply=groupby((primarycontactid/fullname))",
        "$filter=name%20eq%20@p&@p=primarycontactid/fullname",
    ] {
        assert_eq!(target("accounts", q).expect(q), ["contacts"], "{q}");
    }
    // Strings are not paths; plain columns and keywords reach nothing.
    let q = "$filter=name%20eq%20'primarycontactid/fullname'%20and%20contains(name,'a')";
    assert_eq!(target("accounts", q).expect("ok"), Vec::<String>::new());
    assert!(target("accounts", "$filter=nope/fullname%20eq%201").is_err());
    assert!(target("accounts", "$filter=$root/contacts(1)/fullname%20eq%201").is_err());
}

#[test]
fn fetchxml_sql_and_saved_queries() {
    let x = "<fetch><entity name='account'><link-entity name='contact' from='contactid' to='primarycontactid'/></entity></fetch>";
    let q = format!(
        "fetchXml={}",
        percent_encoding::utf8_percent_encode(x, percent_encoding::NON_ALPHANUMERIC)
    );
    assert_eq!(
        target("accounts", &q).expect("ok"),
        ["accounts", "contacts"]
    );
    assert!(target("accounts", "fetchXml=%3Cfetch").is_err());
    assert!(target("accounts", "sql=select%201").is_err());
    assert!(
        target(
            "accounts",
            "savedQuery=00000000-0000-0000-0000-000000000001"
        )
        .is_err()
    );
}

#[test]
fn bodies_bind_and_deep_insert() {
    let m = map();
    let body = serde_json::json!({
        "name": "a",
        "primarycontactid@odata.bind": "/contacts(00000000-0000-0000-0000-000000000001)",
    });
    assert_eq!(
        of_body(&m, Some("account"), &body).expect("ok").0,
        ["contacts"]
    );
    let deep = serde_json::json!({"name": "a", "contact_customer_accounts": [{"fullname": "x"}]});
    assert_eq!(
        of_body(&m, Some("account"), &deep).expect("ok").0,
        ["contacts"]
    );
    let id = serde_json::json!({"@odata.id": "https://org.example/api/data/v9.2/contacts(1)"});
    assert_eq!(of_body(&m, None, &id).expect("ok").0, ["contacts"]);
    let bad = serde_json::json!({"x@odata.bind": "/nothing(1)"});
    assert!(of_body(&m, Some("account"), &bad).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Whatever surrounds it, a navigation to contacts in `$filter` or
    /// `$expand` is found or the query is refused; never read as reaching
    /// nothing.
    #[test]
    fn a_navigation_is_never_missed(
        before in "[a-z ()',/$0-9]{0,20}",
        after in "[a-z ()',/$0-9]{0,20}",
        option in proptest::sample::select(vec!["$filter", "$orderby", "$apply", "$expand", "$select"]),
        nav in proptest::sample::select(vec!["primarycontactid", "PrimaryContactId", "contact_customer_accounts"]),
    ) {
        let text = format!("{before}{nav}/fullname{after}");
        if option == "$expand" {
            let text = format!("{nav}{after}");
            let q = format!("$expand={}", percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC));
            if let Ok(r) = target("accounts", &q) { proptest::prop_assert!(r.contains(&"contacts".to_owned()), "{q}"); }
        } else if !before.contains('\'') {
            let q = format!("{option}={}", percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC));
            if let Ok(r) = target("accounts", &q) { proptest::prop_assert!(r.contains(&"contacts".to_owned()), "{q}"); }
        }
    }
}
