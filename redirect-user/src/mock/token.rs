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

/// The key tokens are signed with. Kept in the daemon's state directory (`token.key`, mode
/// 0600), so that tokens issued before a restart stay valid after it; the state directory is
/// a tmpfs (`/run/redirect`), so a reboot invalidates them, as stopping an instance does.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the kernel's random source is unavailable");
        TokenKey(key)
    }

    /// The key in `path`, or a new one written there (mode 0600). A file that is not a key
    /// (another size) or that others may read is replaced, and said so.
    pub fn load_or_create(path: &std::path::Path) -> std::io::Result<Self> {
        use std::{
            io::Write as _, os::unix::fs::OpenOptionsExt as _, os::unix::fs::PermissionsExt as _,
        };
        if let Ok(meta) = std::fs::metadata(path) {
            let private = meta.permissions().mode() & 0o077 == 0;
            match std::fs::read(path) {
                Ok(bytes) if private && bytes.len() == 32 => {
                    let mut key = [0u8; 32];
                    key.copy_from_slice(&bytes);
                    return Ok(TokenKey(key));
                }
                _ => {
                    tracing::warn!(
                        "{} is not a private 32-byte token key; replacing it (IMDSv2 tokens issued before are invalid)",
                        path.display()
                    );
                    std::fs::remove_file(path)?;
                }
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let key = TokenKey::random();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(&key.0)?;
        Ok(key)
    }
}

impl TokenIssuer {
    pub fn with_key(key: &TokenKey) -> Self {
        TokenIssuer { key: key.0 }
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
        let issuer = TokenIssuer::with_key(&TokenKey::random());
        let now = SystemTime::now();
        let token = issuer.issue(Duration::from_secs(10), now);
        assert_eq!(token.len(), 56);
        assert!(issuer.is_valid(&token, now));
        assert!(issuer.is_valid(&token, now + Duration::from_millis(9_999)));
        assert!(!issuer.is_valid(&token, now + Duration::from_secs(10)));
    }

    #[test]
    fn foreign_and_damaged_tokens_are_rejected() {
        let issuer = TokenIssuer::with_key(&TokenKey::random());
        let now = SystemTime::now();
        let token = issuer.issue(Duration::from_secs(60), now);
        assert!(
            !TokenIssuer::with_key(&TokenKey::random()).is_valid(&token, now),
            "other key"
        );
        let mut bytes = token.clone().into_bytes();
        bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
        assert!(!issuer.is_valid(std::str::from_utf8(&bytes).unwrap(), now));
        for junk in ["", "x", "AAAA", &"A".repeat(56), &"A".repeat(5000), "%%%%"] {
            assert!(!issuer.is_valid(junk, now), "{junk:?}");
        }
    }

    #[test]
    fn the_key_survives_a_restart_and_stays_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/token.key");
        let now = SystemTime::now();
        let token = TokenIssuer::with_key(&TokenKey::load_or_create(&path).unwrap())
            .issue(Duration::from_secs(60), now);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = TokenIssuer::with_key(&TokenKey::load_or_create(&path).unwrap());
        assert!(again.is_valid(&token, now), "the same key after a restart");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let replaced = TokenIssuer::with_key(&TokenKey::load_or_create(&path).unwrap());
        assert!(
            !replaced.is_valid(&token, now),
            "a key others could read is not used"
        );
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
