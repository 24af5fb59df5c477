//! IMDSv2 session tokens without server-side state.
//!
//! A token is `base64(version ‖ expiry ‖ HMAC-SHA256(key, version ‖ expiry))`, 41 bytes, which
//! encodes to 56 characters like the real service's tokens. Validation needs only the key, so
//! any number of PUTs costs no memory, and a restarted daemon (new key) invalidates old tokens
//! as a stopped instance does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
const RAW_LEN: usize = 1 + 8 + MAC_LEN;

/// Shortest and longest token lifetime the service accepts, in seconds.
pub const MIN_TTL: u64 = 1;
pub const MAX_TTL: u64 = 21_600;

pub struct TokenIssuer {
    key: [u8; 32],
}

impl TokenIssuer {
    /// A fresh random key.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the kernel's random source is unavailable");
        TokenIssuer { key }
    }

    pub fn issue(&self, ttl: Duration, now: SystemTime) -> String {
        let expiry = millis(now).saturating_add(ttl.as_millis() as u64);
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..9].copy_from_slice(&expiry.to_be_bytes());
        let mac = self.mac(&raw[..9]);
        raw[9..].copy_from_slice(&mac);
        STANDARD.encode(raw)
    }

    /// True when `token` was issued with this key and has not expired at `now`.
    pub fn is_valid(&self, token: &str, now: SystemTime) -> bool {
        let mut raw = [0u8; RAW_LEN + 2];
        let Ok(RAW_LEN) = STANDARD.decode_slice(token.as_bytes(), &mut raw) else {
            return false;
        };
        if raw[0] != VERSION {
            return false;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&raw[..9]);
        if mac.verify_slice(&raw[9..RAW_LEN]).is_err() {
            return false;
        }
        let expiry = u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes"));
        millis(now) < expiry
    }

    fn mac(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` header value: an integer in
/// [`MIN_TTL`]..=[`MAX_TTL`].
pub fn parse_ttl(value: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(value).ok()?.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = s.parse().ok()?;
    (MIN_TTL..=MAX_TTL)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_validate_until_expiry() {
        let issuer = TokenIssuer::new();
        let now = SystemTime::now();
        let token = issuer.issue(Duration::from_secs(10), now);
        assert_eq!(token.len(), 56);
        assert!(issuer.is_valid(&token, now));
        assert!(issuer.is_valid(&token, now + Duration::from_millis(9_999)));
        assert!(!issuer.is_valid(&token, now + Duration::from_secs(10)));
    }

    #[test]
    fn foreign_and_damaged_tokens_are_rejected() {
        let issuer = TokenIssuer::new();
        let now = SystemTime::now();
        let token = issuer.issue(Duration::from_secs(60), now);
        assert!(!TokenIssuer::new().is_valid(&token, now), "other key");
        let mut bytes = token.clone().into_bytes();
        bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
        assert!(!issuer.is_valid(std::str::from_utf8(&bytes).unwrap(), now));
        for junk in ["", "x", "AAAA", &"A".repeat(56), &"A".repeat(5000), "%%%%"] {
            assert!(!issuer.is_valid(junk, now), "{junk:?}");
        }
    }

    #[test]
    fn ttl_header_bounds() {
        assert_eq!(parse_ttl(b"1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_ttl(b"21600"), Some(Duration::from_secs(21_600)));
        for bad in [
            &b"0"[..],
            b"21601",
            b"-5",
            b"",
            b"abc",
            b"1.5",
            b"99999999999999999999999",
            b" ",
        ] {
            assert_eq!(parse_ttl(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
