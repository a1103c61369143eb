//! Secrets are never written in a config file: they are referenced there as
//! `{ env = "NAME" }` or `{ file = "/path" }` (systemd credentials live in
//! `$CREDENTIALS_DIRECTORY`) and resolved when a component is built.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Where a secret comes from. Debug and Display never show the value,
/// because this type never holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretRef {
    /// The name of an environment variable holding the secret.
    Env(String),
    /// A file holding the secret (one trailing newline is dropped).
    /// A relative path is looked up in `$CREDENTIALS_DIRECTORY` when set.
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable `{0}` is not set or is empty")]
    MissingEnv(String),
    #[error("cannot read secret file `{path}`: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret file `{0}` is empty")]
    EmptyFile(PathBuf),
}

impl SecretRef {
    pub fn resolve(&self) -> Result<SecretString, SecretError> {
        match self {
            SecretRef::Env(name) => match std::env::var(name) {
                Ok(value) if !value.trim().is_empty() => Ok(SecretString::from(value)),
                _ => Err(SecretError::MissingEnv(name.clone())),
            },
            SecretRef::File(path) => {
                let path = match std::env::var_os("CREDENTIALS_DIRECTORY") {
                    Some(dir) if path.is_relative() => PathBuf::from(dir).join(path),
                    _ => path.clone(),
                };
                let value = std::fs::read_to_string(&path)
                    .map_err(|source| SecretError::File { path: path.clone(), source })?;
                let value = value.strip_suffix('\n').unwrap_or(&value);
                let value = value.strip_suffix('\r').unwrap_or(value);
                if value.is_empty() {
                    return Err(SecretError::EmptyFile(path));
                }
                Ok(SecretString::from(value.to_owned()))
            }
        }
    }
}

/// `text` with every occurrence of each secret replaced by `[redacted]`,
/// longest first (a secret may contain another). Values shorter than four
/// characters are left alone: they would redact ordinary words.
pub fn redact<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    let mut secrets: Vec<&str> = secrets.into_iter().filter(|secret| secret.len() >= 4).collect();
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    let mut text = text.to_owned();
    for secret in secrets {
        if text.contains(secret) {
            text = text.replace(secret, "[redacted]");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn file_secret_drops_one_trailing_newline_and_errors_name_the_path_only() {
        let dir = std::env::temp_dir().join(format!("tributary-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        let secret = SecretRef::File(path.clone()).resolve().unwrap();
        assert_eq!(secret.expose_secret(), "s3cr3t");

        let missing = SecretRef::File(dir.join("nope")).resolve().unwrap_err();
        assert!(missing.to_string().contains("nope"));
        let env = SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into()).resolve().unwrap_err();
        assert!(env.to_string().contains("TRIBUTARY_TEST_SURELY_UNSET"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn redaction_replaces_the_longest_secret_first_and_leaves_short_values() {
        let text = "token abcdef123456 and abcdef in https://x/abcdef123456?k=abc";
        assert_eq!(
            redact(text, ["abcdef", "abcdef123456", "abc"]),
            "token [redacted] and [redacted] in https://x/[redacted]?k=abc"
        );
        assert_eq!(redact("nothing here", ["secret"]), "nothing here");
    }
}
