//! The streaming rewriter under arbitrary chunk splits gives exactly what
//! rewriting the whole body at once gives.
#![no_main]

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use dataverse_proxy::rewrite::Rewriter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&splits, body)) = data.split_first() else {
        return;
    };
    let rewriter = Rewriter::api_prefix(
        &["https://contoso.crm.dynamics.com", "https://contoso.api.crm.dynamics.com"],
        "http://127.0.0.1:8080/main",
    )
    .expect("a rewriter");
    let whole = rewriter.rewrite_all(body).unwrap_or_else(|| body.to_vec());
    // Chunk sizes from the first byte's bits, cycling.
    let mut carry = BytesMut::new();
    let mut out = VecDeque::new();
    let mut at = 0;
    let mut step = 0u32;
    while at < body.len() {
        let size = 1 + ((splits as usize >> (step % 8)) & 0x3f) + (step as usize % 3) * 17;
        let end = (at + size).min(body.len());
        rewriter.feed(&mut carry, Bytes::copy_from_slice(&body[at..end]), &mut out);
        at = end;
        step += 1;
    }
    let mut streamed: Vec<u8> = out.into_iter().flatten().collect();
    streamed.extend_from_slice(&carry);
    assert_eq!(streamed, whole);
});
