//! Per-task, per-attempt callback tokens (docs/contracts.md §5).
//!
//! A GPU endpoint learns where to report completion from the `callback_url` in its request: the
//! configured public URL plus `attempt=N&token=T`, where `T` is an HMAC-SHA256 of the task id and the
//! attempt under the callback secret. The callback server recomputes it from the body's `task_id` and
//! the query's `attempt`; without the secret nobody can forge a token, and a token for attempt 1 does
//! not authorise a report about attempt 2. Pure functions, used by the dispatch and callback threads.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks callback tokens; holds the secret and the public callback URL.
#[derive(Clone)]
pub struct Signer {
    secret: Secret,
    public_url: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(secret: Secret, public_url: impl Into<String>) -> Signer {
        Signer {
            secret,
            public_url: public_url.into(),
        }
    }

    fn mac(&self, task_id: &str, attempt: u32) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.secret.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        // The length prefix keeps ("a1", 2) and ("a", 12) apart.
        mac.update(&(task_id.len() as u64).to_be_bytes());
        mac.update(task_id.as_bytes());
        mac.update(&attempt.to_be_bytes());
        mac
    }

    /// The hex token for one attempt of one task.
    pub fn token(&self, task_id: &str, attempt: u32) -> String {
        hex(&self.mac(task_id, attempt).finalize().into_bytes())
    }

    /// True when `token` is the one [`Signer::token`] makes; compares in constant time.
    pub(crate) fn verify(&self, task_id: &str, attempt: u32, token: &str) -> bool {
        let Some(bytes) = unhex(token) else {
            return false;
        };
        self.mac(task_id, attempt).verify_slice(&bytes).is_ok()
    }

    /// The URL a GPU endpoint calls back for this attempt.
    pub fn callback_url(&self, task_id: &str, attempt: u32) -> String {
        let sep = if self.public_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}attempt={attempt}&token={}",
            self.public_url,
            self.token(task_id, attempt)
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(
            Secret::new("0123456789abcdef"),
            "http://10.0.0.5:8000/callback",
        )
    }

    #[test]
    fn token_binds_task_and_attempt() {
        let s = signer();
        let t = s.token("task-1", 1);
        assert_eq!(t.len(), 64);
        assert!(s.verify("task-1", 1, &t));
        assert!(!s.verify("task-1", 2, &t));
        assert!(!s.verify("task-2", 1, &t));
        assert!(!s.verify("task-1", 1, &t.to_uppercase().replace('A', "B")));
        assert!(!s.verify("task-1", 1, ""));
        assert!(!s.verify("task-1", 1, "zz"));
        assert!(!s.verify("task-1", 1, "é"));
        assert_ne!(s.token("a1", 2), s.token("a", 12));
        let other = Signer::new(Secret::new("another-secret-value"), "http://x/");
        assert!(!other.verify("task-1", 1, &t));
    }

    #[test]
    fn callback_url_appends_query() {
        let s = signer();
        let u = s.callback_url("t", 3);
        assert!(
            u.starts_with("http://10.0.0.5:8000/callback?attempt=3&token="),
            "{u}"
        );
        let q = Signer::new(Secret::new("0123456789abcdef"), "http://h/cb?x=1");
        assert!(q
            .callback_url("t", 1)
            .starts_with("http://h/cb?x=1&attempt=1&token="));
    }

    #[test]
    fn debug_hides_secret() {
        assert!(!format!("{:?}", signer()).contains("0123456789abcdef"));
    }
}
