//! Reading secrets out of the settings: always as text, and never echoed in an error.
//!
//! serde's own errors quote the value they refused ("found unsigned int `42`"). A secret
//! written where it does not fit would then reach the terminal and the logs, so these readers
//! answer with the expected shape only.

use std::fmt;

use secrecy::SecretString;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

const NOT_TEXT: &str = "expected text (the value is not shown: it is a secret)";

/// One secret.
pub(super) fn one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SecretString, D::Error> {
    Text::deserialize(deserializer).map(|text| SecretString::from(text.0))
}

/// A secret that may be absent; an empty one counts as absent.
pub(super) fn optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SecretString>, D::Error> {
    let text = Option::<Text>::deserialize(deserializer)?;
    Ok(text
        .map(|text| text.0)
        .filter(|text| !text.is_empty())
        .map(SecretString::from))
}

/// A list of secrets: a list of strings, or one comma-separated string. Items are trimmed and
/// empty ones dropped.
pub(super) fn list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<SecretString>, D::Error> {
    let items = deserializer.deserialize_any(ListVisitor)?;
    Ok(items
        .iter()
        .map(|item| item.trim())
        .filter(|item| !item.is_empty())
        .map(SecretString::from)
        .collect())
}

struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TextVisitor).map(Text)
    }
}

struct TextVisitor;

impl Visitor<'_> for TextVisitor {
    type Value = String;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("text")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
        Ok(text.to_owned())
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<String, E> {
        Ok(text)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
        Err(E::custom(NOT_TEXT))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
        Err(E::custom(NOT_TEXT))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
        Err(E::custom(NOT_TEXT))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
        Err(E::custom(NOT_TEXT))
    }
}

struct ListVisitor;

impl<'de> Visitor<'de> for ListVisitor {
    type Value = Vec<String>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a list of strings or one comma-separated string")
    }

    fn visit_str<E: de::Error>(self, joined: &str) -> Result<Vec<String>, E> {
        Ok(joined.split(',').map(str::to_owned).collect())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Vec<String>, A::Error> {
        let mut list = Vec::new();
        while let Some(Text(item)) = items.next_element()? {
            list.push(item);
        }
        Ok(list)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Vec<String>, E> {
        Err(E::custom(NOT_TEXT))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Vec<String>, E> {
        Err(E::custom(NOT_TEXT))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Vec<String>, E> {
        Err(E::custom(NOT_TEXT))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Vec<String>, E> {
        Err(E::custom(NOT_TEXT))
    }
}
