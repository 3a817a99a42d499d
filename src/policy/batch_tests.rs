//! The `$batch` check: the policy inside every operation, guarded headers
//! cut from parts, and refused batches that stay refused whatever a caller
//! does to their bytes.

use proptest::prelude::*;

use super::*;

const ORIGINS: [&str; 2] = ["https://contoso.crm.dynamics.com", "http://127.0.0.1:8080"];

fn origins() -> Vec<String> {
    ORIGINS.iter().map(|o| (*o).to_owned()).collect()
}

fn ctx<'a>(origins: &'a [String], caller_privileged: Option<&'a [String]>) -> BatchContext<'a> {
    BatchContext {
        service_root: "/api/data/v9.2",
        origins,
        caller_read_only: false,
        caller_privileged,
        tables: None,
    }
}

const CT: &str = "multipart/mixed; boundary=batch_1";

/// A batch of operations, each `(part headers, request head, body)`, CRLF.
fn batch(ops: &[(&str, &str, &str)]) -> Vec<u8> {
    let mut out = String::new();
    for (part_headers, head, body) in ops {
        out.push_str(
            "--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n",
        );
        out.push_str(part_headers);
        out.push_str("\r\n");
        out.push_str(head);
        out.push_str("\r\n\r\n");
        out.push_str(body);
        out.push_str("\r\n");
    }
    out.push_str("--batch_1--\r\n");
    out.into_bytes()
}

fn check(policy: &Policy, body: &[u8]) -> Result<Option<Vec<u8>>, PolicyError> {
    policy.check_batch(Some(CT), body, &ctx(&origins(), None))
}

#[test]
fn a_plain_batch_passes_untouched() {
    let body = batch(&[
        ("", "GET /api/data/v9.2/accounts?$select=name HTTP/1.1", ""),
        (
            "Content-ID: 1\r\n",
            "POST https://contoso.crm.dynamics.com/api/data/v9.2/contacts HTTP/1.1\r\nContent-Type: application/json",
            "{}",
        ),
        (
            "",
            "GET http://127.0.0.1:8080/api/data/v9.2/WhoAmI HTTP/1.1",
            "",
        ),
    ]);
    assert!(matches!(check(&Policy::default(), &body), Ok(None)));
}

#[test]
fn privileged_and_identity_headers_are_cut_from_parts() {
    let body = batch(&[(
        "Content-Length: 999\r\nCallerObjectId: 00000000-0000-0000-0000-0000000000aa\r\n",
        "POST /api/data/v9.2/contacts HTTP/1.1\r\nmscrm.BYPASSCustomPluginExecution: true\r\nMSCRM.BypassBusinessLogicExecution: CustomSync\r\n\
         MSCRM.SuppressCallbackRegistrationExpanderJob: true\r\nMSCRMCallerID: 00000000-0000-0000-0000-0000000000bb\r\n\
         Authorization: Bearer stolen\r\nCookie: ARRAffinity=1\r\nPrefer: return=representation\r\nContent-Type: application/json",
        "{}",
    )]);
    let cut = check(&Policy::default(), &body)
        .expect("allowed")
        .expect("cut");
    let text = String::from_utf8(cut.clone()).expect("utf8");
    for gone in [
        "bypass",
        "suppresscallback",
        "callerid",
        "callerobjectid",
        "authorization",
        "cookie",
        "content-length",
    ] {
        assert!(
            !text.to_ascii_lowercase().contains(gone),
            "{gone} left in {text}"
        );
    }
    assert!(
        text.contains("Prefer: return=representation\r\nContent-Type: application/json\r\n\r\n{}"),
        "{text}"
    );
    // What is left is still a batch the strict reader reads.
    assert_eq!(crate::batch::parse(CT, &cut).expect("parses").len(), 1);
}

#[test]
fn the_policy_and_the_caller_can_let_privileged_headers_through() {
    let body = batch(&[(
        "",
        "POST /api/data/v9.2/contacts HTTP/1.1\r\nMSCRM.BypassCustomPluginExecution: true\r\nContent-Type: application/json",
        "{}",
    )]);
    let policy = Policy {
        privileged: vec!["mscrm.bypasscustompluginexecution".to_owned()],
        ..Policy::default()
    };
    let o = origins();
    assert!(
        matches!(
            policy.check_batch(Some(CT), &body, &ctx(&o, None)),
            Ok(None)
        ),
        "org policy alone"
    );
    let granted = ["mscrm.bypasscustompluginexecution".to_owned()];
    assert!(
        matches!(
            policy.check_batch(Some(CT), &body, &ctx(&o, Some(&granted))),
            Ok(None)
        ),
        "caller granted"
    );
    assert!(
        matches!(
            policy.check_batch(Some(CT), &body, &ctx(&o, Some(&[]))),
            Ok(Some(_))
        ),
        "callers configured, this one not granted: cut"
    );
    assert!(
        matches!(check(&Policy::default(), &body), Ok(Some(_))),
        "caller granted, org not: cut"
    );
}

#[test]
fn impersonation_in_parts_follows_the_impersonation_rule() {
    let id = "00000000-0000-0000-0000-0000000000aa";
    let body = batch(&[(
        "",
        &format!("GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nCallerObjectId: {id}"),
        "",
    )]);
    let only = Policy {
        impersonation: Impersonation::Only(vec![id.to_owned()]),
        ..Policy::default()
    };
    assert!(matches!(check(&only, &body), Ok(None)));
    let other = Policy {
        impersonation: Impersonation::Only(vec!["00000000-0000-0000-0000-000000000001".to_owned()]),
        ..Policy::default()
    };
    assert!(matches!(check(&other, &body), Ok(Some(_))));
}

