//! [`Secret`]: a string that never prints, and the secret files generated once into the data
//! directory (so `tether token` and `tether serve` agree without configuration).

use std::fmt;
use std::path::Path;

/// A secret string (JWT secret, admin token, database URL with password). Its Debug and
/// Display show `<redacted>`, so it cannot leak into a log line or an error.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Read a secret file, or create it with 32 random bytes (hex), readable by the owner only.
pub(super) fn load_or_create(path: &Path) -> std::io::Result<Secret> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(Secret(s));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes: [u8; 32] = rand::random();
    let s = hex::encode(bytes);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &s)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(Secret(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
    }

    #[test]
    fn generated_secrets_are_kept() {
        let dir = std::env::temp_dir().join(format!("tether-cfg-{}", crate::ids::connection_id()));
        let path = dir.join("jwt-secret");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.expose().len(), 64);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
