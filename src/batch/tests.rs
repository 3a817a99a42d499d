//! The reader against Dataverse's documented batch examples (Microsoft
//! Learn, "Execute batch operations using the Web API", with CRLF line
//! ends as on the wire) and against adversarial shapes.

use super::*;

const ORG: &str = "https://contoso.crm.dynamics.com";

/// A documented example: `[Organization URI]` filled in, LF made CRLF.
fn wire(doc: &str) -> Vec<u8> {
    doc.replace("[Organization URI]", ORG)
        .replace("[Organization Uri]", ORG)
        .replace('\n', "\r\n")
        .into_bytes()
}

fn ops(content_type: &str, body: &[u8]) -> Vec<(String, String, bool)> {
    parse(content_type, body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
        .into_iter()
        .map(|o| (o.method.to_owned(), o.target.to_owned(), o.in_change_set))
        .collect()
}

fn refused(content_type: &str, body: &[u8]) -> BatchError {
    match parse(content_type, body) {
        Ok(ops) => panic!(
            "accepted {} operations: {}",
            ops.len(),
            String::from_utf8_lossy(body)
        ),
        Err(e) => e,
    }
}

const NO_CHANGE_SET: &str = r#"--batch_80dd1615-2a10-428a-bb6f-0e559792721f
Content-Type: application/http
Content-Transfer-Encoding: binary

POST /api/data/v9.2/tasks HTTP/1.1
Content-Type: application/json; type=entry

{
  "subject": "Task 1 in batch",
  "regardingobjectid_account_task@odata.bind": "accounts(00000000-0000-0000-0000-000000000001)"
}
--batch_80dd1615-2a10-428a-bb6f-0e559792721f
Content-Type: application/http
Content-Transfer-Encoding: binary

POST /api/data/v9.2/tasks HTTP/1.1
Content-Type: application/json; type=entry

{
  "subject": "Task 2 in batch",
  "regardingobjectid_account_task@odata.bind": "accounts(00000000-0000-0000-0000-000000000001)"
}
--batch_80dd1615-2a10-428a-bb6f-0e559792721f
Content-Type: application/http
Content-Transfer-Encoding: binary

GET /api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)/Account_Tasks?$select=subject HTTP/1.1


--batch_80dd1615-2a10-428a-bb6f-0e559792721f--
"#;
const NO_CHANGE_SET_CT: &str =
    "multipart/mixed; boundary=\"batch_80dd1615-2a10-428a-bb6f-0e559792721f\"";

const CHANGE_SET: &str = r#"--batch_22975cad-7f57-410d-be15-6363209367ea
Content-Type: multipart/mixed; boundary="changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a"

--changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 1

POST /api/data/v9.2/tasks HTTP/1.1
Content-Type: application/json; type=entry

{
  "subject": "Task 1 in batch"
}
--changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 2

POST /api/data/v9.2/tasks HTTP/1.1
Content-Type: application/json; type=entry

{
  "subject": "Task 2 in batch"
}
--changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a--

--batch_22975cad-7f57-410d-be15-6363209367ea
Content-Type: application/http
Content-Transfer-Encoding: binary

GET /api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)/Account_Tasks?$select=subject HTTP/1.1


--batch_22975cad-7f57-410d-be15-6363209367ea--
"#;
const CHANGE_SET_CT: &str =
    "multipart/mixed; boundary=\"batch_22975cad-7f57-410d-be15-6363209367ea\"";

/// References in the URL (`PUT $1/lastname`) and in bodies; absolute URLs.
const REFERENCES: &str = r#"--batch_AAA123
Content-Type: multipart/mixed; boundary=changeset_dd81ccab-11ce-4d57-b91d-12c4e25c3cab

--changeset_dd81ccab-11ce-4d57-b91d-12c4e25c3cab
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 1

POST [Organization URI]/api/data/v9.2/contacts HTTP/1.1
Content-Type: application/json

{
  "firstname":"First Name",
  "lastname":"Last name"
}

--changeset_dd81ccab-11ce-4d57-b91d-12c4e25c3cab
Content-Transfer-Encoding: binary
Content-Type: application/http
Content-ID: 2

PUT $1/lastname HTTP/1.1
Content-Type: application/json

{
  "value":"BBBBB"
}

