//! Reading the config file's JSON with the path of every value, so that any error (bad syntax, a wrong type, a
//! missing, unknown or repeated field) names the file and the field (`instances[1].weight`), says what is wrong
//! in the user's terms and how to fix it. It does not check values beyond their JSON type: ranges and formats
//! are `file.rs`'s business.
//!
//! Two steps: the text becomes a `serde_json::Value` (refusing a key given twice, as the derived parser it
//! replaces did), then each object is read field by field. A value that belongs to a secret field (`api_key`,
//! `client_keys`, `egress_proxy`) is never quoted in an error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::ConfigError;

const EXAMPLE: &str = r#"{"instances": [{"endpoint": "https://eastus-xyz.openai.azure.com", "api_key": "…"}]}"#;

/// Parses `text` as the config file at `file`; the top level must be an object.
pub(super) fn parse<'a>(text: &str, file: &'a Path, known: &'static [&'static str]) -> Result<Object<'a>, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::in_file(
            file,
            "",
            "the file is empty",
            format!("write a JSON object such as {EXAMPLE} (see azure_instances.example.json)"),
        ));
    }
    let value = serde_json::from_str::<Strict>(text).map_err(|e| syntax_error(file, &e))?.0;
    if !value.is_object() {
        return Err(ConfigError::in_file(
            file,
            "",
            format!("expected a JSON object {{…}} at the top level, got {}", describe(&value, false)),
            format!("put the settings in braces, e.g. {EXAMPLE}"),
        ));
    }
    Object::new(file, String::new(), value, known)
}

fn syntax_error(file: &Path, e: &serde_json::Error) -> ConfigError {
    let at = format!("line {} column {}", e.line(), e.column());
    // serde_json's text ends with " at line L column C"; the position is said once, by us.
    let text = e.to_string();
    let what = text.split(" at line ").next().unwrap_or_default();
    let (problem, fix) = match e.classify() {
        serde_json::error::Category::Eof => (
            format!("the JSON ends too early ({what} at {at})"),
            "close every {, [ and \" that is opened; compare with azure_instances.example.json".to_string(),
        ),
        serde_json::error::Category::Data => (format!("{what} (at {at})"), "keep only one of them".to_string()),
        _ => (
            format!("invalid JSON at {at}: {what}"),
            "correct the JSON there: a missing comma or quote, a trailing comma, or a comment (JSON has none)"
                .to_string(),
        ),
    };
    ConfigError::in_file(file, "", problem, fix)
}

/// One JSON object being read field by field; `at` is its path (`""` for the top level, `instances[1]`).
pub(super) struct Object<'a> {
    file: &'a Path,
    at: String,
    map: Map<String, Value>,
}

