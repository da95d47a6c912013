//! Secret strings (tokens, passwords, HMAC keys), below every module that holds one: the config
//! reads them, the callback signer and the HTTP client use them, nothing prints them.

use std::fmt;

/// A secret string (token, password, HMAC key). Its `Debug` never prints the value, so a config dump
/// or a panic message cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
