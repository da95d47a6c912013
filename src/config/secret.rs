//! Secrets (tokens, passwords, HMAC keys): given inline or in a file, and never printed.

use std::path::{Path, PathBuf};

use super::{invalid, ConfigError};
use crate::secret::Secret;

/// A secret given inline or in a file; both at once is ambiguous and refused.
pub(super) fn read_secret(
    key: &str,
    inline: Option<String>,
    file: Option<&PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(f)) => Err(invalid(
            format!("{key}_file"),
            f.display(),
            format!("set either {key} or {key}_file, not both"),
        )),
        (Some(s), None) if s.is_empty() => Err(invalid(key, "", "must not be empty")),
        (Some(s), None) => Ok(Some(Secret::new(s))),
        (None, Some(f)) => read_secret_file(&format!("{key}_file"), f).map(Some),
        (None, None) => Ok(None),
    }
}

/// The secret in the file at `key` (one trailing newline dropped); empty is refused.
pub(super) fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    // A secret is a line; 64 KiB is room for any key, and bounds a path to a device.
    let text = super::read_capped(path, 64 << 10)
        .map_err(|e| invalid(key, path.display(), format!("cannot read: {e}")))?;
    let s = text.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        return Err(invalid(key, path.display(), "file is empty"));
    }
    Ok(Secret::new(s))
}
