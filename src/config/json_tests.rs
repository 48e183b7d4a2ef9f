//! Unit tests of `json`.
use super::*;

const KNOWN: &[&str] = &["workers", "listen", "client_keys", "flag", "names", "deployments"];

fn read(text: &str) -> Result<Object<'static>, ConfigError> {
    parse(text, Path::new("dir/c.json"), KNOWN)
}

fn msg(r: Result<impl Sized, ConfigError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.message,
    }
}

#[test]
fn type_errors_name_the_field_the_value_and_the_fix() {
    let m = msg(read(r#"{"workers": "64"}"#).and_then(|mut o| o.number::<usize>("workers")));
    assert!(m.contains("dir/c.json") && m.contains("field workers"), "{m}");
    assert!(m.contains(r#"expected a whole number, got the string "64""#), "{m}");
    assert!(m.contains("fix: remove the quotes: 64"), "{m}");
    let m = msg(read(r#"{"listen": 8000}"#).and_then(|mut o| o.string("listen")));
    assert!(m.contains("field listen: expected a string, got the number 8000; fix:"), "{m}");
    let m = msg(read(r#"{"flag": "yes"}"#).and_then(|mut o| o.boolean("flag")));
    assert!(m.contains("field flag") && m.contains("true or false"), "{m}");
    let m = msg(read(r#"{"names": "a"}"#).and_then(|mut o| o.strings("names")));
    assert!(m.contains("field names: expected a list") && m.contains("square brackets"), "{m}");
    let m = msg(read(r#"{"names": ["a", 2]}"#).and_then(|mut o| o.strings("names")));
    assert!(m.contains("field names[1]: expected a string"), "{m}");
    let m = msg(read(r#"{"deployments": {"a": 1}}"#).and_then(|mut o| o.string_map("deployments")));
    assert!(m.contains("field deployments.a: expected a string"), "{m}");
}

#[test]
fn numbers_out_of_range_or_not_whole_say_so() {
    let m = msg(read(r#"{"workers": 4294967296}"#).and_then(|mut o| o.number::<u32>("workers")));
    assert!(m.contains("field workers: 4294967296 is too large; fix: use at most 4294967295"), "{m}");
    let m = msg(read(r#"{"workers": -1}"#).and_then(|mut o| o.number::<u64>("workers")));
    assert!(m.contains("got the number -1") && m.contains("whole number of 0 or more"), "{m}");
    let m = msg(read(r#"{"workers": 1.5}"#).and_then(|mut o| o.number::<u64>("workers")));
    assert!(m.contains("got the number 1.5"), "{m}");
}

#[test]
fn secret_values_are_never_shown() {
    for text in [r#"{"client_keys": ["ok", 918273645]}"#, r#"{"client_keys": [true]}"#] {
        let m = msg(read(text).and_then(|mut o| o.texts_or_objects("client_keys", &["name"], "{}").map(|_| ())));
        assert!(m.contains("field client_keys[1]") || m.contains("field client_keys[0]"), "{m}");
        assert!(!m.contains("918273645") && !m.contains("true"), "{m}");
    }
}

#[test]
fn the_file_as_a_whole() {
    for (text, says) in [
        ("", "the file is empty"),
        ("  \n", "the file is empty"),
        ("[1]", "expected a JSON object {…} at the top level, got a list"),
        ("\"x\"", "got the string \"x\""),
        ("{\"workers\": ", "the JSON ends too early"),
        ("{\"workers\": 1,}", "invalid JSON at line 1 column 15"),
        ("{\"workers\": 1, \"workers\": 2}", "the field \"workers\" is given twice"),
    ] {
        let m = msg(read(text));
        assert!(m.starts_with("config file dir/c.json: "), "{text:?}: {m}");
        assert!(m.contains(says) && m.contains("; fix: "), "{text:?}: {m}");
    }
}

#[test]
fn unknown_fields_are_refused_with_a_suggestion() {
    let m = msg(read(r#"{"client_key": ["x"]}"#));
    assert!(m.contains("field client_key: unknown field") && m.contains("did you mean \"client_keys\""), "{m}");
    let m = msg(read(r#"{"zzzzzzzz": 1}"#));
    assert!(m.contains("zzzzzzzz") && m.contains("the known fields are workers, listen"), "{m}");
}

#[test]
fn null_is_absent() {
    let mut o = read(r#"{"workers": null}"#).expect("valid");
    assert_eq!(o.number::<usize>("workers").expect("null"), None);
}
