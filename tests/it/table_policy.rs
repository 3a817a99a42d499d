//! A denied table stays denied: with `[org.policy] deny = ["contacts"]`,
//! no standard OData step reaches contacts (a navigation in the path,
//! `$expand` nested or not, a navigation in `$filter`, `$orderby` or
//! `$apply`, `/$ref`, FetchXML `link-entity`, `?sql=`, `@odata.bind` in a
//! body, a `$batch` part). Without the policy the simulator answers each of
//! them with the contact's columns, so the refusal is what keeps them out.

use serde_json::{Value, json};

use crate::harness::{Harness, Setup};

const EXPAND: &str = "/accounts?$expand=primarycontactid($select=fullname,emailaddress1)";

fn fetch_with_contact() -> String {
    let xml = "<fetch><entity name='account'><attribute name='name'/><link-entity name='contact' from='contactid' to='primarycontactid' alias='pc'><attribute name='emailaddress1'/></link-entity></entity></fetch>";
    format!(
        "/accounts?fetchXml={}",
        percent_encoding::utf8_percent_encode(xml, percent_encoding::NON_ALPHANUMERIC)
    )
}

async fn first_account(h: &Harness) -> String {
    let body: Value = h
        .get("/accounts?$top=1&$select=name")
        .await
        .json()
        .await
        .expect("json");
    body["value"][0]["accountid"]
        .as_str()
        .expect("id")
        .to_owned()
}

/// The leak, shown: without a table list each of these returns a
/// contact's columns.
#[tokio::test]
async fn without_a_table_list_related_rows_come_back() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let body: Value = h.get(EXPAND).await.json().await.expect("json");
    assert!(
        body["value"][0]["primarycontactid"]["emailaddress1"].is_string(),
        "{body}"
    );
    let id = first_account(&h).await;
    let contact: Value = h
        .get(&format!("/accounts({id})/primarycontactid"))
        .await
        .json()
        .await
        .expect("json");
    assert!(contact["emailaddress1"].is_string(), "{contact}");
    let many: Value = h
        .get(&format!(
            "/accounts({id})?$expand=contact_customer_accounts($select=fullname)"
        ))
        .await
        .json()
        .await
        .expect("json");
    assert!(
        many["contact_customer_accounts"][0]["fullname"].is_string(),
        "{many}"
    );
    let fetched: Value = h
        .get(&fetch_with_contact())
        .await
        .json()
        .await
        .expect("json");
    assert!(
        fetched["value"][0]["pc.emailaddress1"].is_string(),
        "{fetched}"
    );
    h.stop().await;
}

async fn denying(table: &str) -> Harness {
    let h = Harness::with(Setup::default().set("org.policy.deny", table)).await;
    h.wait_ready().await;
    h
}

/// Every way to a denied table is a 403 naming it (or saying it cannot be
/// checked), and none of them reaches Dataverse.
#[tokio::test]
async fn a_denied_table_is_denied_on_every_path_to_it() {
    let h = denying("contacts").await;
    let id = first_account(&h).await;
    let seen_before = h.sim.seen().len();
    let gets = [
        "/contacts".to_owned(),
        EXPAND.to_owned(),
        format!("/accounts({id})?$expand=contact_customer_accounts"),
        "/accounts?$expand=contact_customer_accounts($expand=parentcustomerid_account)".to_owned(),
        "/leads?$expand=*".to_owned(),
        format!("/accounts({id})/primarycontactid"),
        format!("/accounts({id})/primarycontactid/$ref"),
        "/accounts?$filter=primarycontactid/fullname%20eq%20'x'".to_owned(),
        "/accounts?$filter=contact_customer_accounts/any(c:c/fullname%20eq%20'x')".to_owned(),
        "/accounts?$orderby=primarycontactid/fullname".to_owned(),
        "/accounts?$apply=groupby((primarycontactid/fullname))".to_owned(),
        fetch_with_contact(),
        "/accounts?sql=SELECT%20fullname%20FROM%20contact".to_owned(),
        "/accounts?$filter=nosuchnavigation/fullname%20eq%201".to_owned(),
    ];
    for path in &gets {
        let resp = h.get(path).await;
        let status = resp.status();
        let code = resp.headers().get("x-dataverse-proxy-error").cloned();
        let text = resp.text().await.expect("body");
        assert_eq!(status, 403, "{path}: {text}");
        assert_eq!(
            code.as_ref().map(|c| c.to_str().expect("ascii")),
            Some("policy_denied"),
            "{path}"
        );
        assert!(
            text.contains("contacts") || text.contains("cannot be checked"),
            "{path}: {text}"
        );
    }
    let contact = h.sim.ids("contacts")[0];
    let bind =
        json!({"name": "bound", "primarycontactid@odata.bind": format!("/contacts({contact})")});
    let created = h
        .send(reqwest::Method::POST, "/accounts", &[], Some(&bind))
        .await;
    assert_eq!(created.status(), 403);
    let patched = h
        .send(
            reqwest::Method::PATCH,
            &format!("/accounts({id})"),
            &[],
            Some(&bind),
        )
        .await;
    assert_eq!(patched.status(), 403);
    let deep = json!({"name": "deep", "contact_customer_accounts": [{"lastname": "x"}]});
    let resp = h
        .send(reqwest::Method::POST, "/accounts", &[], Some(&deep))
        .await;
    assert_eq!(resp.status(), 403);
    let batch = format!(
        "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET {}/api/data/v9.2{EXPAND} HTTP/1.1\r\n\r\n\r\n--b--\r\n",
        h.proxy
    );
    let resp = h
        .client
        .post(h.url("/$batch"))
        .header("content-type", "multipart/mixed; boundary=b")
        .body(batch)
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status(), 403);
    assert_eq!(h.sim.seen().len(), seen_before, "nothing reached Dataverse");
    assert!(
        !h.sim.ids("accounts").iter().any(|a| h
            .sim
            .row("accounts", *a)
            .is_some_and(|r| r["name"] == "bound" || r["name"] == "deep")),
        "no row was written"
    );
    // What does not reach contacts still goes.
    assert_eq!(
        h.get("/accounts?$select=name&$filter=name%20eq%20'x'")
            .await
            .status(),
        200
    );
    h.stop().await;
}

/// An allow list holds the same way: a table outside it is not reached
/// through another.
#[tokio::test]
async fn a_table_outside_the_allow_list_is_not_reached_through_another() {
    let h = Harness::with(Setup::default().set("org.policy.allow", "accounts")).await;
    h.wait_ready().await;
    let resp = h.get(EXPAND).await;
    assert_eq!(resp.status(), 403);
    let text = resp.text().await.expect("body");
    assert!(
        text.contains("'contacts'") && text.contains("allow list"),
        "{text}"
    );
    assert_eq!(h.get("/accounts?$select=name").await.status(), 200);
    h.stop().await;
}
