//! The path guard: whatever it accepts stays under the Web API once
//! decoded, uses only RFC 3986 escapes, and never panics.
#![no_main]

use dataverse_proxy::guard as path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tail) = std::str::from_utf8(data) else {
        return;
    };
    let target = format!("/api/data/v9.2/{tail}");
    if path::check(&target).is_err() {
        return;
    }
    assert!(path::percent_encodings_are_valid(target.as_bytes()), "{target}");
    let decoded = percent_encoding::percent_decode_str(&target).decode_utf8_lossy();
    assert!(decoded.starts_with("/api/data/v9.2/"), "{target}");
    assert!(!decoded.split('/').any(|s| s.starts_with('.')), "{target}");
    assert!(!decoded.contains('\\'), "{target}");
    assert_eq!(decoded.split('/').count(), target.split('/').count(), "encoded slash in {target}");
    assert!(!decoded.chars().any(char::is_control), "{target}");
});