--changeset_dd81ccab-11ce-4d57-b91d-12c4e25c3cab
Content-Type:application/http
Content-Transfer-Encoding:binary
Content-ID:3

PATCH $1 HTTP/1.1
Content-Type:application/json

{"primarycontactid@odata.bind":"$2"}

--changeset_dd81ccab-11ce-4d57-b91d-12c4e25c3cab--
--batch_AAA123--
"#;
const AAA_CT: &str = "multipart/mixed;boundary=batch_AAA123";

/// The continue-on-error example: parts with their own Content-Length.
const CONTINUE_ON_ERROR: &str = r#"--batch_662d4610-7f12-4895-ac4a-3fdf77cc10a1
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-Length: 439

POST /api/data/v9.2/tasks HTTP/1.1
Content-Type: application/json; type=entry

{
  "subject": "Subject is too long xxxxxxxxxxxxxxxx"
}
--batch_662d4610-7f12-4895-ac4a-3fdf77cc10a1
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-Length: 250

POST /api/data/v9.2/tasks HTTP/1.1
Content-Type: application/json; type=entry

{
  "subject": "Task 2 in batch"
}
--batch_662d4610-7f12-4895-ac4a-3fdf77cc10a1--
"#;
const CONTINUE_CT: &str =
    "multipart/mixed; boundary=\"batch_662d4610-7f12-4895-ac4a-3fdf77cc10a1\"";

#[test]
fn documented_batches_are_read_exactly() {
    assert_eq!(
        ops(NO_CHANGE_SET_CT, &wire(NO_CHANGE_SET)),
        [
            ("POST".into(), "/api/data/v9.2/tasks".into(), false),
            ("POST".into(), "/api/data/v9.2/tasks".into(), false),
            (
                "GET".into(),
                "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)/Account_Tasks?$select=subject".into(),
                false
            ),
        ]
    );
    let change_set = ops(CHANGE_SET_CT, &wire(CHANGE_SET));
    assert_eq!(change_set.len(), 3);
    assert!(change_set[0].2 && change_set[1].2 && !change_set[2].2);
    let refs = ops(AAA_CT, &wire(REFERENCES));
    assert_eq!(
        refs.iter()
            .map(|o| (o.0.as_str(), o.1.as_str()))
            .collect::<Vec<_>>(),
        [
            (
                "POST",
                "https://contoso.crm.dynamics.com/api/data/v9.2/contacts"
            ),
            ("PUT", "$1/lastname"),
            ("PATCH", "$1"),
        ]
    );
    assert_eq!(ops(CONTINUE_CT, &wire(CONTINUE_ON_ERROR)).len(), 2);
}

#[test]
fn header_lines_are_ranges_of_the_body() {
    let body = wire(REFERENCES);
    let parsed = parse(AAA_CT, &body).expect("parses");
    let put = &parsed[1];
    let names: Vec<&str> = put.part_headers.iter().map(|h| h.name).collect();
    assert_eq!(
        names,
        ["Content-Transfer-Encoding", "Content-Type", "Content-ID"]
    );
    let ct = &put.headers[0];
    assert_eq!(
        &body[ct.line.clone()],
        b"Content-Type: application/json\r\n"
    );
    assert_eq!(ct.value, b"application/json");
    let cut = without_lines(&body, std::slice::from_ref(&ct.line));
    assert_eq!(cut.len(), body.len() - ct.line.len());
    assert_eq!(
        parse(AAA_CT, &cut).expect("still parses")[1].headers.len(),
        0
    );
}

#[test]
fn a_reference_before_its_content_id_is_refused() {
    let body = wire(
        "--b\nContent-Type: multipart/mixed; boundary=cs\n\n--cs\nContent-Type: application/http\nContent-ID: 2\n\n\
         POST /api/data/v9.2/phonecalls HTTP/1.1\nContent-Type: application/json\n\n{\"a@odata.bind\":\"$1\"}\n\
         --cs\nContent-Type: application/http\nContent-ID: 1\n\nPATCH $1 HTTP/1.1\nContent-Type: application/json\n\n{}\n--cs--\n--b--\n",
    );
    refused("multipart/mixed; boundary=b", &body);
    // `$1` at the top level names nothing.
    let top = wire("--b\nContent-Type: application/http\n\nDELETE $1 HTTP/1.1\n\n\n--b--\n");
    refused("multipart/mixed; boundary=b", &top);
}

