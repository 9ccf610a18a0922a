//! Tenants and authentication. A token file holds `TENANT TOKEN` lines (blank lines and `#`
//! comments ignored). A presented token is compared against every configured token in constant
//! time (`subtle`), and the whole table is always scanned, so neither the match position nor the
//! common prefix length leaks through timing. Without a token file every connection is its own,
//! anonymous tenant.

use std::path::Path;

use subtle::ConstantTimeEq;

/// Who owns what a connection creates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TenantId {
    /// Authenticated by token: state outlives the connection and is shared by its connections.
    Named(String),
    /// No token file: the connection itself (its id); state dies with the connection.
    Connection(u64),
}

impl TenantId {
    pub fn is_anonymous(&self) -> bool {
        matches!(self, TenantId::Connection(_))
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TenantId::Named(n) => f.write_str(n),
            TenantId::Connection(c) => write!(f, "conn-{c}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("reading token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("token file {path} line {line}: expected `TENANT TOKEN`")]
    Syntax { path: String, line: usize },
    #[error("token file {path}: no tenants")]
    Empty { path: String },
}

/// The configured tenants (or none: anonymous mode).
#[derive(Debug, Default)]
pub struct Auth {
    /// (tenant, token). Empty = anonymous mode.
    entries: Vec<(String, Vec<u8>)>,
}

impl Auth {
    /// Anonymous mode: every connection is its own tenant.
    pub fn anonymous() -> Self {
        Auth { entries: Vec::new() }
    }

    pub fn from_file(path: &Path) -> Result<Self, AuthFileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, AuthFileError> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(tenant), Some(token), None) => entries.push((tenant.to_owned(), token.as_bytes().to_vec())),
                _ => return Err(AuthFileError::Syntax { path: path.to_owned(), line: i + 1 }),
            }
        }
        if entries.is_empty() {
            return Err(AuthFileError::Empty { path: path.to_owned() });
        }
        Ok(Auth { entries })
    }

    pub fn required(&self) -> bool {
        !self.entries.is_empty()
    }

    /// The tenant a token belongs to, or `None`. Scans every entry whatever matches.
    pub fn authenticate(&self, token: &[u8]) -> Option<&str> {
        let mut found: Option<&str> = None;
        for (tenant, expected) in &self.entries {
            // ct_eq on slices of different lengths returns false without early exit on content.
            let eq: bool = expected.as_slice().ct_eq(token).into();
            if eq && found.is_none() {
                found = Some(tenant);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_authenticates() {
        let a = Auth::parse("# tenants\nalice s3cret\n\nbob  hunter2 \n", "t").unwrap();
        assert!(a.required());
        assert_eq!(a.authenticate(b"s3cret"), Some("alice"));
        assert_eq!(a.authenticate(b"hunter2"), Some("bob"));
        assert_eq!(a.authenticate(b"hunter"), None);
        assert_eq!(a.authenticate(b""), None);
    }

    #[test]
    fn bad_lines_are_errors() {
        assert!(Auth::parse("alice\n", "t").is_err());
        assert!(Auth::parse("alice a b\n", "t").is_err());
        assert!(Auth::parse("# only comments\n", "t").is_err());
    }
}
