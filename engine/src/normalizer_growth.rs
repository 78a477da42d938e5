//! How much a tokenizer.json's normalizer can grow text, read from its configuration before
//! the file is used. The tokenizers crate runs a normalizer with no bound on its output: a
//! `Replace` of one character by ten thousand, or ten doubling `Replace`s in a row, turns
//! a prompt of a few kilobytes into gigabytes inside one encode. A file whose normalizer can
//! grow text more than [`MAX_NORMALIZER_GROWTH`]-fold is refused when it is loaded.

use serde_json::Value as Json;

/// Most a normalizer may grow text (characters out per character in). Real ones stay far
/// below: NFKC grows a character to at most 18, BERT's spaces around CJK to 3, and
/// SentencePiece's space marker keeps lengths.
pub const MAX_NORMALIZER_GROWTH: f64 = 64.0;

/// Worst growth assumed for a normalizer whose output cannot be bounded from its
/// configuration alone (a SentencePiece precompiled character map).
const OPAQUE_GROWTH: f64 = 8.0;

/// An upper bound on characters out per character in for `normalizer` (a tokenizer.json's
/// `normalizer` field, or its `decoder`, whose `Replace` and `Sequence` are alike; `null`
/// grows nothing). Prepended text is counted as one more character's worth per character,
/// which only overestimates.
pub fn normalizer_growth(normalizer: &Json) -> f64 {
    let chars = |v: &Json| v.as_str().map_or(0, |s| s.chars().count()) as f64;
    match normalizer.get("type").and_then(Json::as_str) {
        None => 1.0,
        // A Sequence naming both lists would be scored by one and run by the other.
        Some("Sequence")
            if normalizer.get("normalizers").is_some() && normalizer.get("decoders").is_some() =>
        {
            f64::INFINITY
        }
        Some("Sequence") => normalizer
            .get("normalizers")
            .or_else(|| normalizer.get("decoders"))
            .and_then(Json::as_array)
            .map_or(1.0, |list| list.iter().map(normalizer_growth).product()),
        Some("Replace") => {
            let content = normalizer.get("content").map_or(0.0, chars);
            match normalizer.get("pattern") {
                // Each match of a literal gives way to the content.
                Some(p) if p.get("String").is_some() => {
                    let pattern = p.get("String").map_or(0.0, chars).max(1.0);
                    (content / pattern).max(1.0)
                }
                // A regex may match the empty string between every two characters.
                _ => 1.0 + content,
            }
        }
        Some("Prepend") => 1.0 + normalizer.get("prepend").map_or(0.0, chars),
        Some("NFKC" | "NFKD") => 18.0,
        Some("NFC" | "NFD") => 4.0,
        Some("BertNormalizer") => 3.0 * 3.0,
        Some("Lowercase") => 3.0,
        Some("Strip" | "StripAccents") => 1.0,
        // Decoders that join, drop or swap pieces without adding to them.
        Some("ByteFallback" | "Fuse" | "Metaspace") => 1.0,
        // A space per piece, or an empty suffix or delimiter replaced between every two
        // characters: each at most doubles.
        Some("WordPiece" | "BPEDecoder" | "CTC") => 2.0,
        Some("ByteLevel") => 4.0,
        Some(_) => OPAQUE_GROWTH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn real_normalizers_are_bounded_and_hostile_ones_are_not() {
        let spm = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        assert!(normalizer_growth(&spm) <= 2.0);
        let bert = json!({"type": "BertNormalizer", "clean_text": true,
            "handle_chinese_chars": true, "strip_accents": null, "lowercase": true});
        assert!(normalizer_growth(&bert) <= MAX_NORMALIZER_GROWTH);
        assert_eq!(normalizer_growth(&Json::Null), 1.0);
        let blowup = json!({"type": "Replace", "pattern": {"String": "a"},
            "content": "x".repeat(10_000)});
        assert!(normalizer_growth(&blowup) > MAX_NORMALIZER_GROWTH);
        let doubling = json!({"type": "Replace", "pattern": {"String": " "}, "content": "  "});
        let ten = json!({"type": "Sequence", "normalizers": vec![doubling; 10]});
        assert_eq!(normalizer_growth(&ten), 1024.0);
        let empty_regex = json!({"type": "Replace", "pattern": {"Regex": ""},
            "content": "x".repeat(100)});
        assert!(normalizer_growth(&empty_regex) > MAX_NORMALIZER_GROWTH);
        // A decoder Sequence that hides its list under the other key, or chains doublers.
        let both = json!({"type": "Sequence", "normalizers": [], "decoders": []});
        assert!(normalizer_growth(&both) > MAX_NORMALIZER_GROWTH);
        let bpe = json!({"type": "BPEDecoder", "suffix": ""});
        let chain = json!({"type": "Sequence", "decoders": vec![bpe; 30]});
        assert!(normalizer_growth(&chain) > MAX_NORMALIZER_GROWTH);
    }
}