/// One operation in a batch with boundary `b`; `op` without its final line end.
fn one(op: &str) -> Vec<u8> {
    wire(&format!(
        "--b\nContent-Type: application/http\n\n{op}\n\n\n--b--\n"
    ))
}

const B: &str = "multipart/mixed; boundary=b";

/// A boundary line inside a JSON string ends the part, for Dataverse as for
/// the proxy: the DELETE after it is an operation, and the policy sees it.
#[test]
fn a_delimiter_inside_a_body_starts_a_part_for_both_readers() {
    let body = wire(
        "--b\nContent-Type: application/http\n\nPOST /api/data/v9.2/tasks HTTP/1.1\nContent-Type: application/json\n\n{\"a\":\"\n--b\nContent-Type: application/http\n\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\n\n\n--b--\n",
    );
    let seen = ops(B, &body);
    assert_eq!(seen[1].0, "DELETE");
    assert_eq!(seen[1].1, "/api/data/v9.2/accounts(1)");
}

#[test]
fn blank_preamble_epilogue_and_padding_are_read() {
    let mut body = b"\r\n\r\n".to_vec();
    body.extend(wire("--b  \t\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--b-- \n\n"));
    assert_eq!(ops(B, &body).len(), 1);
    assert_eq!(ops("multipart/mixed; boundary=\"b\"", &body).len(), 1);
    // An empty batch is a batch.
    assert_eq!(ops(B, b"--b--").len(), 0);
    // Text before the first or after the last delimiter is not.
    let op =
        "--b\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--b--\n";
    let e = refused(B, &wire(&format!("preamble\n{op}")));
    assert!(e.0.contains("before the first"), "{e}");
    let e = refused(B, &wire(&format!("{op}epilogue\n")));
    assert!(e.0.contains("after the close"), "{e}");
}

#[test]
fn adversarial_shapes_are_refused() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "boundary in the middle of a body line",
            one("POST /api/data/v9.2/tasks HTTP/1.1\nContent-Type: application/json\n\n{\"a\":\"x --b y\"}"),
            "boundary appears",
        ),
        (
            "boundary in another letter case",
            wire("--b\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--B\nContent-Type: application/http\n\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\n\n\n--b--\n"),
            "boundary appears",
        ),
        (
            "LF-only lines",
            b"--b\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--b--\n".to_vec(),
            "CRLF",
        ),
        (
            "LF-only delimiter line after CRLF content",
            b"--b\r\nContent-Type: application/http\r\n\r\nPOST /api/data/v9.2/tasks HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{}\n--b\nContent-Type: application/http\n\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\n\n\r\n--b--\r\n".to_vec(),
            "boundary appears",
        ),
        (
            "bare CR in a part header",
            b"--b\r\nContent-Type: application/http\rX: y\r\n\r\nGET /api/data/v9.2/accounts HTTP/1.1\r\n\r\n\r\n--b--\r\n".to_vec(),
            "CRLF",
        ),
        (
            "nested change set",
            wire("--b\nContent-Type: multipart/mixed; boundary=cs\n\n--cs\nContent-Type: multipart/mixed; boundary=inner\n\n--inner\nContent-Type: application/http\n\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\n\n\n--inner--\n--cs--\n--b--\n"),
            "change set may not contain",
        ),
        (
            "missing part Content-Type",
            wire("--b\nContent-Transfer-Encoding: binary\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--b--\n"),
            "no Content-Type",
        ),
        (
            "part of another media type",
            wire("--b\nContent-Type: text/plain\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--b--\n"),
            "neither application/http",
        ),
        ("lower-case method", one("delete /api/data/v9.2/accounts(1) HTTP/1.1"), "Web API"),
        ("mixed-case method", one("Delete /api/data/v9.2/accounts(1) HTTP/1.1"), "Web API"),
        ("extension method", one("MERGE /api/data/v9.2/accounts(1) HTTP/1.1"), "Web API"),
        ("two spaces after the method", one("GET  /api/data/v9.2/accounts HTTP/1.1"), "cannot be parsed"),
        ("two spaces before the version", one("GET /api/data/v9.2/accounts  HTTP/1.1"), "cannot be parsed"),
        ("tab as a separator", one("GET\t/api/data/v9.2/accounts HTTP/1.1"), "cannot be parsed"),
        ("HTTP/1.0", one("GET /api/data/v9.2/accounts HTTP/1.0"), "HTTP/1.1"),
        ("no version", one("GET /api/data/v9.2/accounts"), "cannot be parsed"),
        ("space before a colon", one("GET /api/data/v9.2/accounts HTTP/1.1\nPrefer : x"), "cannot be parsed"),
        ("folded header", one("GET /api/data/v9.2/accounts HTTP/1.1\nPrefer: a\n b"), "cannot be parsed"),
        ("empty line before the request line", one("\nGET /api/data/v9.2/accounts HTTP/1.1"), "does not start with its request line"),
        ("GET with a body", one("GET /api/data/v9.2/accounts HTTP/1.1\n\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1"), "carries a body"),
        ("DELETE with a body", one("DELETE /api/data/v9.2/accounts(1) HTTP/1.1\n\n{}"), "carries a body"),
        ("incomplete head", wire("--b\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n--b--\n"), "incomplete"),
        ("no close delimiter", wire("--b\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n"), "close delimiter"),
        ("text after the boundary", wire("--bx\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--b--\n"), "does not end with CRLF"),
        ("boundary in the epilogue", wire("--b--\n--b\nContent-Type: application/http\n\nDELETE /api/data/v9.2/accounts(1) HTTP/1.1\n\n\n--b--\n"), "after the close"),
        ("no part head end", wire("--b\nContent-Type: application/http\n--b--\n"), "no empty line"),
    ];
    for (name, body, why) in cases {
        let e = refused(B, &body);
        assert!(e.0.contains(why), "{name}: refused for another reason: {e}");
    }
    for ct in [
        "multipart/mixed",
        "application/json",
        "multipart/mixed; boundary=",
        "multipart/mixed; boundary=\"unterminated",
        "multipart/related; boundary=b",
    ] {
        assert!(parse(ct, b"--b--").is_err(), "{ct}");
    }
    let long = format!("multipart/mixed; boundary={}", "x".repeat(71));
    assert!(parse(&long, b"--b--").is_err());
}

