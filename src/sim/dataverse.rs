//! Simulated Dataverse Web API (dossier §2).
//!
//! Serves `/api/data/v9.0|v9.1|v9.2/` with in-memory `accounts`, `contacts`
//! and `leads`:
//!
//! - every request needs a bearer token signed by the simulated Entra ID for
//!   this org (`aud`), unexpired; otherwise 401 with Dataverse's
//!   `WWW-Authenticate: Bearer authorization_uri=…, resource_id=…` challenge;
//! - `WhoAmI`, `$metadata`;
//! - collections: `$select`, `$filter` (`eq` on a column, joined by `and`),
//!   `$top`, `$count`, `Prefer: odata.maxpagesize` paging with an absolute
//!   `@odata.nextLink` carrying a double-encoded paging-cookie `$skiptoken`;
//! - single rows: retrieve (`ETag`, `If-None-Match` → 304), create (204 +
//!   `OData-EntityId`, or 201 with `return=representation`), update and
//!   upsert with `If-Match` / `If-None-Match` (412), delete;
//! - file columns (`dvp_document` on accounts and leads): upload with
//!   `PATCH …/dvp_document` and download with `GET …/dvp_document/$value`.
//!
//! Errors use Dataverse's `{"error":{"code":"0x…","message":…}}` shape.

// Handlers here return early with ready-made responses; their size is
// irrelevant off the proxy's hot path.
#![expect(
    clippy::result_large_err,
    reason = "simulator code, not on the hot path"
)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::entra::Claims;
use super::{SEEN_CAPACITY, SeenRequest, SimState, lock, now_epoch, utc_timestamp};

const MAX_PAGE: usize = 5000;
const JSON_LIMIT: usize = 16 * 1024 * 1024;
const FILE_LIMIT: usize = 512 * 1024 * 1024;
const ODATA_JSON: &str = "application/json; odata.metadata=minimal";

/// Ids of the simulated org and its application user.
pub(super) struct OrgIds {
    organization: Uuid,
    business_unit: Uuid,
    user: Uuid,
}

impl OrgIds {
    pub(super) fn new() -> Self {
        Self {
            organization: Uuid::new_v4(),
            business_unit: Uuid::new_v4(),
            user: Uuid::new_v4(),
        }
    }
}

// === Tables ===

/// A table's shape.
struct Schema {
    entity_set: &'static str,
    logical: &'static str,
    id_field: &'static str,
    /// Columns a row may have (besides the id and the file columns).
    columns: &'static [&'static str],
    file_columns: &'static [&'static str],
}

const SCHEMAS: &[Schema] = &[
    Schema {
        entity_set: "accounts",
        logical: "account",
        id_field: "accountid",
        columns: &[
            "name",
            "accountnumber",
            "telephone1",
            "address1_city",
            "revenue",
            "numberofemployees",
            "creditonhold",
            "description",
            "createdon",
            "modifiedon",
            "statecode",
        ],
        file_columns: &["dvp_document"],
    },
    Schema {
        entity_set: "contacts",
        logical: "contact",
        id_field: "contactid",
        columns: &[
            "firstname",
            "lastname",
            "fullname",
            "emailaddress1",
            "jobtitle",
            "telephone1",
            "createdon",
            "modifiedon",
            "statecode",
        ],
        file_columns: &[],
    },
    Schema {
        entity_set: "leads",
        logical: "lead",
        id_field: "leadid",
        columns: &[
            "subject",
            "firstname",
            "lastname",
            "fullname",
            "companyname",
            "emailaddress1",
            "leadqualitycode",
            "createdon",
            "modifiedon",
            "statecode",
        ],
        file_columns: &["dvp_document"],
    },
];

fn schema(entity_set: &str) -> Option<&'static Schema> {
    SCHEMAS.iter().find(|s| s.entity_set == entity_set)
}

#[derive(Clone)]
struct StoredFile {
    name: String,
    data: Bytes,
}

#[derive(Clone)]
struct Row {
    fields: Map<String, Value>,
    version: u64,
    files: HashMap<String, StoredFile>,
}

/// The in-memory database.
#[derive(Clone)]
pub(super) struct Db {
    tables: HashMap<&'static str, BTreeMap<Uuid, Row>>,
    next_version: u64,
}

