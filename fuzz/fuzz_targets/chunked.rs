//! The incremental chunked decoder: fed in two parts the way `read_chunked` does (keep the unconsumed tail,
//! append what arrives next, feed again) it must agree with feeding everything at once.
#![no_main]

use azure_proxy::http::body::ChunkedDecoder;
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches the limit.
const MAX: u64 = 4096;

#[derive(Debug, PartialEq)]
enum Outcome {
    Err,
    /// Body, bytes consumed in total, done.
    Ok(Vec<u8>, usize, bool),
}

/// Feeds `parts` in order as a caller would: the unconsumed tail is kept and the next part appended to it.
fn decode(parts: &[&[u8]]) -> Outcome {
    let mut dec = ChunkedDecoder::new(MAX);
    let mut buf: Vec<u8> = Vec::new();
    let mut consumed = 0;
    for part in parts {
        buf.extend_from_slice(part);
        match dec.feed(&buf) {
            Err(_) => return Outcome::Err,
            Ok(used) => {
                assert!(used <= buf.len(), "feed used {used} of {} bytes", buf.len());
                buf.drain(..used);
                consumed += used;
            }
        }
        if dec.is_done() {
            break;
        }
    }
    let done = dec.is_done();
    let body = dec.into_body();
    assert!(body.len() as u64 <= MAX, "body {} > max {MAX}", body.len());
    Outcome::Ok(body, consumed, done)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let at = if input.is_empty() { 0 } else { usize::from(split) % (input.len() + 1) };
    let whole = decode(&[input]);
    if let Outcome::Ok(_, consumed, _) = &whole {
        assert!(*consumed <= input.len());
    }
    let (a, b) = input.split_at(at);
    let two = decode(&[a, b]);
    assert_eq!(whole, two, "split at {at} changes the outcome");
    // One byte at a time: the hardest split of all (bounded, to keep executions fast).
    if input.len() <= 512 {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(whole, decode(&bytes), "byte-at-a-time feeding changes the outcome");
    }
});