#[test]
fn operations_outside_the_web_api_are_refused() {
    for target in [
        "/XRMServices/2011/Organization.svc",
        "/api/data/v8.2/accounts",
        "/api/data/v9.2/../../XRMServices/2011/Organization.svc",
        "/api/data/v9.2/%u002e%u002e/x",
        "/api/data/v9.2/accounts?$filter=contains(name,'%')",
        "https://evil.example/api/data/v9.2/accounts",
        "https://contoso.crm.dynamics.com/api/data/v8.0/accounts",
        "%2e%2e/%2e%2e/XRMServices",
        "$batch",
    ] {
        let head = format!("GET {target} HTTP/1.1");
        let body = batch(&[("", &head, "")]);
        match check(&Policy::default(), &body) {
            Err(PolicyError::BadBatch(_)) => {}
            other => panic!("{target}: {other:?}"),
        }
    }
}

#[test]
fn unreadable_batches_are_refused_when_anything_needs_checking() {
    let lf_only = b"--batch_1\nContent-Type: application/http\n\nGET /api/data/v9.2/accounts HTTP/1.1\n\n\n--batch_1--\n";
    // Nothing restricted and nothing to cut: forwarded as sent.
    assert!(matches!(check(&Policy::default(), lf_only), Ok(None)));
    let read_only = Policy {
        read_only: true,
        ..Policy::default()
    };
    assert!(matches!(
        check(&read_only, lf_only),
        Err(PolicyError::BadBatch(_))
    ));
    // A guarded header that cannot be cut exactly: refused.
    let with_bypass = b"--batch_1\nContent-Type: application/http\n\nPOST /api/data/v9.2/accounts HTTP/1.1\nMSCRM.BypassCustomPluginExecution: true\n\n{}\n--batch_1--\n";
    assert!(matches!(
        check(&Policy::default(), with_bypass),
        Err(PolicyError::BadBatch(_))
    ));
}

/// A batch the policy refuses: a read, then a DELETE on a denied table.
fn refused_batch() -> Vec<u8> {
    batch(&[
        ("", "GET /api/data/v9.2/contacts?$top=1 HTTP/1.1", ""),
        (
            "Content-ID: 7\r\n",
            "DELETE /api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001) HTTP/1.1",
            "",
        ),
    ])
}

fn deny_accounts() -> Policy {
    Policy {
        deny: vec!["accounts".to_owned()],
        ..Policy::default()
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Insert a line end (CRLF, LF or CR) at a position (modulo the length).
    Break(usize, u8),
    /// Flip the letter case of the byte at a position.
    Case(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..3).prop_map(|(at, kind)| Mutation::Break(at, kind)),
        any::<usize>().prop_map(Mutation::Case),
    ]
}

fn apply(body: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Break(at, kind) => {
            let at = at % (body.len() + 1);
            let end: &[u8] = match kind {
                0 => b"\r\n",
                1 => b"\n",
                _ => b"\r",
            };
            body.splice(at..at, end.iter().copied());
        }
        Mutation::Case(at) => {
            let at = at % body.len();
            let b = body[at];
            body[at] = if b.is_ascii_lowercase() {
                b.to_ascii_uppercase()
            } else {
                b.to_ascii_lowercase()
            };
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// Line breaks and case changes anywhere never turn a refused batch into
    /// an allowed one: it stays denied (403) or becomes unreadable (400).
    #[test]
    fn refused_batches_stay_refused(mutations in proptest::collection::vec(mutation(), 1..4)) {
        let policy = deny_accounts();
        let mut body = refused_batch();
        prop_assert!(matches!(check(&policy, &body), Err(PolicyError::Denied(_))));
        for m in &mutations {
            apply(&mut body, m);
        }
        let result = check(&policy, &body);
        prop_assert!(
            matches!(result, Err(PolicyError::Denied(_) | PolicyError::BadBatch(_))),
            "{:?} let through {:?}", result.map(|_| ()), String::from_utf8_lossy(&body)
        );
    }
}

/// With the org's tables known, a part that reaches a denied table through
/// `$expand`, a navigation, a binding or a reference is refused.
#[test]
fn parts_reaching_a_denied_table_are_refused() {
    let map =
        crate::policy::tables::TableMap::from_csdl(crate::policy::tables::TEST_CSDL).expect("csdl");
    let policy = Policy {
        deny: vec!["contacts".to_owned()],
        ..Policy::default()
    };
    let origins = origins();
    let ctx = BatchContext {
        tables: Some(&map),
        ..ctx(&origins, None)
    };
    let part = |line: &str, body: &str| {
        let head = if body.is_empty() {
            String::new()
        } else {
            "Content-Type: application/json\r\n".to_owned()
        };
        format!(
            "--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{line} HTTP/1.1\r\n{head}\r\n{body}\r\n--batch_1--\r\n"
        )
    };
    let ok = part("GET /api/data/v9.2/accounts?$select=name", "");
    assert!(policy.check_batch(Some(CT), ok.as_bytes(), &ctx).is_ok());
    for (line, body) in [
        ("GET /api/data/v9.2/accounts?$expand=primarycontactid", ""),
        ("GET /api/data/v9.2/accounts(1)/primarycontactid", ""),
        (
            "PATCH /api/data/v9.2/accounts(1)",
            "{\"primarycontactid@odata.bind\":\"/contacts(2)\"}",
        ),
    ] {
        let batch = part(line, body);
        let err = policy
            .check_batch(Some(CT), batch.as_bytes(), &ctx)
            .expect_err(line);
        assert!(err.to_string().contains("contacts"), "{line}: {err}");
    }
}