const FIRST: &[&str] = &[
    "Yvonne", "Susanna", "Nancy", "Maria", "Sidney", "Scott", "Paul", "Rene", "Susan", "Patrick",
    "Thomas", "Rachel", "Jim", "Robert", "Cathan", "Alex", "Anne", "Brian", "Darren", "Eva",
];
const LAST: &[&str] = &[
    "McKay",
    "Stubberod",
    "Anderson",
    "Campbell",
    "Higa",
    "Konersmann",
    "Cannon",
    "Valdes",
    "Burk",
    "Sands",
    "Andersen",
    "Kim",
    "Glynn",
    "Lyon",
    "Cook",
    "Wu",
    "Weber",
    "Moreno",
];
const COMPANIES: &[&str] = &[
    "Fourth Coffee",
    "Litware, Inc.",
    "Adventure Works",
    "Fabrikam, Inc.",
    "Blue Yonder Airlines",
    "City Power & Light",
    "Contoso Pharmaceuticals",
    "Alpine Ski House",
    "A. Datum Corporation",
    "Coho Winery",
    "Northwind Traders",
    "Tailspin Toys",
    "Wingtip Toys",
    "Proseware, Inc.",
    "Trey Research",
    "Woodgrove Bank",
    "Lucerne Publishing",
    "Margie's Travel",
    "Humongous Insurance",
    "Graphic Design Institute",
];
const JOBS: &[&str] = &["Purchasing Manager", "Owner", "CFO", "Buyer"];
const CITIES: &[&str] = &[
    "Redmond",
    "Seattle",
    "Dallas",
    "Lynnwood",
    "Los Angeles",
    "Phoenix",
    "Santa Cruz",
    "Renton",
];
const SUBJECTS: &[&str] = &[
    "Interested in online-only store",
    "New store opened this year - follow up",
    "Wants to expand",
    "Likes our new products",
    "Store is expanding - send new catalogue",
    "Needs quote for coffee machines",
    "Requested product demo",
    "Evaluating a three-year contract",
];

impl Db {
    /// A database with plausible sample rows.
    pub(super) fn seeded() -> Self {
        let mut db = Self {
            tables: SCHEMAS
                .iter()
                .map(|s| (s.entity_set, BTreeMap::new()))
                .collect(),
            next_version: 71_000_000,
        };
        let created = utc_timestamp(now_epoch() - 86_400 * 30).replace(' ', "T");
        for i in 0..20 {
            let company = COMPANIES[i % COMPANIES.len()];
            db.insert_seed(
                "accounts",
                json!({
                    "name": company,
                    "accountnumber": format!("ACC-{:05}", 1000 + i),
                    "telephone1": format!("555-01{:02}", i),
                    "address1_city": CITIES[i % CITIES.len()],
                    "revenue": 100_000.0 * (i as f64 + 1.0),
                    "numberofemployees": 10 * (i + 1),
                    "creditonhold": i % 7 == 0,
                    "createdon": created,
                    "modifiedon": created,
                    "statecode": 0,
                }),
            );
        }
        for i in 0..30 {
            let (first, last) = (FIRST[i % FIRST.len()], LAST[(i * 7) % LAST.len()]);
            db.insert_seed(
                "contacts",
                json!({
                    "firstname": first,
                    "lastname": last,
                    "fullname": format!("{first} {last} (sample)"),
                    "emailaddress1": format!("{}.{}@example.com", first.to_lowercase(), last.to_lowercase()),
                    "jobtitle": JOBS[i % JOBS.len()],
                    "telephone1": format!("555-02{:02}", i),
                    "createdon": created,
                    "modifiedon": created,
                    "statecode": 0,
                }),
            );
        }
        for i in 0..25 {
            let (first, last) = (FIRST[(i * 3) % FIRST.len()], LAST[(i * 5) % LAST.len()]);
            db.insert_seed(
                "leads",
                json!({
                    "subject": SUBJECTS[i % SUBJECTS.len()],
                    "firstname": first,
                    "lastname": last,
                    "fullname": format!("{first} {last}"),
                    "companyname": COMPANIES[(i * 3) % COMPANIES.len()],
                    "emailaddress1": format!("{}@{}.example.com", first.to_lowercase(), last.to_lowercase()),
                    "leadqualitycode": 1 + i % 3,
                    "createdon": created,
                    "modifiedon": created,
                    "statecode": 0,
                }),
            );
        }
        db
    }

    fn insert_seed(&mut self, set: &'static str, fields: Value) {
        let Value::Object(fields) = fields else {
            return;
        };
        let version = self.bump();
        if let Some(t) = self.tables.get_mut(set) {
            t.insert(
                Uuid::new_v4(),
                Row {
                    fields,
                    version,
                    files: HashMap::new(),
                },
            );
        }
    }

