//! Every unknown key of a config file in one run. The typed parse (unknown fields refused, with
//! the keys that would fit) stops at the first; each one found is blanked out of the text, line
//! numbers kept, and the parse runs again, so a file with five typos reports five.

use super::{ConfigError, ConfigLayer};

/// More than this many unknown keys in one file are not looked for.
const MOST: usize = 100;

/// The unknown keys of `text`, each as its own error in the order of the file, and the text
/// without their entries.
pub fn without_unknown_keys(path: &str, text: &str) -> (Vec<ConfigError>, String) {
    let mut text = text.to_string();
    let mut found = Vec::new();
    while found.len() < MOST {
        let Err(e) = toml::from_str::<ConfigLayer>(&text) else {
            break;
        };
        let (true, Some(span)) = (e.message().starts_with("unknown field"), e.span()) else {
            break;
        };
        found.push((
            span.start,
            ConfigError::Parse {
                path: path.to_string(),
                message: e.to_string().trim_end().to_string(),
            },
        ));
        text = blank_entry(&text, span.start);
    }
    found.sort_by_key(|(at, _)| *at);
    (found.into_iter().map(|(_, e)| e).collect(), text)
}

/// `text` with the entry whose key starts at byte `at` replaced by empty lines: a `[table]`
/// header with its keys up to the next header, or a key with its value, over as many lines as
/// its brackets and quotes span.
fn blank_entry(text: &str, at: usize) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut start = 0;
    let mut first = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if at < start + line.len() {
            first = i;
            break;
        }
        start += line.len();
    }
    let mut last = first;
    if lines
        .get(first)
        .is_some_and(|l| l.trim_start().starts_with('['))
    {
        while lines
            .get(last + 1)
            .is_some_and(|l| !l.trim_start().starts_with('['))
        {
            last += 1;
        }
    } else {
        let mut open = Depth::default();
        for (i, line) in lines.iter().enumerate().skip(first) {
            open.read(line);
            last = i;
            if open.closed() {
                break;
            }
        }
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            if (first..=last).contains(&i) {
                if line.ends_with('\n') {
                    "\n"
                } else {
                    ""
                }
            } else {
                line
            }
        })
        .collect()
}

/// How deep inside brackets and multi-line strings a value is, read line by line.
#[derive(Default)]
struct Depth {
    brackets: i32,
    multiline: Option<&'static str>,
}

impl Depth {
    fn read(&mut self, line: &str) {
        let mut rest = line;
        while !rest.is_empty() {
            if let Some(quote) = self.multiline {
                match rest.find(quote) {
                    Some(end) => {
                        rest = &rest[end + 3..];
                        self.multiline = None;
                    }
                    None => return,
                }
                continue;
            }
            if rest.starts_with("\"\"\"") || rest.starts_with("'''") {
                self.multiline = Some(if rest.starts_with('"') {
                    "\"\"\""
                } else {
                    "'''"
                });
                rest = &rest[3..];
                continue;
            }
            let c = rest.chars().next().unwrap_or(' ');
            match c {
                '#' => return,
                '"' | '\'' => {
                    // A one-line string: skip to its end (escapes only in basic strings).
                    let body = &rest[1..];
                    let end = if c == '"' {
                        let mut escaped = false;
                        body.char_indices()
                            .find(|&(_, ch)| {
                                let stop = ch == '"' && !escaped;
                                escaped = ch == '\\' && !escaped;
                                stop
                            })
                            .map(|(i, _)| i)
                    } else {
                        body.find('\'')
                    };
                    rest = end.map_or("", |i| &body[i + 1..]);
                    continue;
                }
                '[' | '{' => self.brackets += 1,
                ']' | '}' => self.brackets -= 1,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
        }
    }

    fn closed(&self) -> bool {
        self.brackets <= 0 && self.multiline.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unknown_key_is_found_with_its_line() {
        let text = "projekt = \"p\"\n\n[tasks]\nmax_retries = 2\nretention = \"7d\"\n\n[services.redis]\nimag = \"r\"\ncomand = [\n  \"a\",\n  \"b]\",\n]\nports = [\"0:6379\"]\n\n[services.redis.healthcheck]\ntype = \"redis\"\nintervall = \"\"\"\n5s\n\"\"\"\n\n[services.redis.typo]\nx = 1\n[services.web]\nimage = \"w\"\n";
        let (found, cleaned) = without_unknown_keys("f.toml", text);
        let lines: Vec<String> = found.iter().map(|e| e.to_string()).collect();
        assert_eq!(found.len(), 6, "{lines:#?}");
        for (key, line) in [
            ("projekt", 1),
            ("max_retries", 4),
            ("imag", 8),
            ("comand", 9),
            ("intervall", 17),
            ("typo", 21),
        ] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(key) && l.contains(&format!("line {line},"))),
                "{key} at line {line}: {lines:#?}"
            );
        }
        let layer: ConfigLayer = toml::from_str(&cleaned).expect("the rest parses");
        assert!(layer.services.contains_key("web"));
        assert_eq!(cleaned.lines().count(), text.lines().count());
    }
}
