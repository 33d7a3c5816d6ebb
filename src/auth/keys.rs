//! API key format: `tg_` followed by 32 base62 characters (~190 bits of entropy). Only the
//! SHA-256 of a key is stored; the first characters are kept for display.

use rand::Rng;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const KEY_PREFIX: &str = "tg_";
const KEY_RANDOM_CHARS: usize = 32;
/// Characters of the key kept for display (`tg_` + 8).
const DISPLAY_CHARS: usize = 11;

pub type KeyHash = [u8; 32];

fn random_base62(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// A fresh key: (plaintext, display prefix, hash).
pub fn generate() -> (String, String, KeyHash) {
    let key = format!("{KEY_PREFIX}{}", random_base62(KEY_RANDOM_CHARS));
    let prefix = key[..DISPLAY_CHARS].to_string();
    let hash = hash(&key);
    (key, prefix, hash)
}

/// A fresh key id (`key_` + 16 base62).
pub fn new_key_id() -> String {
    format!("key_{}", random_base62(16))
}

pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Cheap shape check before any lookup, so junk never reaches the cache or Postgres.
pub fn looks_like_key(candidate: &str) -> bool {
    candidate.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS
        && candidate.starts_with(KEY_PREFIX)
        && candidate[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_well_formed_and_distinct() {
        let (a, prefix, h) = generate();
        let (b, _, _) = generate();
        assert_ne!(a, b);
        assert!(looks_like_key(&a));
        assert!(a.starts_with(&prefix));
        assert_eq!(prefix.len(), 11);
        assert_eq!(h, hash(&a));
        assert!(!looks_like_key("tg_short"));
        assert!(!looks_like_key(&a.replace("tg_", "xx_")));
    }
}