impl<'a> Object<'a> {
    /// Refuses any field not in `known`: a typo such as `client_key` must not silently turn the allowlist off.
    fn new(
        file: &'a Path,
        at: String,
        value: Value,
        known: &'static [&'static str],
    ) -> Result<Object<'a>, ConfigError> {
        let Value::Object(map) = value else { unreachable!("callers check the type") };
        let object = Object { file, at, map };
        if let Some(name) = object.map.keys().find(|k| !known.contains(&k.as_str())) {
            let fix = match closest(name, known) {
                Some(near) => format!("correct its spelling (did you mean \"{near}\"?) or remove it"),
                None => format!("remove it or correct its spelling; the known fields are {}", known.join(", ")),
            };
            return Err(object.error(name, format!("unknown field \"{name}\""), fix));
        }
        Ok(object)
    }

    /// The path of this object's field `name`, as the errors show it.
    pub(super) fn path(&self, name: &str) -> String {
        if self.at.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.at)
        }
    }

    pub(super) fn error(&self, name: &str, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        ConfigError::in_file(self.file, &self.path(name), problem, fix)
    }

    /// The field's value; `null` counts as absent, as it did for the optional fields of the derived parser.
    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    pub(super) fn string(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        self.text(name, false)
    }

    /// A string whose value must never be shown (a key, a proxy URL with credentials).
    pub(super) fn secret(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        self.text(name, true)
    }

    fn text(&mut self, name: &str, secret: bool) -> Result<Option<String>, ConfigError> {
        let path = self.path(name);
        self.take(name).map(|v| as_string(self.file, &path, v, secret)).transpose()
    }

    /// A whole number that fits in `T`.
    pub(super) fn number<T: TryFrom<u64>>(&mut self, name: &str) -> Result<Option<T>, ConfigError> {
        let Some(v) = self.take(name) else { return Ok(None) };
        let n = v.as_u64().ok_or_else(|| {
            let fix = match &v {
                Value::String(s) if s.trim().parse::<u64>().is_ok() => format!("remove the quotes: {}", s.trim()),
                Value::Number(_) => "use a whole number of 0 or more, without a decimal point".to_string(),
                _ => "write a whole number without quotes, e.g. 10".to_string(),
            };
            self.error(name, format!("expected a whole number, got {}", describe(&v, false)), fix)
        })?;
        let too_large = || self.error(name, format!("{n} is too large"), format!("use at most {}", max_of::<T>()));
        T::try_from(n).map(Some).map_err(|_| too_large())
    }

    pub(super) fn boolean(&mut self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.error(
                name,
                format!("expected true or false, got {}", describe(&v, false)),
                "write true or false, without quotes",
            )),
        }
    }

    /// A list of strings; its items are named `name[i]`.
    pub(super) fn strings(&mut self, name: &str) -> Result<Option<Vec<String>>, ConfigError> {
        self.list_of_text(name, false)
    }

    fn list_of_text(&mut self, name: &str, secret: bool) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(items) = self.list(name)? else { return Ok(None) };
        let path = self.path(name);
        let items = items.into_iter().enumerate();
        items.map(|(i, v)| as_string(self.file, &format!("{path}[{i}]"), v, secret)).collect::<Result<_, _>>().map(Some)
    }

    /// A list of objects, each refusing fields not in `known`; they are named `name[i]`.
    pub(super) fn objects(
        &mut self,
        name: &str,
        known: &'static [&'static str],
    ) -> Result<Option<Vec<Object<'a>>>, ConfigError> {
        let Some(items) = self.list(name)? else { return Ok(None) };
        let path = self.path(name);
        let mut objects = Vec::with_capacity(items.len());
        for (i, v) in items.into_iter().enumerate() {
            let at = format!("{path}[{i}]");
            if !v.is_object() {
                return Err(ConfigError::in_file(
                    self.file,
                    &at,
                    format!("expected an object {{…}}, got {}", describe(&v, false)),
                    format!("write each entry of {name} as an object in braces, e.g. {{\"endpoint\": …}}"),
                ));
            }
            objects.push(Object::new(self.file, at, v, known)?);
        }
        Ok(Some(objects))
    }

    /// One nested object, refusing fields not in `known`; its fields are named `name.field`.
    pub(super) fn object(
        &mut self,
        name: &str,
        known: &'static [&'static str],
        example: &str,
    ) -> Result<Option<Object<'a>>, ConfigError> {
        let Some(v) = self.take(name) else { return Ok(None) };
        if !v.is_object() {
            return Err(self.error(
                name,
                format!("expected an object {{…}}, got {}", describe(&v, false)),
                format!("write an object in braces, e.g. {example}"),
            ));
        }
        Object::new(self.file, self.path(name), v, known).map(Some)
    }

    /// A list whose entries are each a string or an object (refusing fields not in `known`), e.g. `client_keys`;
    /// they are named `name[i]`. A string entry counts as secret: its value is never quoted.
    pub(super) fn texts_or_objects(
        &mut self,
        name: &str,
        known: &'static [&'static str],
        example: &str,
    ) -> Result<Option<Vec<Item<'a>>>, ConfigError> {
        let Some(items) = self.list(name)? else { return Ok(None) };
        let path = self.path(name);
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.into_iter().enumerate() {
            let at = format!("{path}[{i}]");
            out.push(match v {
                Value::String(s) => Item::Text(s),
                v @ Value::Object(_) => Item::Object(Object::new(self.file, at, v, known)?),
                v => {
                    return Err(ConfigError::in_file(
                        self.file,
                        &at,
                        format!("expected a string or an object {{…}}, got {}", describe(&v, true)),
                        format!("write the entry as a string in double quotes, or as an object such as {example}"),
                    ))
                }
            });
        }
        Ok(Some(out))
    }

    /// An object whose values are strings, e.g. `deployments`; a value is named `name.key`.
    pub(super) fn string_map(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>, ConfigError> {
        let Some(v) = self.take(name) else { return Ok(None) };
        let Value::Object(map) = v else {
            return Err(self.error(
                name,
                format!("expected an object {{…}}, got {}", describe(&v, false)),
                "write an object in braces, e.g. {\"gpt-4o\": \"gpt4o-eastus-prod\"}",
            ));
        };
        let path = self.path(name);
        let entries = map.into_iter().map(|(k, v)| {
            let value = as_string(self.file, &format!("{path}.{k}"), v, false)?;
            Ok((k, value))
        });
        entries.collect::<Result<_, _>>().map(Some)
    }

    fn list(&mut self, name: &str) -> Result<Option<Vec<Value>>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(v) => {
                let fix = match &v {
                    Value::String(_) => "put it in square brackets: [\"…\"]",
                    _ => "write a list in square brackets: [ … ]",
                };
                Err(self.error(name, format!("expected a list [ … ], got {}", describe(&v, false)), fix))
            }
        }
    }
}

/// One entry of a list read by `Object::texts_or_objects`.
pub(super) enum Item<'a> {
    Text(String),
    Object(Object<'a>),
}

fn as_string(file: &Path, path: &str, v: Value, secret: bool) -> Result<String, ConfigError> {
    match v {
        Value::String(s) => Ok(s),
        v => {
            let fix = match (&v, secret) {
                (Value::Number(_) | Value::Bool(_), false) => format!("put the value in double quotes: \"{v}\""),
                _ => "write the value as a string in double quotes".to_string(),
            };
            Err(ConfigError::in_file(file, path, format!("expected a string, got {}", describe(&v, secret)), fix))
        }
    }
}

/// A JSON value in words, e.g. `the string "64"`; for a secret field only its type.
fn describe(v: &Value, secret: bool) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(_) | Value::Number(_) | Value::String(_) if secret => {
            format!(
                "a {}",
                if v.is_string() {
                    "string"
                } else if v.is_number() {
                    "number"
                } else {
                    "boolean"
                }
            )
        }
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 60 => {
            format!("the string {:?}… ({} characters)", s.chars().take(60).collect::<String>(), s.chars().count())
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// The largest value of `T` (the unsigned types used here all have maxima of the form 2^k - 1).
fn max_of<T: TryFrom<u64>>() -> u64 {
    let mut max = u64::MAX;
    while T::try_from(max).is_err() {
        max >>= 1;
    }
    max
}

/// The known name at most two edits away from `name`, if there is exactly one best.
fn closest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    let mut best: Option<(usize, &'static str)> = None;
    for k in known {
        let d = edit_distance(name, k);
        if d <= 2 && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A `serde_json::Value` that refuses an object with the same key twice.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format!("the field \"{key}\" is given twice")));
            }
            let Strict(v) = access.next_value()?;
            map.insert(key, v);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod tests;
