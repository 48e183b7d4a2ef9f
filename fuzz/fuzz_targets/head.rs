//! Request-head parsing: `parse_head` on arbitrary bytes, then everything the front end does with a parsed head.
#![no_main]

use azure_proxy::http::parse::{parse_head, Framing};
use azure_proxy::http::target;
use libfuzzer_sys::fuzz_target;

const MAX_BYTES: usize = 8192;
const MAX_HEADERS: usize = 32;

fuzz_target!(|data: &[u8]| {
    // Tight limits as well, so that the size and count checks are hit without huge inputs.
    if let Ok(Some(small)) = parse_head(data, 64, 2) {
        assert!(small.len <= 64 && small.len <= data.len() && small.headers.len() <= 2);
    }
    let Ok(Some(head)) = parse_head(data, MAX_BYTES, MAX_HEADERS) else {
        return;
    };
    assert!(head.len <= data.len(), "head.len {} > input {}", head.len, data.len());
    assert!(head.len <= MAX_BYTES, "head.len {} > max_bytes {MAX_BYTES}", head.len);
    assert!(head.headers.len() <= MAX_HEADERS);
    assert!(head.minor_version <= 1, "minor_version {}", head.minor_version);
    for (name, _) in &head.headers {
        assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "header name not lowercased: {name:?}");
    }
    let _ = Framing::of(&head, 1 << 20);
    let _ = head.wants_keep_alive();
    let path = head.path();
    assert!(head.target.starts_with(path));
    let _ = head.check_host();
    if target::check(&head.target).is_ok() {
        assert!(head.target.starts_with('/') && !head.target.starts_with("//"));
        assert!(!path.split('/').any(|seg| seg == ".." || seg == "."));
        assert!(!path.contains('\\') && !path.contains(';'));
    }
    // A head must parse the same with whatever follows it (a body, a pipelined request).
    let again = parse_head(&data[..head.len], MAX_BYTES, MAX_HEADERS);
    match again {
        Ok(Some(h)) => assert_eq!((h.len, &h.method, &h.target), (head.len, &head.method, &head.target)),
        other => panic!("the head alone parses differently: {other:?}"),
    }
});
