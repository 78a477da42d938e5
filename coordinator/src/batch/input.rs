//! Cutting an uploaded JSONL file into work units: one unit per line in OpenAI's batch-line
//! shape (`custom_id`, `method`, `url`, `body`). A malformed line becomes a numbered error
//! and the rest of the file still runs; a file with nothing to run is refused whole.

use super::store::{Kind, LineError, NewUnit};
use potluck_engine::bert::MAX_TEXT_BYTES;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;

/// Largest input file.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// Most lines in one file (OpenAI's limit).
pub const MAX_LINES: usize = 50_000;
/// Most texts in one embedding line.
pub const MAX_LINE_TEXTS: usize = 256;
/// Most tokens one chat line may ask for.
pub const MAX_LINE_TOKENS: u64 = 1024;
/// Tokens a chat line gets when it does not say.
pub const DEFAULT_LINE_TOKENS: u64 = 128;

/// Why a whole file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// Over [`MAX_FILE_BYTES`].
    #[error("the file has {0} bytes; at most {MAX_FILE_BYTES}")]
    TooBig(usize),
    /// Over [`MAX_LINES`].
    #[error("the file has more than {MAX_LINES} lines")]
    TooManyLines,
    /// Not UTF-8.
    #[error("the file is not UTF-8 text")]
    NotText,
    /// No line at all.
    #[error("the file is empty")]
    Empty,
}

#[derive(Deserialize)]
struct Line {
    custom_id: Option<Value>,
    method: Option<String>,
    url: Option<String>,
    body: Option<Value>,
}

/// The units and line errors of `content` for a batch of `kind` on `model`.
pub fn parse(
    content: &[u8],
    kind: Kind,
    model: &str,
) -> Result<(Vec<NewUnit>, Vec<LineError>), InputError> {
    if content.len() > MAX_FILE_BYTES {
        return Err(InputError::TooBig(content.len()));
    }
    let text = std::str::from_utf8(content).map_err(|_| InputError::NotText)?;
    let mut units = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut lines = 0;
    for (i, raw) in text.lines().enumerate() {
        let number = i as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        lines += 1;
        if lines > MAX_LINES {
            return Err(InputError::TooManyLines);
        }
        match parse_line(raw, kind, model) {
            Ok((custom_id, _)) if !seen.insert(custom_id.clone()) => errors.push(LineError {
                line: number,
                custom_id: Some(custom_id.clone()),
                message: format!("custom_id {custom_id:?} is used by an earlier line"),
            }),
            Ok((custom_id, body)) => units.push(NewUnit {
                line: number,
                custom_id,
                body,
            }),
            Err((custom_id, message)) => errors.push(LineError {
                line: number,
                custom_id,
                message,
            }),
        }
    }
    if lines == 0 {
        return Err(InputError::Empty);
    }
    Ok((units, errors))
}

type LineResult = Result<(String, String), (Option<String>, String)>;

fn parse_line(raw: &str, kind: Kind, model: &str) -> LineResult {
    let line: Line =
        serde_json::from_str(raw).map_err(|e| (None, format!("not a JSON batch line: {e}")))?;
    let custom_id = match line.custom_id {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => s,
        _ => {
            return Err((
                None,
                "custom_id must be a non-empty string of at most 512 bytes".into(),
            ))
        }
    };
    let fail = |m: String| Err((Some(custom_id.clone()), m));
    if line.method.as_deref().is_some_and(|m| m != "POST") {
        return fail("method must be POST".into());
    }
    if let Some(url) = line.url.as_deref().filter(|u| *u != kind.endpoint()) {
        return fail(format!(
            "url {url} does not match this batch's endpoint {}",
            kind.endpoint()
        ));
    }
    let Some(body) = line.body.filter(Value::is_object) else {
        return fail("body must be a JSON object".into());
    };
    if let Some(m) = body
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| *m != model)
    {
        return fail(format!("model {m} is not this batch's model {model}"));
    }
    let checked = match kind {
        Kind::Embed => embed_texts(&body).map(|_| ()),
        Kind::Chat => chat_line(&body).map(|_| ()),
    };
    match checked {
        Ok(()) => Ok((custom_id, body.to_string())),
        Err(m) => fail(m),
    }
}