    fn bump(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    pub(super) fn seed_rows(&mut self, set: &str, n: usize) {
        let Some(schema) = schema(set) else {
            return;
        };
        for i in 0..n {
            let fields = match schema.entity_set {
                "accounts" => {
                    json!({"name": format!("{} #{i}", COMPANIES[i % COMPANIES.len()]), "accountnumber": format!("GEN-{i:06}"), "statecode": 0})
                }
                "contacts" => {
                    json!({"firstname": FIRST[i % FIRST.len()], "lastname": format!("Generated{i}"), "fullname": format!("{} Generated{i}", FIRST[i % FIRST.len()]), "statecode": 0})
                }
                _ => {
                    json!({"subject": format!("{} #{i}", SUBJECTS[i % SUBJECTS.len()]), "lastname": format!("Generated{i}"), "statecode": 0})
                }
            };
            self.insert_seed(schema.entity_set, fields);
        }
    }

    pub(super) fn put_file(
        &mut self,
        set: &str,
        id: Uuid,
        column: &str,
        name: &str,
        data: Bytes,
    ) -> bool {
        let Some(row) = self.tables.get_mut(set).and_then(|t| t.get_mut(&id)) else {
            return false;
        };
        row.files.insert(
            column.to_owned(),
            StoredFile {
                name: name.to_owned(),
                data,
            },
        );
        true
    }

    pub(super) fn file(&self, set: &str, id: Uuid, column: &str) -> Option<Bytes> {
        let row = self.tables.get(set)?.get(&id)?;
        row.files.get(column).map(|f| f.data.clone())
    }

    pub(super) fn ids(&self, set: &str) -> Vec<Uuid> {
        self.tables
            .get(set)
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default()
    }

    pub(super) fn row(&self, set: &str, id: Uuid) -> Option<Value> {
        self.tables
            .get(set)?
            .get(&id)
            .map(|r| Value::Object(r.fields.clone()))
    }
}

/// A chunked file upload in progress (dossier §2.11).
pub(super) struct Upload {
    entity_set: &'static str,
    id: Uuid,
    column: String,
    name: String,
    data: Vec<u8>,
}

/// Chunk size the simulator asks for, as Dataverse does.
const UPLOAD_CHUNK: usize = 4 * 1024 * 1024;

// === HTTP ===

pub(super) fn router(state: Arc<SimState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// A Dataverse-format error.
pub(super) fn dv_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}});
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ODATA_JSON));
    if let Ok(v) = HeaderValue::from_str(&Uuid::new_v4().to_string()) {
        h.insert("req_id", v);
    }
    resp
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ODATA_JSON));
    resp
}

/// Headers Dataverse puts on every answer.
/// Headers on every answer. Dataverse's front end also sets its affinity
/// and client cookies (docs/dataverse.md, "Cookies"), which the proxy must
/// not pass on.
fn common_headers(h: &mut HeaderMap) {
    h.append(
        header::SET_COOKIE,
        HeaderValue::from_static("ARRAffinity=0f1e2d3c4b5a; path=/; secure; HttpOnly"),
    );
    h.append(
        header::SET_COOKIE,
        HeaderValue::from_static("ReqClientId=5b0c1a2e-0000-0000-0000-000000000000; expires=Fri, 01-Jan-2100 00:00:00 GMT; path=/; secure; HttpOnly"),
    );
    h.insert("odata-version", HeaderValue::from_static("4.0"));
    h.insert("x-ms-dop-hint", HeaderValue::from_static("4"));
    if let Ok(v) = HeaderValue::from_str(&Uuid::new_v4().to_string()) {
        h.insert("x-ms-service-request-id", v);
    }
}

async fn handle(State(sim): State<Arc<SimState>>, req: Request) -> Response {
    let claims = check_token(&sim, req.headers());
    record(&sim, &req, claims.clone());
    let mut resp = match claims {
        Err(why) => {
            // Read (and drop) the body first, as IIS does for small bodies,
            // so the caller sees the 401 rather than a reset connection.
            let _ = http_body_util::Limited::new(req.into_body(), JSON_LIMIT)
                .collect()
                .await;
            challenge(&sim, why)
        }
        Ok(_) => match sim.limiter.admit() {
            Err(throttled) => throttled,
            Ok(in_flight) => {
                let latency = *lock(&sim.latency);
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let mut resp = match take_fault(&sim) {
                    Some(resp) => resp,
                    None => route(&sim, req).await,
                };
                drop(in_flight);
                sim.limiter.headers(resp.headers_mut());
                resp
            }
        },
    };
    common_headers(resp.headers_mut());
    resp
}

/// The injected error for this request, if one is pending.
fn take_fault(sim: &SimState) -> Option<Response> {
    let mut slot = lock(&sim.dataverse_faults);
    let fault = slot.as_mut()?;
    if fault.count == 0 {
        *slot = None;
        return None;
    }
    fault.count -= 1;
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut resp = match status {
        StatusCode::TOO_MANY_REQUESTS => dv_error(
            status,
            "0x80072322",
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
        ),
        _ => dv_error(status, "0x80040216", "An unexpected error occurred."),
    };
    if let Some(secs) = fault.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    Some(resp)
}

fn record(sim: &SimState, req: &Request, claims: Result<Claims, &'static str>) {
    let seen = SeenRequest {
        method: req.method().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: req.headers().clone(),
        authorized: claims.is_ok(),
        claims: claims.ok(),
    };
    let mut log = lock(&sim.seen);
    if log.len() >= SEEN_CAPACITY {
        log.pop_front();
    }
    log.push_back(seen);
}

/// Validates the bearer: signature, audience (this org) and expiry.
fn check_token(sim: &SimState, headers: &HeaderMap) -> Result<Claims, &'static str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("MissingCrmAuthenticationToken")?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("InvalidAuthTicket")?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[&sim.org_url]);
    validation.set_issuer(&[format!("https://sts.windows.net/{}/", sim.tenant_id)]);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "aud"]);
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(&sim.entra.signing_key),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => "ExpiredAuthTicket",
        _ => "InvalidAuthTicket",
    })
    .and_then(|d| {
        // A token Entra ID has revoked is refused as a bad ticket.
        if lock(&sim.entra.revoked).contains(&d.claims.uti) {
            Err("BadAuthTicket")
        } else {
            Ok(d.claims)
        }
    })
}

