//! Dataverse-aware proxying: every link Dataverse returns leads back through
//! the proxy, `$batch` round-trips, chunked uploads work.

use serde_json::Value;

use crate::harness::{Harness, Setup};

/// Every absolute URL in a JSON value.
fn urls(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => {
            out.push(s.clone())
        }
        Value::Array(a) => a.iter().for_each(|x| urls(x, out)),
        Value::Object(o) => o.values().for_each(|x| urls(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn paging_ten_thousand_rows_by_following_next_links_through_the_proxy() {
    let h = Harness::start().await;
    h.sim.seed_rows("accounts", 10_000 - 20);
    let mut url = h.url("/accounts?$select=name,accountnumber");
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let resp = h
            .client
            .get(&url)
            .header("Prefer", "odata.maxpagesize=500")
            .send()
            .await
            .expect("page");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        let mut links = Vec::new();
        urls(&body, &mut links);
        assert!(!links.is_empty());
        for link in &links {
            assert!(
                link.starts_with(&h.proxy),
                "link not through the proxy: {link}"
            );
        }
        pages += 1;
        for row in body["value"].as_array().expect("rows") {
            ids.push(row["accountid"].as_str().expect("id").to_owned());
        }
        match body["@odata.nextLink"].as_str() {
            Some(next) => {
                assert!(
                    next.contains("$skiptoken=%3Ccookie%20pagenumber=%22"),
                    "{next}"
                );
                url = next.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(pages, 20);
    assert_eq!(ids.len(), 10_000);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10_000, "every row exactly once");
    h.stop().await;
}

#[tokio::test]
async fn create_then_follow_the_entity_id_to_get_patch_and_delete() {
    let h = Harness::start().await;
    let resp = h
        .send(
            reqwest::Method::POST,
            "/accounts",
            &[],
            Some(&serde_json::json!({"name": "Linked Ltd"})),
        )
        .await;
    assert_eq!(resp.status(), 204);
    let entity = resp.headers()["odata-entityid"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let location = resp.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        entity.starts_with(&format!("{}/api/data/v9.2/accounts(", h.proxy)),
        "{entity}"
    );
    assert_eq!(location, entity);

    let resp = h.client.get(&entity).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    let row: Value = resp.json().await.expect("json");
    assert_eq!(row["name"], "Linked Ltd");
    assert!(
        row["@odata.context"]
            .as_str()
            .expect("ctx")
            .starts_with(&h.proxy)
    );

    let resp = h
        .client
        .patch(&entity)
        .header("If-Match", row["@odata.etag"].as_str().expect("etag"))
        .json(&serde_json::json!({"telephone1": "555-0199"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(resp.status(), 204);
    assert!(
        resp.headers()["odata-entityid"]
            .to_str()
            .expect("id")
            .starts_with(&h.proxy)
    );
    assert_eq!(
        h.client
            .delete(&entity)
            .send()
            .await
            .expect("delete")
            .status(),
        204
    );
    assert_eq!(
        h.client.get(&entity).send().await.expect("get").status(),
        404
    );
    h.stop().await;
}

#[tokio::test]
async fn links_follow_a_trusted_ingress_and_the_configured_public_url() {
    // Behind an ingress at 127.0.0.1 that is trusted: X-Forwarded-* decide.
    let h = Harness::with(Setup::default().set("trusted_proxies", "127.0.0.1")).await;
    let resp = h
        .get_with(
            "/WhoAmI",
            &[
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "dataverse.example.com"),
                ("X-Forwarded-Prefix", "/crm"),
            ],
        )
        .await;
    let body: Value = resp.json().await.expect("json");
    let ctx = body["@odata.context"].as_str().expect("ctx");
    assert!(
        ctx.starts_with("https://dataverse.example.com/crm/api/data/v9.2/$metadata#"),
        "{ctx}"
    );
    h.stop().await;

    // Not trusted: forwarded headers are ignored.
    let h = Harness::start().await;
    let resp = h
        .get_with("/WhoAmI", &[("X-Forwarded-Host", "evil.example.com")])
        .await;
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["@odata.context"]
            .as_str()
            .expect("ctx")
            .starts_with(&h.proxy)
    );
    h.stop().await;

    let h = Harness::with(Setup::default().set("public_url", "https://gw.example.com/dv/")).await;
    let resp = h.get("/WhoAmI").await;
    let body: Value = resp.json().await.expect("json");
    let ctx = body["@odata.context"].as_str().expect("ctx");
    assert!(
        ctx.starts_with("https://gw.example.com/dv/api/data/v9.2/"),
        "{ctx}"
    );
    h.stop().await;
}

fn batch_body(proxy: &str, boundary: &str, changeset: &str) -> String {
    let api = format!("{proxy}/api/data/v9.2");
    format!(
        "--{boundary}\r\n\
Content-Type: multipart/mixed; boundary={changeset}\r\n\
\r\n\
--{changeset}\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 1\r\n\
\r\n\
POST {api}/accounts HTTP/1.1\r\n\
Content-Type: application/json; type=entry\r\n\
\r\n\
{{\"name\":\"Batch Parent Ltd\"}}\r\n\
--{changeset}\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 2\r\n\
\r\n\
PATCH $1 HTTP/1.1\r\n\
Content-Type: application/json; type=entry\r\n\
\r\n\
{{\"telephone1\":\"555-0100\"}}\r\n\
--{changeset}\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 3\r\n\
\r\n\
POST {api}/contacts HTTP/1.1\r\n\
Content-Type: application/json; type=entry\r\n\
\r\n\
{{\"firstname\":\"Batch\",\"lastname\":\"Child\",\"parentcustomerid_account@odata.bind\":\"$1\"}}\r\n\
--{changeset}--\r\n\
\r\n\
--{boundary}\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
\r\n\
GET {api}/accounts?$select=name&$filter=name%20eq%20'Batch%20Parent%20Ltd' HTTP/1.1\r\n\
Accept: application/json\r\n\
\r\n\
\r\n\
--{boundary}--\r\n"
    )
}

#[tokio::test]
async fn a_batch_with_a_change_set_and_content_id_references_round_trips() {
    let h = Harness::start().await;
    let body = batch_body(&h.proxy, "batch_AAA123", "changeset_BBB456");
    let resp = h
        .client
        .post(h.url("/$batch"))
        .header("Content-Type", "multipart/mixed; boundary=batch_AAA123")
        .header("OData-Version", "4.0")
        .body(body)
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"]
        .to_str()
        .expect("ct")
        .to_owned();
    assert!(
        ct.starts_with("multipart/mixed; boundary=batchresponse_"),
        "{ct}"
    );
    let text = resp.text().await.expect("text");
    assert!(text.contains("changesetresponse_"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 204 No Content").count(), 3, "{text}");
    assert!(text.contains("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("\"name\":\"Batch Parent Ltd\""), "{text}");
    // Every org link in the answer now names the proxy.
    assert!(!text.contains(h.sim.org_url()), "{text}");
    assert!(
        text.contains(&format!(
            "OData-EntityId: {}/api/data/v9.2/accounts(",
            h.proxy
        )),
        "{text}"
    );
    // Every part's head carries its own headers, as Dataverse's do.
    assert_eq!(text.matches("OData-Version: 4.0").count(), 4, "{text}");
    assert!(
        text.contains(&format!("Location: {}/api/data/v9.2/accounts(", h.proxy)),
        "{text}"
    );

    // The simulator refuses batch URLs of a foreign host, so the success
    // above shows the request lines reached it rewritten to its own origin.
    let seen = h.sim.seen().pop().expect("seen");
    assert_eq!(seen.target, "/api/data/v9.2/$batch");
    // The change set applied: the parent has the PATCHed phone number.
    let parent = h
        .sim
        .ids("accounts")
        .into_iter()
        .filter_map(|id| h.sim.row("accounts", id))
        .find(|r| r["name"] == "Batch Parent Ltd")
        .expect("parent row");
    assert_eq!(parent["telephone1"], "555-0100");
    h.stop().await;
}

#[tokio::test]
async fn a_failing_change_set_rolls_back_and_stops_the_batch() {
    let h = Harness::start().await;
    let before = h.sim.ids("accounts").len();
    let api = format!("{}/api/data/v9.2", h.proxy);
    let body = format!(
        "--b1\r\nContent-Type: multipart/mixed; boundary=c1\r\n\r\n\
--c1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
POST {api}/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"Rolled Back\"}}\r\n\
--c1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
POST {api}/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"nosuchcolumn\":1}}\r\n\
--c1--\r\n\r\n--b1--\r\n"
    );
    let resp = h
        .client
        .post(h.url("/$batch"))
        .header("Content-Type", "multipart/mixed; boundary=b1")
        .body(body)
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.expect("text");
    assert!(text.contains("HTTP/1.1 400 Bad Request"), "{text}");
    assert_eq!(
        h.sim.ids("accounts").len(),
        before,
        "nothing of the change set stayed"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_chunked_file_upload_completes_through_the_proxy() {
    let h = Harness::start().await;
    let id = h.sim.ids("accounts")[2];
    let file: Vec<u8> = (0..9_500_000u32).map(|i| (i % 251) as u8).collect();
    let resp = h
        .send(
            reqwest::Method::PATCH,
            &format!("/accounts({id})/dvp_document?x-ms-file-name=big.pdf"),
            &[("x-ms-transfer-mode", "chunked")],
            None,
        )
        .await;
    assert_eq!(resp.status(), 200);
    let location = resp.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    assert!(location.starts_with(&h.proxy), "{location}");
    assert!(location.contains("sessiontoken="), "{location}");
    let chunk: usize = resp.headers()["x-ms-chunk-size"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("size");
    let total = file.len();
    let mut statuses = Vec::new();
    for start in (0..total).step_by(chunk) {
        let end = (start + chunk).min(total) - 1;
        let resp = h
            .client
            .patch(&location)
            .header("x-ms-file-name", "big.pdf")
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("bytes {start}-{end}/{total}"))
            .body(file[start..=end].to_vec())
            .send()
            .await
            .expect("chunk");
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [206, 206, 204]);
    assert_eq!(
        h.sim
            .file("accounts", id, "dvp_document")
            .expect("stored")
            .as_ref(),
        &file[..]
    );
    h.stop().await;
}

#[tokio::test]
async fn small_answers_keep_an_exact_length_and_large_ones_stream() {
    // Dataverse's identity answers (compressed ones are streamed decoded:
    // compression.rs).
    let h = Harness::with(Setup::default().set("upstream.compression", "false")).await;
    h.sim.seed_rows("accounts", 3_000);
    for (page, small) in [(3, true), (2_000, false)] {
        let resp = h
            .client
            .get(h.url("/accounts?$select=name,accountnumber"))
            .header("Prefer", format!("odata.maxpagesize={page}"))
            .send()
            .await
            .expect("page");
        assert_eq!(resp.status(), 200);
        let length = resp
            .headers()
            .get("content-length")
            .map(|v| v.to_str().expect("ascii").parse::<usize>().expect("number"));
        let chunked = resp.headers().get("transfer-encoding").is_some();
        let body = resp.bytes().await.expect("body");
        if small {
            // Read whole and rewritten at once: the length is the rewritten one.
            assert_eq!(length, Some(body.len()));
            assert!(!chunked);
        } else {
            assert!(body.len() > 64 * 1024, "a large page: {}", body.len());
            assert_eq!(length, None, "streamed and rewritten: no length");
            assert!(chunked);
        }
        let json: Value = serde_json::from_slice(&body).expect("json");
        let next = json["@odata.nextLink"].as_str().expect("next link");
        assert!(next.starts_with(&h.proxy), "{next}");
        assert!(
            json["@odata.context"]
                .as_str()
                .expect("context")
                .starts_with(&h.proxy)
        );
    }
    h.stop().await;
}

/// The service document, what clients ask first: every entity set, its
/// context naming the proxy.
#[tokio::test]
async fn the_service_document_lists_the_entity_sets() {
    let h = Harness::start().await;
    for path in ["/api/data/v9.2/", "/api/data/v9.2"] {
        let resp = h
            .client
            .get(format!("{}{path}", h.proxy))
            .send()
            .await
            .expect("service document");
        assert_eq!(resp.status(), 200, "{path}");
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(
            body["@odata.context"],
            format!("{}/api/data/v9.2/$metadata", h.proxy)
        );
        let sets = body["value"].as_array().expect("value");
        for name in ["accounts", "contacts", "leads"] {
            assert!(
                sets.iter()
                    .any(|s| s["name"] == name && s["kind"] == "EntitySet" && s["url"] == name),
                "{name} in {body}"
            );
        }
    }
    h.stop().await;
}

/// Change tracking through the proxy: the last page of a tracked read
/// carries a delta link naming the proxy; following it gives what was
/// created, changed and deleted since, and `$count` counts those changes.
#[tokio::test]
async fn a_sync_client_follows_delta_links_through_the_proxy() {
    let h = Harness::start().await;
    let tracked = |url: String| {
        h.client
            .get(url)
            .header("Prefer", "odata.track-changes, odata.maxpagesize=2")
            .send()
    };
    let mut url = h.url("/accounts?$select=name");
    let delta = loop {
        let resp = tracked(url.clone()).await.expect("page");
        let applied = resp.headers()["preference-applied"]
            .to_str()
            .expect("header")
            .to_owned();
        assert!(applied.contains("odata.track-changes"), "{applied}");
        let body: serde_json::Value = resp.json().await.expect("json");
        if let Some(next) = body["@odata.nextLink"].as_str() {
            assert!(body.get("@odata.deltaLink").is_none(), "only the last page");
            url = next.to_owned();
            continue;
        }
        break body["@odata.deltaLink"]
            .as_str()
            .expect("a delta link")
            .to_owned();
    };
    assert!(delta.starts_with(&h.url("/accounts?")), "{delta}");
    assert!(delta.contains("$deltatoken="), "{delta}");

    let ids = h.sim.ids("accounts");
    let created = h
        .client
        .post(h.url("/accounts"))
        .json(&serde_json::json!({"name": "Delta New"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 204);
    let patched = h
        .client
        .patch(h.url(&format!("/accounts({})", ids[0])))
        .json(&serde_json::json!({"name": "Delta Changed"}))
        .send()
        .await
        .expect("update");
    assert_eq!(patched.status(), 204);
    let deleted = h
        .client
        .delete(h.url(&format!("/accounts({})", ids[1])))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);

    let changes: serde_json::Value = h
        .client
        .get(&delta)
        .send()
        .await
        .expect("delta")
        .json()
        .await
        .expect("json");
    let rows = changes["value"].as_array().expect("value");
    assert_eq!(rows.len(), 3, "{changes}");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert!(
        names.contains(&"Delta New") && names.contains(&"Delta Changed"),
        "{changes}"
    );
    let gone = rows
        .iter()
        .find(|r| r["reason"] == "deleted")
        .expect("a deleted row");
    assert_eq!(gone["id"], ids[1].to_string());
    let next = changes["@odata.deltaLink"]
        .as_str()
        .expect("next delta link");
    assert!(next.starts_with(&h.url("/accounts?")), "{next}");
    assert!(!changes.to_string().contains(h.sim.org_url()), "{changes}");

    let token = delta.split("$deltatoken=").nth(1).expect("token");
    let count = h
        .client
        .get(h.url(&format!("/accounts/$count?$deltatoken={token}")))
        .send()
        .await
        .expect("count")
        .text()
        .await
        .expect("text");
    assert_eq!(count, "3");

    let refused = h
        .client
        .get(h.url("/accounts?$filter=name eq 'x'"))
        .header("Prefer", "odata.track-changes")
        .send()
        .await
        .expect("refused");
    assert_eq!(refused.status(), 400);
    h.stop().await;
}

/// The bulk messages through the proxy: `CreateMultiple` of 100 targets,
/// `UpdateMultiple`, and a bad target that leaves the table as it was.
#[tokio::test]
async fn bulk_messages_create_and_update_many_records_at_once() {
    let h = Harness::start().await;
    let before = h.sim.ids("accounts").len();
    let targets: Vec<serde_json::Value> = (0..100)
        .map(|i| serde_json::json!({"@odata.type": "Microsoft.Dynamics.CRM.account", "name": format!("Bulk {i}")}))
        .collect();
    let created = h
        .client
        .post(h.url("/accounts/Microsoft.Dynamics.CRM.CreateMultiple"))
        .json(&serde_json::json!({ "Targets": targets }))
        .send()
        .await
        .expect("CreateMultiple");
    assert_eq!(created.status(), 200);
    let body: serde_json::Value = created.json().await.expect("json");
    let ids = body["Ids"].as_array().expect("Ids");
    assert_eq!(ids.len(), 100);
    assert_eq!(h.sim.ids("accounts").len(), before + 100);

    let updates: Vec<serde_json::Value> = ids[..2]
        .iter()
        .map(|id| serde_json::json!({"@odata.type": "Microsoft.Dynamics.CRM.account", "accountid": id, "name": "Bulk Updated"}))
        .collect();
    let updated = h
        .client
        .post(h.url("/accounts/Microsoft.Dynamics.CRM.UpdateMultiple"))
        .json(&serde_json::json!({ "Targets": updates }))
        .send()
        .await
        .expect("UpdateMultiple");
    assert_eq!(updated.status(), 204);
    let id = uuid::Uuid::parse_str(ids[0].as_str().expect("id")).expect("uuid");
    assert_eq!(
        h.sim.row("accounts", id).expect("row")["name"],
        "Bulk Updated"
    );

    let mixed = serde_json::json!({"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.account", "name": "Fine"},
        {"@odata.type": "Microsoft.Dynamics.CRM.contact", "firstname": "Wrong table"},
    ]});
    let refused = h
        .client
        .post(h.url("/accounts/Microsoft.Dynamics.CRM.CreateMultiple"))
        .json(&mixed)
        .send()
        .await
        .expect("refused");
    assert_eq!(refused.status(), 400);
    assert_eq!(h.sim.ids("accounts").len(), before + 100, "nothing written");
    // A target that names an existing record, after a good one: refused
    // before the good one is written.
    let clash = serde_json::json!({"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.account", "name": "Fine"},
        {"@odata.type": "Microsoft.Dynamics.CRM.account", "accountid": ids[0], "name": "Clash"},
    ]});
    let refused = h
        .client
        .post(h.url("/accounts/Microsoft.Dynamics.CRM.CreateMultiple"))
        .json(&clash)
        .send()
        .await
        .expect("refused");
    assert_eq!(refused.status(), 412);
    assert_eq!(h.sim.ids("accounts").len(), before + 100, "nothing written");
    let missing = serde_json::json!({"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.account", "accountid": ids[0], "name": "Not Kept"},
        {"@odata.type": "Microsoft.Dynamics.CRM.account", "accountid": uuid::Uuid::new_v4(), "name": "Nobody"},
    ]});
    let refused = h
        .client
        .post(h.url("/accounts/Microsoft.Dynamics.CRM.UpdateMultiple"))
        .json(&missing)
        .send()
        .await
        .expect("refused");
    assert_eq!(refused.status(), 404);
    assert_eq!(
        h.sim.row("accounts", id).expect("row")["name"],
        "Bulk Updated"
    );
    h.stop().await;
}