/// The texts of an embedding request's `input`: one string, or a list of 1 to `max`
/// strings, none empty or over [`MAX_TEXT_BYTES`]. The API endpoint and batch lines both read
/// their input here.
pub fn input_texts(input: &Value, max: usize) -> Result<Vec<String>, String> {
    let texts: Vec<String> = match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                format!(
                    "input must be a string or a list of strings, not a list of {} other values (token arrays are not supported)",
                    a.len()
                )
            })?,
        _ => return Err("input must be a string or a list of strings".into()),
    };
    if texts.is_empty() {
        return Err("input must not be empty".into());
    }
    if texts.len() > max {
        return Err(format!("{} inputs; at most {max} per request", texts.len()));
    }
    if let Some((i, t)) = texts
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > MAX_TEXT_BYTES)
    {
        return Err(format!(
            "input {i} has {} bytes; at most {MAX_TEXT_BYTES}",
            t.len()
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(format!("input {i} is empty"));
    }
    Ok(texts)
}

/// The texts of a batch line's embedding body.
pub fn embed_texts(body: &Value) -> Result<Vec<String>, String> {
    input_texts(body.get("input").unwrap_or(&Value::Null), MAX_LINE_TEXTS)
}

/// What a chat line asks for, once read.
#[derive(Debug, Clone)]
pub struct ChatLine {
    /// (role, content) pairs.
    pub messages: Vec<(String, String)>,
    /// Most tokens to generate.
    pub max_tokens: u64,
}

/// Reads a chat body: messages with string content, greedy, a bounded `max_tokens`.
pub fn chat_line(body: &Value) -> Result<ChatLine, String> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("messages must be a non-empty list")?
        .iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) if ["system", "user", "assistant"].contains(&r) => {
                    Ok((r.to_string(), c.to_string()))
                }
                _ => Err(
                    "each message needs a role (system, user or assistant) and string content"
                        .to_string(),
                ),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let temperature = body
        .get("temperature")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    if temperature != 0.0 {
        return Err(
            "batch chat units are greedy (temperature 0), so replicas on different nodes can be compared"
                .into(),
        );
    }
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .map(|v| v.as_u64().ok_or("max_tokens must be a whole number"))
        .transpose()?
        .unwrap_or(DEFAULT_LINE_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_LINE_TOKENS {
        return Err(format!("max_tokens must be 1 to {MAX_LINE_TOKENS}"));
    }
    Ok(ChatLine {
        messages,
        max_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_numbered_and_the_rest_runs() {
        let file = concat!(
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "hello"}}"#,
            "\n",
            "not json\n",
            "\n",
            r#"{"custom_id": "a", "body": {"input": "again"}}"#,
            "\n",
            r#"{"custom_id": "c", "body": {"input": []}}"#,
            "\n",
            r#"{"custom_id": "d", "url": "/v1/chat/completions", "body": {"input": "x"}}"#,
            "\n",
            r#"{"custom_id": "e", "body": {"input": ["x", "y"], "model": "other"}}"#,
            "\n",
            r#"{"custom_id": "f", "body": {"input": ["x", "y"]}}"#,
        );
        let (units, errors) = parse(file.as_bytes(), Kind::Embed, "m").unwrap();
        assert_eq!(units.iter().map(|u| u.line).collect::<Vec<_>>(), vec![1, 8]);
        let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 4, 5, 6, 7]);
        assert!(errors[1].message.contains("earlier line"), "{errors:?}");
        assert!(errors[4].message.contains("model"), "{errors:?}");
    }

    #[test]
    fn whole_files_refused_clearly() {
        let refused = |content: &[u8]| parse(content, Kind::Chat, "m").err();
        assert_eq!(refused(b""), Some(InputError::Empty));
        assert_eq!(refused(b"\n \n"), Some(InputError::Empty));
        assert_eq!(refused(&[0xff, 0xfe]), Some(InputError::NotText));
        let big = vec![b' '; MAX_FILE_BYTES + 1];
        assert!(matches!(
            parse(&big, Kind::Chat, "m"),
            Err(InputError::TooBig(_))
        ));
    }

    #[test]
    fn chat_lines_are_greedy_and_bounded() {
        let ok =
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
        assert_eq!(chat_line(&ok).unwrap().max_tokens, 8);
        let hot = serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7});
        assert!(chat_line(&hot).unwrap_err().contains("greedy"));
        let long = serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000});
        assert!(chat_line(&long).is_err());
        assert!(chat_line(&serde_json::json!({"messages": []})).is_err());
    }
}