/// Dataverse's 401 with the bearer challenge (dossier §2.9).
fn challenge(sim: &SimState, why: &str) -> Response {
    let mut resp = dv_error(
        StatusCode::UNAUTHORIZED,
        "0x80072560",
        &format!("The user is not authenticated ({why})."),
    );
    let challenge = format!(
        "Bearer authorization_uri={}/{}/oauth2/authorize, resource_id={}/",
        sim.entra.url, sim.tenant_id, sim.org_url
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// What a path under `/api/data/vX.Y/` addresses.
enum Target<'a> {
    WhoAmI,
    Batch,
    Metadata,
    Collection(&'static Schema),
    Entity(&'static Schema, Uuid),
    File(&'static Schema, Uuid, &'a str),
    FileValue(&'static Schema, Uuid, &'a str),
}

fn parse_target(rest: &str) -> Result<Target<'_>, Response> {
    let not_found = || {
        dv_error(
            StatusCode::NOT_FOUND,
            "0x80060888",
            &format!("Resource not found for the segment '{rest}'."),
        )
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let first = segments.first().copied().unwrap_or_default();
    if segments.len() == 1 {
        match first {
            "WhoAmI" | "WhoAmI()" => return Ok(Target::WhoAmI),
            "$metadata" => return Ok(Target::Metadata),
            "$batch" => return Ok(Target::Batch),
            _ => {}
        }
    }
    let (set, key) = match first.split_once('(') {
        Some((set, key)) => (set, Some(key.strip_suffix(')').ok_or_else(not_found)?)),
        None => (first, None),
    };
    let schema = schema(set).ok_or_else(not_found)?;
    let Some(key) = key else {
        return if segments.len() == 1 {
            Ok(Target::Collection(schema))
        } else {
            Err(not_found())
        };
    };
    let id = Uuid::parse_str(key).map_err(|_| {
        dv_error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            &format!("Bad Request - Error in query syntax: '{key}' is not a valid key."),
        )
    })?;
    match segments.as_slice() {
        [_] => Ok(Target::Entity(schema, id)),
        [_, col] if schema.file_columns.contains(col) => Ok(Target::File(schema, id, col)),
        [_, col, "$value"] if schema.file_columns.contains(col) => {
            Ok(Target::FileValue(schema, id, col))
        }
        _ => Err(not_found()),
    }
}

pub(super) async fn route(sim: &Arc<SimState>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/api/data/") else {
        return dv_error(
            StatusCode::NOT_FOUND,
            "",
            "The requested resource was not found.",
        );
    };
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    if !["v9.0", "v9.1", "v9.2"].contains(&version) {
        return dv_error(
            StatusCode::NOT_FOUND,
            "",
            "The requested resource was not found.",
        );
    }
    let decoded = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
    let target = match parse_target(&decoded) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let ctx = Ctx {
        sim: sim.clone(),
        base: format!("{}/api/data/{version}", sim.org_url),
        query: req.uri().query().unwrap_or("").to_owned(),
    };
    let method = req.method().clone();
    match (method, target) {
        (Method::GET, Target::WhoAmI) => ctx.whoami(),
        (Method::GET, Target::Metadata) => metadata(),
        (Method::POST, Target::Batch) => {
            let (parts, body) = req.into_parts();
            match read_limited(
                sim,
                body,
                JSON_LIMIT,
                "0x80040216",
                "The request length is too large.",
            )
            .await
            {
                Ok(bytes) => {
                    super::batch::execute(
                        sim,
                        &format!("/api/data/{version}"),
                        &parts.headers,
                        bytes,
                    )
                    .await
                }
                Err(resp) => resp,
            }
        }
        (Method::GET, Target::Collection(s)) => ctx.list(s, req.headers()),
        (Method::POST, Target::Collection(s)) => match read_json(sim, req).await {
            Ok((headers, body)) => ctx.create(s, &headers, body),
            Err(resp) => resp,
        },
        (Method::GET, Target::Entity(s, id)) => ctx.retrieve(s, id, req.headers()),
        (Method::PATCH, Target::Entity(s, id)) => match read_json(sim, req).await {
            Ok((headers, body)) => ctx.update(s, id, &headers, body),
            Err(resp) => resp,
        },
        (Method::DELETE, Target::Entity(s, id)) => ctx.delete(s, id),
        (Method::PATCH | Method::PUT, Target::File(s, id, col)) => {
            ctx.upload(s, id, col, req).await
        }
        (Method::DELETE, Target::File(s, id, col)) => ctx.delete_file(s, id, col),
        (Method::GET, Target::FileValue(s, id, col)) => ctx.download(s, id, col),
        (m, _) => dv_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "0x80060888",
            &format!("The HTTP method '{m}' is not allowed on this resource."),
        ),
    }
}

/// The whole body, or Dataverse's 413 with `code` and `message` past
/// `limit`; a body that breaks off is counted and answered 400 (its
/// connection is gone: nobody reads that answer).
async fn read_limited(
    sim: &SimState,
    body: Body,
    limit: usize,
    code: &str,
    message: &str,
) -> Result<Bytes, Response> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(dv_error(StatusCode::PAYLOAD_TOO_LARGE, code, message))
        }
        Err(_) => {
            sim.broken_bodies
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(dv_error(
                StatusCode::BAD_REQUEST,
                "0x80040216",
                "The request body could not be read.",
            ))
        }
    }
}