#[test]
fn at_most_a_thousand_operations() {
    let op = "--b\r\nContent-Type: application/http\r\n\r\nGET /api/data/v9.2/accounts HTTP/1.1\r\n\r\n\r\n";
    let body = |n: usize| format!("{}--b--\r\n", op.repeat(n)).into_bytes();
    assert_eq!(ops(B, &body(1000)).len(), 1000);
    assert_eq!(
        refused(B, &body(1001)),
        BatchError("a batch holds at most 1,000 operations (Dataverse's limit)")
    );
}

#[test]
fn targets_resolve_against_the_service_root_and_known_origins() {
    let origins = [ORG.to_owned(), "http://proxy.local:8080/main".to_owned()];
    let target = |t: &str| {
        let body = one(&format!("GET {t} HTTP/1.1"));
        let parsed = parse(B, &body).unwrap_or_else(|e| panic!("{t}: {e}"));
        parsed[0].resolve("/api/data/v9.2", &origins)
    };
    let path = |p: &str| Ok(Target::Path(p.to_owned()));
    assert_eq!(
        target("accounts(1)?$select=name"),
        path("/api/data/v9.2/accounts(1)?$select=name")
    );
    assert_eq!(
        target("/api/data/v9.1/contacts"),
        path("/api/data/v9.1/contacts")
    );
    assert_eq!(
        target("https://CONTOSO.crm.dynamics.com/api/data/v9.2/leads"),
        path("/api/data/v9.2/leads")
    );
    assert_eq!(
        target("http://proxy.local:8080/main/api/data/v9.2/leads"),
        path("/api/data/v9.2/leads")
    );
    for foreign in [
        "https://evil.example/api/data/v9.2/accounts",
        "https://contoso.crm.dynamics.com.evil.example/api/data/v9.2/accounts",
        "https://contoso.crm.dynamics.com:444/api/data/v9.2/accounts",
        "http://proxy.local:8080/other/api/data/v9.2/accounts",
    ] {
        assert!(target(foreign).is_err(), "{foreign}");
    }
}
