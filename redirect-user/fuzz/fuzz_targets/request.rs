//! Arbitrary bytes from a client, served as the daemon serves a redirected connection (see
//! `redirect::proxy::fuzzing`). Panics, hangs and malformed answers are the findings.

#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let answer = redirect::proxy::fuzzing::client_sends(input);
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
});
