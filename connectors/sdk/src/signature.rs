//! Signed webhook requests: `Tributary-Signature: t=<unix seconds>,v1=<hex>`,
//! where `<hex>` is the HMAC-SHA256 of `"<t>.<body>"` under a shared secret.
//! The receiver recomputes it and rejects an old `t` (replays). Used by the
//! webhook CRM sink and by webhook alerts.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Tributary-Signature";

/// Shorter secrets are refused: they can be guessed.
pub const MIN_SECRET_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("a signing secret must be at least {MIN_SECRET_BYTES} bytes long")]
pub struct ShortSecret;

/// Signs bodies with one secret. `Debug` never shows it.
#[derive(Clone)]
pub struct Signer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

impl Signer {
    pub fn new(secret: &SecretString) -> Result<Signer, ShortSecret> {
        let secret = secret.expose_secret().as_bytes();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ShortSecret);
        }
        Ok(Signer { mac: Hmac::<Sha256>::new_from_slice(secret).map_err(|_| ShortSecret)? })
    }

    /// The header value for `body` sent at `timestamp` (unix seconds).
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_the_documented_hmac_and_short_secrets_are_refused() {
        let signer = Signer::new(&SecretString::from("0123456789abcdef")).unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"0123456789abcdef").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let expected = format!("t=1700000000,v1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signer.sign(1_700_000_000, b"{\"a\":1}"), expected);
        assert_ne!(signer.sign(1_700_000_001, b"{\"a\":1}"), expected, "the time is signed");
        assert!(Signer::new(&SecretString::from("short")).is_err());
        assert!(!format!("{signer:?}").contains("0123"));
    }
}
