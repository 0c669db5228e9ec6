//! x25519 static keys in WireGuard's format: 32 bytes, standard base64 with padding
//! (44 characters), as `wg genkey` / `wg pubkey` print them.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand_core::OsRng;
use std::fmt;
use std::str::FromStr;

/// An x25519 static private key. Debug never prints the key; it is zeroed on drop.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

/// An x25519 public key. Display and serde: base64.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

/// Why a string is not a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64 (expected 44 characters like `wg genkey` prints)")]
    Base64,
    #[error("key must be 32 bytes, found {0}")]
    Length(usize),
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

impl PrivateKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> PrivateKey {
        PrivateKey(x25519_dalek::StaticSecret::random_from_rng(OsRng))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> PrivateKey {
        PrivateKey(x25519_dalek::StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// Parses exactly one base64 key; callers trim file contents first.
    pub fn from_base64(s: &str) -> Result<PrivateKey, KeyError> {
        decode32(s).map(PrivateKey::from_bytes)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }

    pub fn from_base64(s: &str) -> Result<PublicKey, KeyError> {
        decode32(s).map(PublicKey)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for PublicKey {
    fn from(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::from_base64(s)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PublicKey::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        let k = PrivateKey::generate();
        let s = k.to_base64();
        assert_eq!(s.len(), 44);
        let k2 = PrivateKey::from_base64(&s).unwrap();
        assert_eq!(k2.as_bytes(), k.as_bytes());
        assert_eq!(k2.public_key(), k.public_key());
        let p = k.public_key();
        assert_eq!(PublicKey::from_base64(&p.to_string()).unwrap(), p);
        assert_ne!(PrivateKey::generate().as_bytes(), k.as_bytes());
    }

    #[test]
    fn matches_wireguard_vector() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let sk = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
        let pk = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
        let mut b = [0u8; 32];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&sk[2 * i..2 * i + 2], 16).unwrap();
        }
        let hex: String = PrivateKey::from_bytes(b)
            .public_key()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, pk);
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(PublicKey::from_base64("not base64!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert!(PrivateKey::from_base64(&STANDARD.encode([0u8; 33])).is_err());
        // Surrounding whitespace is the caller's job.
        let k = PrivateKey::generate().to_base64();
        assert!(PrivateKey::from_base64(&format!("{k}\n")).is_err());
    }

    #[test]
    fn debug_hides_private_key() {
        let k = PrivateKey::generate();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&k.to_base64()));
        assert!(dbg.contains(&k.public_key().to_base64()));
    }

    #[test]
    fn serde_as_base64() {
        let p = PrivateKey::generate().public_key();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"{p}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), p);
        assert!(serde_json::from_str::<PublicKey>("\"AAAA\"").is_err());
    }
}
