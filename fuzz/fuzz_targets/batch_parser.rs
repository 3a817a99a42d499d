//! The strict `$batch` reader: never panics, and what it accepts is
//! consistent: every header line range lies in the body and reads back as
//! `name: value` with CRLF; cutting those lines leaves a body it still reads
//! with the same operations.
#![no_main]

use dataverse_proxy::batch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is the boundary, the rest the body.
    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let Ok(boundary) = std::str::from_utf8(&data[..nl]) else {
        return;
    };
    let body = &data[nl + 1..];
    let content_type = format!("multipart/mixed; boundary={boundary}");
    let Ok(ops) = batch::parse(&content_type, body) else {
        return;
    };
    assert!(ops.len() <= batch::MAX_OPERATIONS);
    let mut lines = Vec::new();
    for op in &ops {
        assert!(matches!(op.method, "GET" | "HEAD" | "POST" | "PATCH" | "PUT" | "DELETE"));
        for h in op.part_headers.iter().chain(&op.headers) {
            let line = &body[h.line.clone()];
            assert!(line.ends_with(b"\r\n"));
            assert!(line.starts_with(h.name.as_bytes()));
            lines.push(h.line.clone());
        }
    }
    lines.sort_by_key(|r| r.start);
    let cut = batch::without_lines(body, &lines);
    let again = batch::parse(&content_type, &cut).expect("a body with header lines cut still reads");
    assert_eq!(again.len(), ops.len());
    for (a, b) in ops.iter().zip(&again) {
        assert_eq!((a.method, a.target), (b.method, b.target));
    }
});
