//! The shared token agents and clients present.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const TOKEN_ENV: &str = "BUILDPOOL_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot create token file {0}: {1}")]
    Create(PathBuf, std::io::Error),
    #[error("token file {0} is empty")]
    Empty(PathBuf),
}

/// Where the token lives unless configured: `$XDG_CONFIG_HOME/buildpool/token`.
pub fn default_token_file() -> PathBuf {
    config_home().join("buildpool").join("token")
}

pub fn config_home() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// A fresh random token: 32 bytes from the kernel, hex encoded.
pub fn generate() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token and where it came from.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: String,
    /// `None` when it came from the environment.
    pub file: Option<PathBuf>,
    pub generated: bool,
}

/// Reads the token from `BUILDPOOL_TOKEN` or `file`; creates the file (mode 0600) with a new
/// token if it does not exist and `create` is set.
pub fn load(file: &Path, create: bool) -> Result<Token, TokenError> {
    if let Ok(value) = std::env::var(TOKEN_ENV)
        && !value.trim().is_empty()
    {
        return Ok(Token {
            value: value.trim().to_owned(),
            file: None,
            generated: false,
        });
    }
    match std::fs::read_to_string(file) {
        Ok(text) if text.trim().is_empty() => Err(TokenError::Empty(file.to_owned())),
        Ok(text) => Ok(Token {
            value: text.trim().to_owned(),
            file: Some(file.to_owned()),
            generated: false,
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && create => {
            let value = generate().map_err(|e| TokenError::Create(file.to_owned(), e))?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| TokenError::Create(file.to_owned(), e))?;
            }
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .map_err(|e| TokenError::Create(file.to_owned(), e))?;
            writeln!(out, "{value}").map_err(|e| TokenError::Create(file.to_owned(), e))?;
            Ok(Token {
                value,
                file: Some(file.to_owned()),
                generated: true,
            })
        }
        Err(error) => Err(TokenError::Read(file.to_owned(), error)),
    }
}

/// Compares tokens in time independent of where they differ.
pub fn matches(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    let mut difference = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        difference |=
            usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reads_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/token");
        let first = load(&path, true).expect("generated");
        assert!(first.generated);
        assert_eq!(first.value.len(), 64);
        let mode = std::fs::metadata(&path).expect("exists").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let second = load(&path, true).expect("read");
        assert!(!second.generated);
        assert_eq!(first.value, second.value);
        assert!(load(&dir.path().join("missing"), false).is_err());
    }

    #[test]
    fn comparison_is_exact() {
        assert!(matches("abc", "abc"));
        assert!(!matches("abc", "abd"));
        assert!(!matches("abc", "ab"));
        assert!(!matches("abc", "abcd"));
        assert!(!matches("abc", ""));
    }
}