async fn read_json(
    sim: &SimState,
    req: Request,
) -> Result<(HeaderMap, Map<String, Value>), Response> {
    let (parts, body) = req.into_parts();
    let bytes = read_limited(
        sim,
        body,
        JSON_LIMIT,
        "0x80040216",
        "The request length is too large.",
    )
    .await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok((parts.headers, map)),
        _ => Err(dv_error(
            StatusCode::BAD_REQUEST,
            "0x80040216",
            "The request body is not a valid JSON object.",
        )),
    }
}

fn metadata() -> Response {
    let mut types = String::new();
    for s in SCHEMAS {
        types.push_str(&format!(
            "<EntityType Name=\"{}\"><Key><PropertyRef Name=\"{}\"/></Key><Property Name=\"{}\" Type=\"Edm.Guid\"/>",
            s.logical, s.id_field, s.id_field
        ));
        for c in s.columns {
            types.push_str(&format!("<Property Name=\"{c}\" Type=\"Edm.String\"/>"));
        }
        types.push_str("</EntityType>");
    }
    let sets: String = SCHEMAS
        .iter()
        .map(|s| {
            format!(
                "<EntitySet Name=\"{}\" EntityType=\"Microsoft.Dynamics.CRM.{}\"/>",
                s.entity_set, s.logical
            )
        })
        .collect();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><edmx:Edmx Version=\"4.0\" xmlns:edmx=\"http://docs.oasis-open.org/odata/ns/edmx\"><edmx:DataServices><Schema Namespace=\"Microsoft.Dynamics.CRM\" Alias=\"mscrm\" xmlns=\"http://docs.oasis-open.org/odata/ns/edm\">{types}<EntityContainer Name=\"System\">{sets}</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>"
    );
    let mut resp = (StatusCode::OK, xml).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    resp
}

/// The `Prefer` preferences of a request, lower-cased.
fn prefers(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase())
        .collect()
}

fn max_page_size(headers: &HeaderMap) -> Option<usize> {
    prefers(headers).iter().find_map(|p| {
        p.strip_prefix("odata.maxpagesize=")
            .and_then(|n| n.trim().parse::<usize>().ok())
    })
}

fn wants_representation(headers: &HeaderMap) -> bool {
    prefers(headers)
        .iter()
        .any(|p| p == "return=representation")
}

fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

/// One parsed `$filter` condition: `column eq literal`.
struct Condition {
    column: String,
    value: Value,
}

fn parse_filter(filter: &str) -> Result<Vec<Condition>, String> {
    filter
        .split(" and ")
        .map(|clause| {
            let clause = clause.trim();
            let mut parts = clause.splitn(3, ' ');
            let (Some(column), Some(op), Some(literal)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("Syntax error at '{clause}'."));
            };
            if op != "eq" {
                return Err(format!(
                    "The simulator supports only 'eq' in $filter, not '{op}'."
                ));
            }
            let literal = literal.trim();
            let value = if let Some(s) = literal
                .strip_prefix('\'')
                .and_then(|l| l.strip_suffix('\''))
            {
                Value::String(s.replace("''", "'"))
            } else if literal == "null" {
                Value::Null
            } else if let Ok(v) = serde_json::from_str::<Value>(literal) {
                v
            } else if Uuid::parse_str(literal).is_ok() {
                Value::String(literal.to_owned())
            } else {
                return Err(format!("Syntax error: '{literal}' is not a literal."));
            };
            Ok(Condition {
                column: column.to_owned(),
                value,
            })
        })
        .collect()
}

fn matches(
    fields: &Map<String, Value>,
    id_field: &str,
    id: Uuid,
    conditions: &[Condition],
) -> bool {
    conditions.iter().all(|c| {
        if c.column == id_field {
            return c.value.as_str().and_then(|s| Uuid::parse_str(s).ok()) == Some(id);
        }
        let actual = fields.get(&c.column).unwrap_or(&Value::Null);
        match (actual, &c.value) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a == b,
        }
    })
}

/// The query options of a request, decoded once.
struct Query {
    options: Vec<(String, String)>,
}

