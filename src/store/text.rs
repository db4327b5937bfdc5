//! Bounded, storable text: what a KCI's values become where a length or a character would break
//! something downstream (design.md, "No poison").
//!
//! The raw body of every KCI is kept byte for byte. Derived values go where limits apply:
//! - PostgreSQL refuses U+0000 in `text` and `jsonb` (SQLite stores it, but then compares
//!   differently), so a NUL becomes U+FFFD (the replacement character) everywhere but the raw body
//!   and the published KCI;
//! - a btree index entry is at most ~2.7 KB, a routing key and an AMQP short string at most 255
//!   bytes, and an AMQP header table must fit in one frame, so values that go into an indexed
//!   column, a routing key or a header are bounded.
//!
//! A value over its bound keeps its beginning (cut on a character boundary) and ends with `~` and
//! 16 hexadecimal digits of the SHA-256 of the whole value: two different long values stay
//! different, the same value always gives the same bounded form, and a person can still read it.

use std::borrow::Cow;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Statuses, reasons, update types and supplier references in the database (bytes).
pub const COLUMN_TEXT_MAX: usize = 200;
/// Each word of a routing key (bytes): `kci.` + entity type (at most 50) + update type (at most
/// 15) + reason stays under AMQP's 255.
pub const ROUTING_WORD_MAX: usize = 120;
/// Each AMQP header value (bytes).
pub const HEADER_VALUE_MAX: usize = 255;
/// Correlation headers of rejected requests, as kept in the audit log (bytes); accepted ones are
/// validated to at most 255 characters at the edge.
pub const AUDIT_ID_MAX: usize = 255;
/// The note of a history entry (bytes).
pub const NOTE_MAX: usize = 4096;

/// The length of the suffix: `~` and 16 hexadecimal digits.
const SUFFIX_LEN: usize = 17;

/// `value` with NUL replaced and, when longer than `max_bytes`, cut and suffixed with its hash.
/// `max_bytes` must leave room for the suffix (at least 18).
pub fn bounded(value: &str, max_bytes: usize) -> Cow<'_, str> {
    debug_assert!(max_bytes > SUFFIX_LEN);
    if value.len() <= max_bytes && !value.contains('\0') {
        return Cow::Borrowed(value);
    }
    let storable = storable(value);
    if storable.len() <= max_bytes {
        return Cow::Owned(storable.into_owned());
    }
    let mut cut = max_bytes - SUFFIX_LEN;
    while !storable.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Cow::Owned(format!("{}~{hex}", &storable[..cut]))
}

/// `value` with every NUL replaced by U+FFFD.
pub fn storable(value: &str) -> Cow<'_, str> {
    if value.contains('\0') {
        Cow::Owned(value.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(value)
    }
}

/// A JSON value PostgreSQL's `jsonb` accepts: NUL replaced in every string and key.
pub fn storable_json(value: &Value) -> Cow<'_, Value> {
    if !contains_nul(value) {
        return Cow::Borrowed(value);
    }
    fn clean(value: &Value) -> Value {
        match value {
            Value::String(s) => Value::String(storable(s).into_owned()),
            Value::Array(items) => Value::Array(items.iter().map(clean).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (storable(k).into_owned(), clean(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    Cow::Owned(clean(value))
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn short_clean_values_are_left_alone() {
        assert!(matches!(
            bounded("IN_PROGRESS", 200),
            Cow::Borrowed("IN_PROGRESS")
        ));
        assert!(matches!(
            storable_json(&json!({"a": ["b"]})),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn long_values_keep_their_beginning_and_a_stable_hash() {
        let long = "A".repeat(300);
        let once = bounded(&long, 200);
        assert_eq!(once.len(), 200);
        assert!(once.starts_with("AAAA"));
        assert_eq!(once, bounded(&long, 200), "stable");
        let other = format!("{}B", "A".repeat(299));
        assert_ne!(
            once,
            bounded(&other, 200),
            "different values stay different"
        );
    }

    #[test]
    fn nul_is_replaced_everywhere() {
        assert_eq!(bounded("a\0b", 200), "a\u{fffd}b");
        assert_eq!(
            storable_json(&json!({"k\u{0}": ["x\u{0}", {"y": "\u{0}"}]})).into_owned(),
            json!({"k\u{fffd}": ["x\u{fffd}", {"y": "\u{fffd}"}]})
        );
    }

    proptest! {
        #[test]
        fn any_value_fits_its_bound_on_a_character_boundary(value in "\\PC{0,400}", max in 18usize..300) {
            let bounded = bounded(&value, max);
            prop_assert!(bounded.len() <= max);
            prop_assert!(!bounded.contains('\0'));
        }
    }
}
