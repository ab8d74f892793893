//! A service's output as readers get it: split into lines, with every secret of the stack
//! masked. Every way out of the stack (errors, `logs`, the log streams of gRPC and the
//! dashboard) reads container output through here, so a service that prints its key shows `***`.

use aho_corasick::{AhoCorasick, MatchKind};
use std::sync::Arc;

use crate::config::Config;

/// A service's output line by line: (from stderr, the line), secrets masked.
pub type LogLines =
    futures_util::stream::BoxStream<'static, Result<(bool, String), crate::engine::EngineError>>;

/// What a masked secret becomes.
pub const MASK: &str = "***";

/// Shorter values are not masked: masking every "1" or "yes" in a log would garble it and hide
/// nothing a guess would not find. Config loading warns about them.
pub const MIN_MASKED_CHARS: usize = 4;

/// Replaces every secret value in a text by [`MASK`]. Cheap to clone.
#[derive(Clone, Default)]
pub struct Redactor {
    matcher: Option<Arc<AhoCorasick>>,
}

impl Redactor {
    /// Masks the given values (those of at least [`MIN_MASKED_CHARS`] characters).
    pub fn new<I, S>(secrets: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut values: Vec<String> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_string())
            .filter(|s| s.chars().count() >= MIN_MASKED_CHARS)
            .collect();
        values.sort();
        values.dedup();
        if values.is_empty() {
            return Redactor::default();
        }
        // Leftmost-longest: of two secrets where one contains the other, the whole is masked.
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&values)
            .expect("literal patterns of bounded size always build");
        Redactor {
            matcher: Some(Arc::new(matcher)),
        }
    }

    /// The `secret_env` values of every service of `config`, and the stack's token.
    /// Warns about a secret too short to mask.
    pub fn for_stack(config: &Config, token: Option<&str>) -> Redactor {
        let secrets = config.services.iter().flat_map(|s| {
            s.secret_env
                .iter()
                .filter_map(move |k| s.env.get(k).map(|v| (s.name.as_str(), k, v.as_str())))
        });
        for (service, key, value) in secrets.clone() {
            let chars = value.chars().count();
            if (1..MIN_MASKED_CHARS).contains(&chars) {
                tracing::warn!(service, key = key.as_str(), "this secret_env value has {chars} characters, too few to mask in logs (every such string would be); a secret that short is guessed anyway");
            }
        }
        Redactor::new(secrets.map(|(_, _, v)| v).chain(token))
    }

    pub fn redact(&self, text: &str) -> String {
        match &self.matcher {
            Some(m) => m.replace_all(text, &vec![MASK; m.patterns_len()]),
            None => text.to_string(),
        }
    }
}

/// Turns chunks of a container's output (stdout and stderr apart) into whole lines, so that a
/// secret split across two chunks is still seen whole.
#[derive(Default)]
pub struct LineSplitter {
    partial: [Vec<u8>; 2],
}

impl LineSplitter {
    pub fn push(&mut self, stderr: bool, chunk: &[u8], out: &mut Vec<(bool, String)>) {
        let buf = &mut self.partial[usize::from(stderr)];
        buf.extend_from_slice(chunk);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            out.push((stderr, text.trim_end_matches('\r').to_string()));
        }
    }

    /// What is left without a final newline.
    pub fn finish(&mut self, out: &mut Vec<(bool, String)>) {
        for (i, buf) in self.partial.iter_mut().enumerate() {
            if !buf.is_empty() {
                out.push((i == 1, String::from_utf8_lossy(buf).into_owned()));
                buf.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_secret_is_masked_wherever_it_stands() {
        let r = Redactor::new(["sk-live-123", "sk-live-123456", "hunter22", "no"]);
        assert_eq!(
            r.redact("key=sk-live-123456 again sk-live-123, pw hunter22hunter22; no"),
            "key=*** again ***, pw ******; no"
        );
    }

    #[test]
    fn without_secrets_the_text_is_unchanged() {
        assert_eq!(Redactor::new::<_, &str>([]).redact("a b"), "a b");
    }

    #[test]
    fn a_line_split_across_chunks_comes_out_whole() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.push(false, b"key=sk-li", &mut out);
        s.push(true, b"err\r\n", &mut out);
        s.push(false, b"ve-1\ntail", &mut out);
        s.finish(&mut out);
        assert_eq!(
            out,
            vec![
                (true, "err".to_string()),
                (false, "key=sk-live-1".to_string()),
                (false, "tail".to_string())
            ]
        );
    }
}
