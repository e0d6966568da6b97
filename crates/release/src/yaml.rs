//! YAML reading shared by release and facts files: size limits, duplicate-key detection and
//! scalar handling that does not lose what the operator wrote.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::error::ReleaseError;
use super::MAX_FILE_BYTES;

/// Parses `text` as YAML into `T`, naming `file` in errors.
pub(crate) fn parse<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, ReleaseError> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ReleaseError::TooLarge { file: file.to_string(), limit: MAX_FILE_BYTES });
    }
    serde_norway::from_str(text).map_err(|e| ReleaseError::Syntax { file: file.to_string(), reason: e.to_string() })
}

/// Reads a whole file of at most [`MAX_FILE_BYTES`].
pub(crate) fn read(path: &Path) -> Result<String, ReleaseError> {
    use std::io::Read;
    let file = path.display().to_string();
    let read_err = |source| ReleaseError::Read { file: file.clone(), source };
    let handle = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    handle.take(MAX_FILE_BYTES + 1).read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ReleaseError::TooLarge { file, limit: MAX_FILE_BYTES });
    }
    Ok(text)
}

/// A mapping that keeps its keys in file order and rejects duplicate keys, which YAML parsers
/// (and serde's maps) would otherwise resolve silently by keeping the last one.
#[derive(Debug)]
pub(crate) struct UniqueMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some(key) = map.next_key::<Text>()? {
                    if entries.iter().any(|(k, _)| *k == key.0) {
                        return Err(de::Error::custom(format_args!("duplicate key {:?}", key.0)));
                    }
                    let value = map.next_value()?;
                    entries.push((key.0, value));
                }
                Ok(UniqueMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

/// A scalar kept as the text the operator wrote: strings as they are, integers in decimal.
///
/// Floats are refused rather than converted: YAML reads an unquoted `32.10` as the number 32.1,
/// so a version written that way has already lost what it said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Text(pub String);

/// Like [`Text`], also accepting booleans and null (empty), as compose does for label values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LabelText(pub String);

const FLOAT_HINT: &str = "write it as a quoted string (unquoted, YAML reads 32.10 as the number 32.1)";

struct ScalarVisitor {
    lenient: bool,
}

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if self.lenient { "a string, number or boolean" } else { "a string" })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Err(E::custom(format_args!("the number {v} is ambiguous: {FLOAT_HINT}")))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        if self.lenient {
            Ok(v.to_string())
        } else {
            Err(E::invalid_type(de::Unexpected::Bool(v), &self))
        }
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        if self.lenient {
            Ok(String::new())
        } else {
            Err(E::invalid_type(de::Unexpected::Unit, &self))
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor { lenient: false }).map(Text)
    }
}

impl<'de> Deserialize<'de> for LabelText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor { lenient: true }).map(LabelText)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        map: UniqueMap<Text>,
    }

    #[test]
    fn duplicate_keys_are_rejected_with_their_path() {
        let err = parse::<Doc>("map:\n  a: x\n  a: y\n", "f.yaml").unwrap_err().to_string();
        assert!(err.starts_with("f.yaml: map: duplicate key \"a\""), "{err}");
    }

    #[test]
    fn scalars_keep_their_text_and_floats_are_refused() {
        let doc: Doc = parse("map:\n  a: '32.10'\n  b: 14\n  c: x\n", "f").unwrap();
        let values: Vec<_> = doc.map.0.iter().map(|(_, v)| v.0.as_str()).collect();
        assert_eq!(values, ["32.10", "14", "x"]);
        let err = parse::<Doc>("map:\n  a: 32.10\n", "f").unwrap_err().to_string();
        assert!(err.contains("quoted string"), "{err}");
        assert!(parse::<Doc>("map:\n  a: true\n", "f").is_err());
    }

    #[test]
    fn oversized_text_is_refused_before_parsing() {
        let big = "#".repeat(MAX_FILE_BYTES as usize + 1);
        assert!(matches!(parse::<Doc>(&big, "f"), Err(ReleaseError::TooLarge { .. })));
    }
}
