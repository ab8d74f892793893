//! YAML that reads the same under YAML 1.1 as under 1.2. Kubernetes (and PyYAML) read YAML 1.1,
//! where a plain `no`, `on`, `y`, `0777`, `1:30` or `2024-01-02` is a boolean, a number or a
//! date; the YAML library writes such strings plain because YAML 1.2 reads them as strings.
//! Every string that YAML 1.1 would read as something else is written quoted.

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;
use yaml_serde::Value;

/// The implicit types of YAML 1.1 (yaml.org/type: bool, null, int, float, timestamp, merge and
/// value keys), whole-string.
static YAML11_NOT_A_STRING: LazyLock<Regex> = LazyLock::new(|| {
    let patterns = [
        // bool
        r"y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF",
        // null
        r"~|null|Null|NULL|",
        // int: binary, octal, decimal, hexadecimal, base 60
        r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+",
        r"[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+",
        // float, base 60 float, infinity, not a number
        r"[-+]?(?:[0-9][0-9_]*)?\.[0-9.]*(?:[eE][-+][0-9]+)?",
        r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*",
        r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        // timestamp
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
        r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?",
        // merge and value keys
        r"<<|=",
    ];
    Regex::new(&format!("^(?:{})$", patterns.join("|"))).expect("the YAML 1.1 patterns compile")
});

pub fn yaml11_reads_as_other_than_string(text: &str) -> bool {
    YAML11_NOT_A_STRING.is_match(text)
}

/// `value` as a YAML document in which no string reads as another type under YAML 1.1.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, yaml_serde::Error> {
    let mut tree = yaml_serde::to_value(value)?;
    // Strings that need quotes are swapped for unique plain words, written, then swapped back
    // quoted: the library decides the layout, this decides the quoting.
    let marker = marker_absent_from(&yaml_serde::to_string(&tree)?);
    let mut swapped = Vec::new();
    mark(&mut tree, &marker, &mut swapped);
    let mut text = yaml_serde::to_string(&tree)?;
    for (i, original) in swapped.iter().enumerate() {
        // The trailing `Z` keeps `M1Z` from matching inside `M10Z`.
        text = text.replace(&format!("{marker}{i}Z"), &quoted(original));
    }
    Ok(text)
}

/// A word that `text` does not contain.
fn marker_absent_from(text: &str) -> String {
    (0u64..)
        .map(|n| format!("dspyq{n}x"))
        .find(|m| !text.contains(m.as_str()))
        .expect("some marker is absent from a finite text")
}

fn swap(text: String, marker: &str, swapped: &mut Vec<String>) -> String {
    if !yaml11_reads_as_other_than_string(&text) {
        return text;
    }
    swapped.push(text);
    format!("{marker}{}Z", swapped.len() - 1)
}

fn mark(value: &mut Value, marker: &str, swapped: &mut Vec<String>) {
    match value {
        Value::String(s) => *s = swap(std::mem::take(s), marker, swapped),
        Value::Sequence(items) => items.iter_mut().for_each(|v| mark(v, marker, swapped)),
        Value::Mapping(map) => {
            for (k, mut v) in std::mem::take(map) {
                mark(&mut v, marker, swapped);
                let key = match k {
                    Value::String(k) => Value::String(swap(k, marker, swapped)),
                    other => other,
                };
                map.insert(key, v);
            }
        }
        Value::Tagged(tagged) => mark(&mut tagged.value, marker, swapped),
        _ => {}
    }
}

/// A single-quoted YAML scalar (a quote is written twice).
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_yaml_1_1_reads_otherwise_is_quoted() {
        let args: Value = yaml_serde::to_value(serde_json::json!({
            "args": ["redis-server", "--save", "", "--appendonly", "no", "on", "Y", "~",
                     "0777", "1:30", "2024-01-02", "1_000", ".5", "<<", "yes-please", "v1.2"],
            "no": "off",
        }))
        .unwrap();
        let text = to_string(&args).unwrap();
        for quoted in [
            "'no'",
            "'on'",
            "'Y'",
            "'~'",
            "'0777'",
            "'1:30'",
            "'2024-01-02'",
            "'1_000'",
            "'.5'",
            "'<<'",
            "'no':",
            "'off'",
        ] {
            assert!(text.contains(quoted), "{quoted} in {text}");
        }
        assert!(
            text.contains("- yes-please") && text.contains("- v1.2"),
            "{text}"
        );
        let back: Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(back, args);
    }
}