impl Query {
    fn parse(raw: &str) -> Self {
        Self {
            options: url::form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Paging cookie as Dataverse writes it in `$skiptoken` (dossier §2.5):
/// an XML cookie whose `pagingcookie` attribute is itself URL-encoded, and
/// the whole token URL-encoded again in the link.
fn skiptoken(page: usize, id_field: &str, first: Uuid, last: Uuid) -> String {
    let f = first.to_string().to_uppercase();
    let l = last.to_string().to_uppercase();
    format!(
        "%3Ccookie%20pagenumber=%22{page}%22%20pagingcookie=%22%253ccookie%2520page%253d%2522{prev}%2522%253e%253c{id_field}%2520last%253d%2522%257b{l}%257d%2522%2520first%253d%2522%257b{f}%257d%2522%2520%252f%253e%253c%252fcookie%253e%22%20istracking=%22False%22%20/%3E",
        prev = page - 1,
    )
}

/// Reads `(page number, last id)` back from a decoded `$skiptoken`.
fn parse_skiptoken(decoded: &str) -> Option<(usize, Uuid)> {
    let page = decoded
        .split("pagenumber=\"")
        .nth(1)?
        .split('"')
        .next()?
        .parse()
        .ok()?;
    let last = decoded.split("last%3d%22%7b").nth(1)?.split("%7d").next()?;
    Some((page, Uuid::parse_str(last).ok()?))
}

/// Per-request context.
struct Ctx {
    sim: Arc<SimState>,
    /// `{org}/api/data/vX.Y`
    base: String,
    /// The raw query string.
    query: String,
}

impl Ctx {
    fn whoami(&self) -> Response {
        let ids = &self.sim.ids;
        json_response(
            StatusCode::OK,
            &json!({
                "@odata.context": format!("{}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", self.base),
                "BusinessUnitId": ids.business_unit,
                "UserId": ids.user,
                "OrganizationId": ids.organization,
            }),
        )
    }

    fn entity_url(&self, s: &Schema, id: Uuid) -> String {
        format!("{}/{}({id})", self.base, s.entity_set)
    }

    /// The `$select` list, validated against the schema.
    fn select(&self, s: &Schema, q: &Query) -> Result<Option<Vec<String>>, Response> {
        let Some(sel) = q.get("$select") else {
            return Ok(None);
        };
        let cols: Vec<String> = sel.split(',').map(|c| c.trim().to_owned()).collect();
        for c in &cols {
            if c != s.id_field && !s.columns.contains(&c.as_str()) {
                return Err(dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    &format!(
                        "Could not find a property named '{c}' on type 'Microsoft.Dynamics.CRM.{}'.",
                        s.logical
                    ),
                ));
            }
        }
        Ok(Some(cols))
    }

    fn project(s: &Schema, id: Uuid, row: &Row, select: Option<&[String]>) -> Value {
        let mut out = Map::new();
        out.insert("@odata.etag".into(), Value::String(etag(row.version)));
        match select {
            Some(cols) => {
                for c in cols {
                    out.insert(c.clone(), row.fields.get(c).cloned().unwrap_or(Value::Null));
                }
            }
            None => {
                for c in s.columns {
                    out.insert(
                        (*c).to_owned(),
                        row.fields.get(*c).cloned().unwrap_or(Value::Null),
                    );
                }
            }
        }
        out.insert(s.id_field.to_owned(), Value::String(id.to_string()));
        Value::Object(out)
    }

    fn context(&self, s: &Schema, select: Option<&[String]>, entity: bool) -> String {
        let sel = select
            .map(|c| format!("({})", c.join(",")))
            .unwrap_or_default();
        let suffix = if entity { "/$entity" } else { "" };
        format!("{}/$metadata#{}{sel}{suffix}", self.base, s.entity_set)
    }

    fn list(&self, s: &'static Schema, headers: &HeaderMap) -> Response {
        let q = Query::parse(&self.query);
        let select = match self.select(s, &q) {
            Ok(sel) => sel,
            Err(resp) => return resp,
        };
        let conditions = match q.get("$filter").map(parse_filter).transpose() {
            Ok(c) => c.unwrap_or_default(),
            Err(msg) => return dv_error(StatusCode::BAD_REQUEST, "0x80060888", &msg),
        };
        let top = match q.get("$top").map(str::parse::<usize>).transpose() {
            Ok(t) => t,
            Err(_) => {
                return dv_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    "The value of $top must be a non-negative integer.",
                );
            }
        };
        let page_size = max_page_size(headers).map(|n| n.clamp(1, MAX_PAGE));
        let after = match q.get("$skiptoken") {
            None => None,
            Some(tok) => match parse_skiptoken(tok) {
                Some(p) => Some(p),
                None => {
                    return dv_error(
                        StatusCode::BAD_REQUEST,
                        "0x80040203",
                        "The $skiptoken paging cookie is invalid.",
                    );
                }
            },
        };
        // `$top` is ignored when a page size is asked for (dossier §2.5).
        let limit = match (page_size, top) {
            (Some(n), _) => n,
            (None, Some(t)) => t.min(MAX_PAGE),
            (None, None) => MAX_PAGE,
        };

        let db = lock(&self.sim.db);
        let Some(table) = db.tables.get(s.entity_set) else {
            return dv_error(StatusCode::NOT_FOUND, "0x80060888", "No such table.");
        };
        let start = after.map(|(_, last)| last);
        let mut matching = table
            .range((
                start.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                std::ops::Bound::Unbounded,
            ))
            .filter(|(id, row)| matches(&row.fields, s.id_field, **id, &conditions));
        let page: Vec<(Uuid, &Row)> = matching
            .by_ref()
            .take(limit)
            .map(|(id, r)| (*id, r))
            .collect();
        let more = page_size.is_some() && matching.next().is_some();
        let total = q.get("$count").filter(|c| *c == "true").map(|_| {
            table
                .iter()
                .filter(|(id, row)| matches(&row.fields, s.id_field, **id, &conditions))
                .count()
                .min(5000)
        });

        let value: Vec<Value> = page
            .iter()
            .map(|(id, row)| Self::project(s, *id, row, select.as_deref()))
            .collect();
        let mut body = Map::new();
        body.insert(
            "@odata.context".into(),
            Value::String(self.context(s, select.as_deref(), false)),
        );
        if let Some(n) = total {
            body.insert("@odata.count".into(), json!(n));
        }
        body.insert("value".into(), Value::Array(value));
        if more && let (Some((first, _)), Some((last, _))) = (page.first(), page.last()) {
            let page_no = after.map_or(2, |(n, _)| n + 1);
            // Keep the caller's query (minus any old skiptoken) byte for byte.
            let kept: Vec<&str> = self
                .query
                .split('&')
                .filter(|p| {
                    !p.is_empty()
                        && !p.starts_with("$skiptoken=")
                        && !p.starts_with("%24skiptoken=")
                })
                .collect();
            let mut link = format!("{}/{}?", self.base, s.entity_set);
            for p in kept {
                link.push_str(p);
                link.push('&');
            }
            link.push_str("$skiptoken=");
            link.push_str(&skiptoken(page_no, s.id_field, *first, *last));
            body.insert("@odata.nextLink".into(), Value::String(link));
        }
        drop(db);
        let mut resp = json_response(StatusCode::OK, &Value::Object(body));
        if let Some(n) = page_size
            && let Ok(v) = HeaderValue::from_str(&format!("odata.maxpagesize={n}"))
        {
            resp.headers_mut().insert("preference-applied", v);
        }
        resp
    }

    fn retrieve(&self, s: &'static Schema, id: Uuid, headers: &HeaderMap) -> Response {
        let q = Query::parse(&self.query);
        let select = match self.select(s, &q) {
            Ok(sel) => sel,
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
        body["@odata.context"] = Value::String(self.context(s, select.as_deref(), true));
        drop(db);
        let mut resp = json_response(StatusCode::OK, &body);
        insert_etag(resp.headers_mut(), &tag);
        resp
    }

    fn check_columns(s: &Schema, body: &Map<String, Value>) -> Result<(), Response> {
        for key in body.keys() {
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

    fn create(
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

    fn entity_id_response(&self, s: &Schema, id: Uuid) -> Response {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        if let Ok(v) = HeaderValue::from_str(&self.entity_url(s, id)) {
            resp.headers_mut().insert("odata-entityid", v.clone());
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }

    fn update(
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

    fn delete(&self, s: &'static Schema, id: Uuid) -> Response {
        let removed = lock(&self.sim.db)
            .tables
            .get_mut(s.entity_set)
            .and_then(|t| t.remove(&id));
        match removed {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => not_found(s, id),
        }
    }

    async fn upload(&self, s: &'static Schema, id: Uuid, col: &str, req: Request) -> Response {
        if !self.exists(s, id) {
            return not_found(s, id);
        }
        let q = Query::parse(&self.query);
        let name = req
            .headers()
            .get("x-ms-file-name")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| q.get("x-ms-file-name").map(str::to_owned))
            .unwrap_or_else(|| "file.bin".to_owned());
        let chunked = req
            .headers()
            .get("x-ms-transfer-mode")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            return self.start_upload(s, id, col, name);
        }
        if let Some(token) = q.get("sessiontoken") {
            let token = token.to_owned();
            return self.upload_chunk(&token, req).await;
        }
        let body = match read_limited(
            &self.sim,
            req.into_body(),
            FILE_LIMIT,
            "0x80044a02",
            "Attachment file size is too big.",
        )
        .await
        {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        if lock(&self.sim.db).put_file(s.entity_set, id, col, &name, body) {
            StatusCode::NO_CONTENT.into_response()
        } else {
            not_found(s, id)
        }
    }

    /// First request of a chunked upload: a session and where to send chunks.
    fn start_upload(&self, s: &'static Schema, id: Uuid, col: &str, name: String) -> Response {
        let token = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        lock(&self.sim.uploads).insert(
            token.clone(),
            Upload {
                entity_set: s.entity_set,
                id,
                column: col.to_owned(),
                name,
                data: Vec::new(),
            },
        );
        let mut resp = StatusCode::OK.into_response();
        let h = resp.headers_mut();
        let location = format!("{}/{col}?sessiontoken={token}", self.entity_url(s, id));
        if let Ok(v) = HeaderValue::from_str(&location) {
            h.insert(header::LOCATION, v);
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert("x-ms-chunk-size", HeaderValue::from(UPLOAD_CHUNK));
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static("x-ms-chunk-size"),
        );
        resp
    }

    /// One chunk: 206 until the last byte arrives, then 204.
    async fn upload_chunk(&self, token: &str, req: Request) -> Response {
        let range = req
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        let Some((start, end, total)) = range else {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090011",
                "A Content-Range header 'bytes start-end/total' is required for a chunk.",
            );
        };
        let body = match read_limited(
            &self.sim,
            req.into_body(),
            UPLOAD_CHUNK * 2,
            "0x80044a02",
            "The chunk is too big.",
        )
        .await
        {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let mut uploads = lock(&self.sim.uploads);
        let Some(upload) = uploads.get_mut(token) else {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090012",
                "The upload session is invalid or has expired.",
            );
        };
        if start != upload.data.len() || end + 1 - start != body.len() || end >= total {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090013",
                &format!(
                    "The chunk range {start}-{end}/{total} does not continue the upload at byte {}.",
                    upload.data.len()
                ),
            );
        }
        upload.data.extend_from_slice(&body);
        if upload.data.len() < total {
            return StatusCode::PARTIAL_CONTENT.into_response();
        }
        let Some(done) = uploads.remove(token) else {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090012",
                "The upload session is invalid.",
            );
        };
        drop(uploads);
        let stored = lock(&self.sim.db).put_file(
            done.entity_set,
            done.id,
            &done.column,
            &done.name,
            Bytes::from(done.data),
        );
        if stored {
            StatusCode::NO_CONTENT.into_response()
        } else {
            dv_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                "The record was deleted during the upload.",
            )
        }
    }

    fn delete_file(&self, s: &'static Schema, id: Uuid, col: &str) -> Response {
        let mut db = lock(&self.sim.db);
        match db.tables.get_mut(s.entity_set).and_then(|t| t.get_mut(&id)) {
            Some(row) => {
                row.files.remove(col);
                StatusCode::NO_CONTENT.into_response()
            }
            None => not_found(s, id),
        }
    }

    fn exists(&self, s: &Schema, id: Uuid) -> bool {
        lock(&self.sim.db)
            .tables
            .get(s.entity_set)
            .is_some_and(|t| t.contains_key(&id))
    }

    fn download(&self, s: &'static Schema, id: Uuid, col: &str) -> Response {
        let (name, data) = {
            let db = lock(&self.sim.db);
            let Some(row) = db.tables.get(s.entity_set).and_then(|t| t.get(&id)) else {
                return not_found(s, id);
            };
            match row.files.get(col) {
                Some(f) => (f.name.clone(), f.data.clone()),
                None => {
                    return dv_error(
                        StatusCode::NOT_FOUND,
                        "0x80060891",
                        &format!("No file attachment found for attribute: {col} EntityId: {id}."),
                    );
                }
            }
        };
        let abort_after = *lock(&self.sim.abort_downloads_after);
        let size = data.len();
        // Streamed in 64 KiB chunks, as a large file would be.
        let chunks = (0..size.div_ceil(CHUNK))
            .map(move |i| data.slice(i * CHUNK..((i + 1) * CHUNK).min(size)));
        let mut resp = match abort_after {
            None => {
                let stream = futures_util::stream::iter(chunks.map(Ok::<_, std::io::Error>));
                let mut resp = Response::new(Body::from_stream(stream));
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
                resp
            }
            Some(limit) => {
                // Send `limit` bytes, then fail: hyper drops the connection
                // without the final chunk, as a crashed server would.
                let mut sent = 0usize;
                let stream = futures_util::stream::iter(chunks)
                    .map(move |c| {
                        let take = c.len().min(limit.saturating_sub(sent));
                        sent += take;
                        c.slice(..take)
                    })
                    .take_while(|c| std::future::ready(!c.is_empty()))
                    .map(Ok::<_, std::io::Error>)
                    .chain(futures_util::stream::once(async {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Err(std::io::Error::other("simulated crash mid-body"))
                    }));
                Response::new(Body::from_stream(stream))
            }
        };
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert("x-ms-file-size", HeaderValue::from(size));
        if let Ok(v) = HeaderValue::from_str(&name) {
            h.insert("x-ms-file-name", v);
        }
        h.insert(
            "mimetype",
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static("x-ms-file-size; x-ms-file-name; mimetype"),
        );
        resp
    }
}

const CHUNK: usize = 64 * 1024;

/// `bytes 0-4194303/25870370` → (0, 4194303, 25870370).
fn parse_content_range(v: &str) -> Option<(usize, usize, usize)> {
    let v = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = v.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end).then_some((start, end, total))
}

fn insert_etag(h: &mut HeaderMap, tag: &str) {
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
}

fn not_found(s: &Schema, id: Uuid) -> Response {
    dv_error(
        StatusCode::NOT_FOUND,
        "0x80040217",
        &format!("{} With Id = {id} Does Not Exist", s.logical),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skiptoken_round_trips_through_one_decoding() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let link_value = skiptoken(3, "leadid", a, b);
        let decoded: String = url::form_urlencoded::parse(format!("t={link_value}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        assert!(decoded.starts_with("<cookie pagenumber=\"3\""), "{decoded}");
        assert_eq!(parse_skiptoken(&decoded), Some((3, b)));
    }

    #[test]
    fn filters_parse() {
        let c = parse_filter("name eq 'Fourth Coffee' and statecode eq 0").expect("ok");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].value, Value::String("Fourth Coffee".into()));
        assert!(parse_filter("name gt 'x'").is_err());
    }
}
