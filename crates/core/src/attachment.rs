//! References to files kept outside the documents: what an `attachments` field holds.
//!
//! A reference is `{"hash", "size", "mime", "name"}`: the BLAKE3 hash of the bytes (64
//! lowercase hex characters, the blob's name in a node's blob store), their length, a media
//! type and a display name. The document holds only references; the bytes live in each
//! node's blob store.

use serde_json::{json, Value as Json};

use crate::entity::json::kind;
use crate::Error;

/// Longest `mime` and `name`, in characters.
pub const MAX_TEXT_CHARS: usize = 255;
/// Largest `size`: the largest integer JSON readers keep exact (2^53 - 1).
pub const MAX_SIZE: u64 = (1 << 53) - 1;

/// One checked reference.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reference {
    /// BLAKE3 of the bytes, lowercase hex.
    pub hash: String,
    pub size: u64,
    pub mime: String,
    pub name: String,
}

impl Reference {
    /// Checks a reference written for `field`; the error says what is wrong with it.
    pub fn from_json(field: &str, value: &Json) -> Result<Self, Error> {
        let bad = |why: String| Error::Patch(format!("field {field:?}: {why}"));
        let Json::Object(map) = value else {
            return Err(bad(format!(
                "an attachment is an object {{\"hash\", \"size\", \"mime\", \"name\"}}, got {}",
                kind(value)
            )));
        };
        if let Some(k) = map
            .keys()
            .find(|k| !["hash", "size", "mime", "name"].contains(&k.as_str()))
        {
            return Err(bad(format!(
                "an attachment has only hash, size, mime and name, not {k:?}"
            )));
        }
        let hash = match map.get("hash") {
            Some(Json::String(h)) if is_hash(h) => h.clone(),
            Some(Json::String(h)) => {
                return Err(bad(format!(
                    "attachment hash {:?} is not 64 lowercase hex characters (a BLAKE3 hash)",
                    h.chars().take(80).collect::<String>()
                )))
            }
            Some(other) => {
                return Err(bad(format!(
                    "attachment hash must be a string, got {}",
                    kind(other)
                )))
            }
            None => return Err(bad("an attachment needs its \"hash\"".into())),
        };
        let size = match map.get("size") {
            Some(Json::Number(n)) => match n.as_u64() {
                Some(s) if s <= MAX_SIZE => s,
                _ => {
                    return Err(bad(format!(
                    "attachment size must be a whole number of bytes from 0 to {MAX_SIZE}, got {n}"
                )))
                }
            },
            Some(other) => {
                return Err(bad(format!(
                    "attachment size must be a number of bytes, got {}",
                    kind(other)
                )))
            }
            None => return Err(bad("an attachment needs its \"size\" in bytes".into())),
        };
        let text = |key: &str, check: fn(&str) -> bool, expect: &str| match map.get(key) {
            Some(Json::String(s)) if s.chars().count() <= MAX_TEXT_CHARS && check(s) => {
                Ok(s.clone())
            }
            Some(Json::String(_)) => Err(bad(format!("attachment {key}: {expect}"))),
            Some(other) => Err(bad(format!(
                "attachment {key} must be a string, got {}",
                kind(other)
            ))),
            None => Err(bad(format!("an attachment needs its \"{key}\""))),
        };
        let mime = text(
            "mime",
            is_mime,
            "expected a media type such as \"image/jpeg\" (type/subtype, at most 255 characters)",
        )?;
        let name = text(
            "name",
            |s| !s.chars().any(char::is_control),
            "expected at most 255 characters and no control characters",
        )?;
        Ok(Reference {
            hash,
            size,
            mime,
            name,
        })
    }

    /// The reference as JSON. Keys are in alphabetical order, so its text is the same
    /// whatever the JSON map keeps: that text is the element's identity in the set.
    pub fn to_json(&self) -> Json {
        json!({ "hash": self.hash, "mime": self.mime, "name": self.name, "size": self.size })
    }
}

/// 64 lowercase hex characters.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `type/subtype` with optional parameters, printable ASCII, no spaces before the `;`.
fn is_mime(s: &str) -> bool {
    let essence = s.split(';').next().unwrap_or_default();
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    matches!(essence.split_once('/'), Some((t, st)) if token(t) && token(st))
        && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// The references of an `attachments` field in a view (nothing for any other value).
pub fn in_view(value: Option<&Json>) -> Vec<Reference> {
    match value {
        Some(Json::Array(items)) => items
            .iter()
            .filter_map(|i| Reference::from_json("", i).ok())
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Json {
        json!({ "hash": "ab".repeat(32), "size": 12, "mime": "image/jpeg", "name": "boiler.jpg" })
    }

    #[test]
    fn a_valid_reference_round_trips_in_canonical_order() {
        let r = Reference::from_json("photos", &valid()).expect("valid");
        assert_eq!(r.size, 12);
        assert_eq!(
            r.to_json().to_string(),
            format!(
                r#"{{"hash":"{}","mime":"image/jpeg","name":"boiler.jpg","size":12}}"#,
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn bad_references_are_refused_with_what_is_wrong() {
        let with = |k: &str, v: Json| {
            let mut r = valid();
            r[k] = v;
            r
        };
        let without = |k: &str| {
            let mut r = valid();
            r.as_object_mut().expect("object").remove(k);
            r
        };
        for (bad, needle) in [
            (json!("just a string"), "is an object"),
            (with("hash", json!("abc")), "64 lowercase hex"),
            (with("hash", json!("AB".repeat(32))), "64 lowercase hex"),
            (with("hash", json!(7)), "must be a string"),
            (without("hash"), "needs its \"hash\""),
            (with("size", json!(-1)), "whole number"),
            (with("size", json!(1.5)), "whole number"),
            (with("size", json!("12")), "number of bytes"),
            (without("size"), "needs its \"size\""),
            (with("mime", json!("jpeg")), "media type"),
            (with("mime", json!("image/ jpeg")), "media type"),
            (without("mime"), "needs its \"mime\""),
            (with("name", json!("a\nb")), "control characters"),
            (with("name", json!("x".repeat(256))), "at most 255"),
            (with("extra", json!(1)), "not \"extra\""),
        ] {
            let err = Reference::from_json("photos", &bad)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(needle), "{bad} gave {err:?}");
            assert!(err.contains("photos"), "{err:?} names the field");
        }
        assert!(
            Reference::from_json("p", &with("mime", json!("text/plain; charset=utf-8"))).is_ok()
        );
        assert!(Reference::from_json("p", &with("size", json!(0))).is_ok());
        assert!(Reference::from_json("p", &with("name", json!(""))).is_ok());
    }
}
