//! The metadata cache: `$metadata` and `EntityDefinitions` served from the
//! org's cache, revalidated with Dataverse, and never past the caller's
//! access rules.

use crate::harness::{Harness, Setup};
use dataverse_sim::{Sim, SimConfig};

/// The `$metadata` requests Dataverse has seen so far.
fn metadata_requests(h: &Harness) -> Vec<dataverse_sim::SeenRequest> {
    h.sim
        .seen()
        .into_iter()
        .filter(|s| s.target.ends_with("/$metadata"))
        .collect()
}

fn counter(metrics: &str, result: &str) -> u64 {
    let prefix = format!(
        "dataverse_proxy_metadata_cache_requests_total{{org=\"default\",result=\"{result}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("number"))
}

#[tokio::test]
async fn the_second_metadata_load_comes_from_the_cache() {
    let h = Harness::start().await;
    let first = h
        .get_with("/$metadata", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("age").is_none(), "fetched, not cached");
    let etag = first.headers()["etag"].clone();
    let first = first.bytes().await.expect("body");
    assert_eq!(metadata_requests(&h).len(), 1);

    let second = h
        .get_with("/$metadata", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(second.status(), 200);
    assert!(second.headers().get("age").is_some(), "from the cache");
    assert_eq!(second.headers()["etag"], etag);
    assert_eq!(second.headers()["content-encoding"], "gzip");
    assert_eq!(second.bytes().await.expect("body"), first);
    assert_eq!(
        metadata_requests(&h).len(),
        1,
        "Dataverse was not asked again"
    );

    // An identity caller gets the same document decoded from the entry.
    let plain = h.get("/$metadata").await;
    assert!(plain.headers().get("content-encoding").is_none());
    let plain = plain.text().await.expect("xml");
    assert!(plain.starts_with("<?xml"), "the CSDL document");
    assert!(plain.len() > 4 << 20, "several MB: {}", plain.len());
    assert_eq!(metadata_requests(&h).len(), 1);

    let m = h.metrics().await;
    assert_eq!(counter(&m, "miss"), 1, "{m}");
    assert_eq!(counter(&m, "hit"), 2, "{m}");
    assert!(m.contains("dataverse_proxy_metadata_cache_bytes{org=\"default\"}"));
    h.stop().await;
}

#[tokio::test]
async fn a_schema_change_shows_up_once_the_entry_is_stale() {
    // Fresh for no time at all: every load is revalidated with Dataverse.
    let h = Harness::with(Setup::default().set("metadata_cache.fresh_for", "0s")).await;
    let path = "/EntityDefinitions(LogicalName='dvp_amount0')/Attributes";
    let first = h.get(path).await.text().await.expect("json");
    let again = h.get(path).await;
    assert!(
        again.headers().get("age").is_some(),
        "served from the cache"
    );
    assert_eq!(again.text().await.expect("json"), first);
    let revalidation = h.sim.seen().pop().expect("seen");
    assert!(
        revalidation.headers.get("if-none-match").is_some(),
        "asked Dataverse whether the entry holds"
    );

    h.sim.change_schema();
    let changed = h.get(path).await;
    assert!(changed.headers().get("age").is_none(), "a new answer");
    let changed = changed.text().await.expect("json");
    assert_ne!(changed, first, "the new column shows");
    assert_eq!(h.get(path).await.text().await.expect("json"), changed);

    let m = h.metrics().await;
    assert_eq!(counter(&m, "miss"), 1, "{m}");
    assert_eq!(counter(&m, "revalidated"), 2, "{m}");
    assert_eq!(counter(&m, "changed"), 1, "{m}");
    assert_eq!(counter(&m, "hit"), 0, "{m}");
    h.stop().await;
}

#[tokio::test]
async fn a_callers_matching_etag_is_answered_304_from_the_cache() {
    let h = Harness::start().await;
    let first = h.get("/EntityDefinitions").await;
    let etag = first.headers()["etag"].to_str().expect("ascii").to_owned();
    let json: serde_json::Value = first.json().await.expect("json");
    assert!(json["value"].as_array().expect("tables").len() > 400);
    let context = json["@odata.context"].as_str().expect("context");
    assert!(context.starts_with(&h.proxy), "links rewritten: {context}");
    let asked = h.sim.seen().len();

    let resp = h
        .get_with("/EntityDefinitions", &[("if-none-match", &etag)])
        .await;
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()["etag"], etag.as_str());
    assert!(resp.bytes().await.expect("empty").is_empty());
    let resp = h
        .get_with("/EntityDefinitions", &[("if-none-match", "\"other\"")])
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(h.sim.seen().len(), asked, "both from the cache");

    // The same entry, links rewritten for a caller using the org prefix.
    let prefixed = format!("{}/default/api/data/v9.2/EntityDefinitions", h.proxy);
    let json: serde_json::Value = h
        .client
        .get(prefixed)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let context = json["@odata.context"].as_str().expect("context");
    assert!(
        context.starts_with(&format!("{}/default/api/data/", h.proxy)),
        "{context}"
    );
    h.stop().await;
}

#[tokio::test]
async fn callers_the_access_rules_refuse_are_refused_with_the_cache_warm() {
    let hash = |key: &str| -> String {
        use sha2::Digest;
        sha2::Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let extra = format!(
        "[[callers]]\nname = \"app\"\napi_key_sha256 = \"{}\"\n\n[[callers]]\nname = \"elsewhere\"\napi_key_sha256 = \"{}\"\norgs = [\"fabrikam\"]\n",
        hash("app-key"),
        hash("elsewhere-key"),
    );
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = Harness::with_file(sim, "", &extra, &[]).await;
    h.wait_ready().await;
    let ok = h.get_with("/$metadata", &[("x-api-key", "app-key")]).await;
    assert_eq!(ok.status(), 200);
    // Kept once read to its end (a caller that leaves early keeps nothing).
    ok.bytes().await.expect("document");
    let cached = h.get_with("/$metadata", &[("x-api-key", "app-key")]).await;
    assert!(cached.headers().get("age").is_some(), "the cache is warm");
    // An unread 5.9 MB answer would hold its connection through shutdown.
    drop(cached);

    let resp = h.get("/$metadata").await;
    assert_eq!(resp.status(), 401, "no key");
    let resp = h
        .get_with("/$metadata", &[("x-api-key", "elsewhere-key")])
        .await;
    assert_eq!(resp.status(), 403, "a caller of another org");
    let body = resp.text().await.expect("body");
    assert!(
        !body.contains("EntityType"),
        "nothing of the document: {body}"
    );
    h.stop().await;
}

#[tokio::test]
async fn callers_that_load_metadata_together_cost_one_download() {
    let h = Harness::start().await;
    // Slow enough that every load arrives while the first is under way.
    h.sim.set_latency(std::time::Duration::from_millis(300));
    let loads = (0..8).map(|_| async {
        let resp = h
            .get_with("/$metadata", &[("accept-encoding", "gzip")])
            .await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.expect("document")
    });
    let documents = futures_util::future::join_all(loads).await;
    assert!(
        documents.windows(2).all(|w| w[0] == w[1]),
        "one document for all"
    );
    assert_eq!(metadata_requests(&h).len(), 1, "Dataverse sent it once");
    let m = h.metrics().await;
    assert_eq!(counter(&m, "miss"), 1, "{m}");
    assert_eq!(counter(&m, "hit"), 7, "{m}");
    h.stop().await;
}

#[tokio::test]
async fn a_slow_reader_leading_a_fill_does_not_hold_back_the_callers_behind_it() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start().await;
    h.wait_ready().await;
    h.sim.set_latency(std::time::Duration::from_millis(300));
    // The first caller asks for the document and never reads its answer.
    let addr = h.proxy.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(
        b"GET /api/data/v9.2/$metadata HTTP/1.1\r\nHost: proxy.test\r\nAccept: */*\r\n\r\n",
    )
    .await
    .expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // The next one waits for that fill, not for that caller's reading: it
    // gets the document from the cache, well within the fill wait.
    let started = std::time::Instant::now();
    let next = h.get("/$metadata").await;
    assert_eq!(next.status(), 200);
    assert!(
        next.headers().get("age").is_some(),
        "served from the entry the first fill made"
    );
    let document = next.bytes().await.expect("document");
    assert!(document.len() > 1_000_000);
    assert!(
        started.elapsed() < dataverse_proxy::metadata_cache::FILL_WAIT,
        "waited out the fill"
    );
    drop(slow);
    h.stop().await;
}

/// The default org's value of the metric `name` (0 when absent).
fn org_metric(metrics: &str, name: &str) -> u64 {
    let prefix = format!("dataverse_proxy_{name}{{org=\"default\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("number"))
}

fn variants_made(metrics: &str) -> u64 {
    org_metric(metrics, "metadata_cache_variants_made_total")
}

/// Parallel hits that want another coding than the entry's cost one
/// transcoding per coding, not one per hit: the caller's form is kept.
#[tokio::test]
async fn hits_in_another_coding_are_transcoded_once() {
    let h = Harness::start().await;
    let fetched = h
        .get_with("/$metadata", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(fetched.headers()["content-encoding"], "gzip");
    let strong = fetched.headers()["etag"].clone();
    fetched.bytes().await.expect("document");
    let loads = (0..16).map(|_| async {
        let resp = h.get_with("/$metadata", &[("accept-encoding", "br")]).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-encoding"], "br");
        assert!(resp.headers().get("age").is_some(), "from the cache");
        let etag = resp.headers()["etag"].to_str().expect("ascii").to_owned();
        (etag, resp.bytes().await.expect("document"))
    });
    let answers = futures_util::future::join_all(loads).await;
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "one form for all");
    let (etag, br) = &answers[0];
    assert_eq!(
        etag,
        &format!("W/{}", strong.to_str().expect("ascii")),
        "recoded: weak"
    );
    let mut xml = Vec::new();
    brotli::BrotliDecompress(&mut &br[..], &mut xml).expect("brotli");
    assert!(xml.starts_with(b"<?xml"), "the CSDL document");
    assert_eq!(
        variants_made(&h.metrics().await),
        1,
        "one brotli transcoding"
    );
    // Identity is a coding of its own; asked again, it is served as kept.
    for _ in 0..3 {
        let plain = h.get("/$metadata").await.bytes().await.expect("xml");
        assert_eq!(plain, xml);
    }
    let m = h.metrics().await;
    assert_eq!(variants_made(&m), 2, "{m}");
    assert_eq!(metadata_requests(&h).len(), 1, "Dataverse sent it once");
    assert_eq!(counter(&m, "hit"), 19, "{m}");
    h.stop().await;
}

fn cache_bytes(metrics: &str) -> u64 {
    org_metric(metrics, "metadata_cache_bytes")
}

/// Without `public_url` or a trusted proxy, each caller's `Host` gets its
/// own links, but a form made for a `Host` anyone may send is never kept:
/// forty made-up hosts add nothing to the cache and evict nothing.
#[tokio::test]
async fn forms_for_a_callers_own_host_are_never_kept() {
    let h = Harness::start().await;
    let path = "/EntityDefinitions?$select=LogicalName";
    let first = h.get(path).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.expect("answer");
    let before = h.metrics().await;
    let held = cache_bytes(&before);
    assert!(held > 0, "{before}");
    for i in 0..40 {
        let host = format!("made-up-{i}.example:8080");
        let resp = h.get_with(path, &[("host", &host)]).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("age").is_some(), "from the cache");
        let body: serde_json::Value = resp.json().await.expect("json");
        let context = body["@odata.context"].as_str().expect("context");
        assert!(
            context.starts_with(&format!("http://{host}/api/data/")),
            "the caller's own links: {context}"
        );
    }
    let after = h.metrics().await;
    assert_eq!(cache_bytes(&after), held, "nothing kept for made-up hosts");
    assert_eq!(variants_made(&after), variants_made(&before));
    assert_eq!(counter(&after, "miss"), 1, "{after}");
    h.stop().await;
}

/// Table definitions queried as SDKs query them: `$filter` by name,
/// `$select` (with `MetadataId` always), `Attributes` expanded with their
/// own options, keys by `MetadataId`; an option the simulator does not
/// support is Dataverse's error, never an answer that ignored it.
#[tokio::test]
async fn table_definitions_answer_filters_selects_and_expansions() {
    let h = Harness::start().await;
    let get = |path: &str| {
        let url = h.url(path);
        let client = h.client.clone();
        async move { client.get(url).send().await.expect("get") }
    };
    let query = "/EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute\
                 &$filter=LogicalName eq 'contact' or LogicalName eq 'account'\
                 &$expand=Attributes($select=LogicalName,AttributeType;$filter=IsPrimaryId eq true)";
    let body: serde_json::Value = get(query).await.json().await.expect("json");
    let tables = body["value"].as_array().expect("value");
    assert_eq!(tables.len(), 2, "{body}");
    let account = tables
        .iter()
        .find(|t| t["LogicalName"] == "account")
        .expect("account");
    assert_eq!(account["EntitySetName"], "accounts");
    assert_eq!(account["PrimaryIdAttribute"], "accountid");
    assert_eq!(account["PrimaryNameAttribute"], "name");
    assert!(account["MetadataId"].is_string(), "always returned");
    assert!(account.get("DisplayName").is_none(), "not selected");
    let attributes = account["Attributes"].as_array().expect("attributes");
    assert_eq!(attributes.len(), 1, "{account}");
    assert_eq!(attributes[0]["LogicalName"], "accountid");
    assert_eq!(attributes[0]["AttributeType"], "Uniqueidentifier");

    let id = account["MetadataId"].as_str().expect("id");
    let by_id: serde_json::Value = get(&format!("/EntityDefinitions({id})?$select=LogicalName"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(by_id["LogicalName"], "account");

    let unsupported = get("/EntityDefinitions?$top=1").await;
    assert_eq!(unsupported.status(), 400);
    let error: serde_json::Value = unsupported.json().await.expect("json");
    assert!(
        error["error"]["message"]
            .as_str()
            .expect("message")
            .contains("$top")
    );
    let unknown = get("/EntityDefinitions?$filter=NoSuchName eq 'x'").await;
    assert_eq!(unknown.status(), 400);
    let grouped = get("/EntityDefinitions?$filter=(LogicalName eq 'account' or LogicalName eq 'lead') and IsCustomEntity eq true").await;
    assert_eq!(
        grouped.status(),
        400,
        "grouping is refused, not read wrongly"
    );
    h.stop().await;
}

/// A table's relationships, keys and typed attributes, as clients read them.
#[tokio::test]
async fn table_definitions_answer_relationships_keys_and_attribute_casts() {
    let h = Harness::start().await;
    let get = |path: String| {
        let url = h.url(&path);
        let client = h.client.clone();
        async move {
            let resp = client.get(url).send().await.expect("get");
            assert_eq!(resp.status(), 200, "{path}");
            resp.json::<serde_json::Value>().await.expect("json")
        }
    };
    let account = "/EntityDefinitions(LogicalName='account')";
    let one_to_many = get(format!("{account}/OneToManyRelationships")).await;
    let from_contacts = one_to_many["value"]
        .as_array()
        .expect("value")
        .iter()
        .find(|r| r["ReferencingEntity"] == "contact")
        .expect("contacts name their account");
    assert_eq!(from_contacts["ReferencedEntity"], "account");
    assert_eq!(
        from_contacts["ReferencedEntityNavigationPropertyName"],
        "contact_customer_accounts"
    );
    let many_to_one = get(format!("{account}/ManyToOneRelationships")).await;
    assert!(
        many_to_one["value"]
            .as_array()
            .expect("value")
            .iter()
            .any(|r| r["ReferencedEntity"] == "contact"),
        "{many_to_one}"
    );
    assert_eq!(
        get(format!("{account}/Keys")).await["value"],
        serde_json::json!([])
    );
    let dates = get(format!(
        "{account}/Attributes/Microsoft.Dynamics.CRM.DateTimeAttributeMetadata?$select=LogicalName,DateTimeBehavior"
    ))
    .await;
    let dates = dates["value"].as_array().expect("value");
    assert!(
        dates.iter().any(|a| a["LogicalName"] == "createdon"),
        "{dates:?}"
    );
    assert!(
        dates
            .iter()
            .all(|a| a["DateTimeBehavior"]["Value"] == "UserLocal")
    );
    let picklists = get(format!(
        "{account}/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    ))
    .await;
    assert_eq!(
        picklists["value"],
        serde_json::json!([]),
        "the sample tables have no choice columns"
    );
    let unknown = h
        .client
        .get(h.url(&format!(
            "{account}/Attributes/Microsoft.Dynamics.CRM.NoSuchMetadata"
        )))
        .send()
        .await
        .expect("get");
    assert_eq!(unknown.status(), 404);
    h.stop().await;
}
