//! Tokenizers (rebuilt from GGUF and from tokenizer.json), chat templates and sampling.

mod common;

use candle_core::quantized::GgmlDType;
use common::*;
use potluck_engine::chat::{render_chat, ChatMessage};
use potluck_engine::generate::load_tokenizer;
use potluck_engine::sampling::{top_logprobs, Sampler, SamplingParams};
use potluck_engine::synthetic::write_safetensors;
use potluck_engine::tokenizer::TextTokenizer;
use potluck_engine::weights::WeightFile;

const SAMPLES: [&str; 5] = [
    "The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "numbers 1234567 and symbols #@!$%^&*()",
    "Ünïcödé — 日本語のテキスト 🎉",
    "<|im_start|>user\nhi<|im_end|>",
];

fn roundtrip(tok: &TextTokenizer) {
    for s in SAMPLES {
        let ids = tok.encode(s).unwrap();
        let back = tok.decode(&ids).unwrap();
        let expect = s.replace("<|im_start|>", "").replace("<|im_end|>", "");
        assert_eq!(back, expect, "round trip of {s:?} via {ids:?}");
    }
}

#[test]
fn smollm2_tokenizer_from_gguf() {
    let file = WeightFile::open(&smollm2_path()).unwrap();
    let tok = load_tokenizer(&file).unwrap();
    roundtrip(&tok);
    // Control tokens are matched whole; digits are split one by one (SmolLM's pre-tokenizer).
    let ids = tok.encode("<|im_start|>user").unwrap();
    assert_eq!(tok.token_text(ids[0]).as_deref(), Some("<|im_start|>"));
    let digits = tok.encode("2024").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    // The chat turn's end token ends a generation.
    assert!(
        tok.is_eos(tok.encode("<|im_end|>").unwrap()[0]),
        "eos ids {:?}",
        tok.eos_ids()
    );
    assert!(tok.chat_template().is_some());
    // "Hello world" in GPT-2-style BPE is two tokens, the second with the leading space mark.
    let hw = tok.encode("Hello world").unwrap();
    assert_eq!(hw.len(), 2);
    assert_eq!(tok.token_text(hw[1]).as_deref(), Some("Ġworld"));
}

#[test]
fn synthetic_tokenizers_from_gguf_and_json_agree() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(GgmlDType::F32);
    let (_, gguf) = synthetic(&dir, s.clone());
    write_safetensors(&s, &dir.path().join("st"), candle_core::DType::F32).unwrap();
    let st = WeightFile::open(&dir.path().join("st")).unwrap();
    let (a, b) = (load_tokenizer(&gguf).unwrap(), load_tokenizer(&st).unwrap());
    roundtrip(&a);
    roundtrip(&b);
    for s in SAMPLES {
        assert_eq!(a.encode(s).unwrap(), b.encode(s).unwrap(), "{s:?}");
    }
    // Merges apply: "the" is shorter than its bytes.
    assert!(a.encode("the then").unwrap().len() < "the then".len());
}

#[test]
fn chat_templates_render() {
    let file = WeightFile::open(&smollm2_path()).unwrap();
    let tok = load_tokenizer(&file).unwrap();
    let msgs = [ChatMessage::new("user", "What is 2+2?")];
    let text = render_chat(
        tok.chat_template(),
        &msgs,
        &tok.bos_text(),
        &tok.eos_text(),
        true,
    )
    .unwrap();
    assert!(
        text.contains("<|im_start|>user\nWhat is 2+2?<|im_end|>"),
        "{text}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    // SmolLM2's template adds a default system turn when none is given.
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    let fallback = render_chat(None, &msgs, "", "", true).unwrap();
    assert_eq!(
        fallback,
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    // Python string methods and raise_exception work; errors are typed, not panics.
    let py = "{{ messages[0]['content'].strip().upper() }}";
    assert_eq!(
        render_chat(
            Some(py),
            &[ChatMessage::new("user", "  hi ")],
            "",
            "",
            false
        )
        .unwrap(),
        "HI"
    );
    let raising = "{{ raise_exception('no system role') }}";
    assert!(render_chat(Some(raising), &msgs, "", "", false).is_err());
    assert!(render_chat(Some("{% for %}"), &msgs, "", "", false).is_err());
    assert!(render_chat(None, &[], "", "", true).is_err());
}

#[test]
fn hostile_chat_templates_fail_fast_instead_of_hanging_or_filling_memory() {
    let msgs = [ChatMessage::new("user", "hi")];
    let started = std::time::Instant::now();
    // 10^10 iterations: without a fuel limit this renders for hours.
    let endless =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let e = render_chat(Some(endless), &msgs, "", "", true).unwrap_err();
    assert!(e.to_string().contains("fuel"), "{e}");
    // 100 MB of output from a few bytes of template.
    let flood = "{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}";
    let e = render_chat(Some(flood), &msgs, "", "", true).unwrap_err();
    assert!(e.to_string().contains("wrote more than"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    // A conversation of a thousand turns still renders whole with a real template.
    let file = WeightFile::open(&smollm2_path()).unwrap();
    let tok = load_tokenizer(&file).unwrap();
    let long: Vec<ChatMessage> = (0..1024)
        .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "word"))
        .collect();
    let text = render_chat(tok.chat_template(), &long, "", "", true).unwrap();
    assert_eq!(text.matches("word").count(), 1024);
}

fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut r = potluck_engine::rng::Rng::new(seed);
    (0..n).map(|_| r.normal() * 3.0).collect()
}

fn draw(params: SamplingParams, l: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(params).unwrap();
    (0..n).map(|_| s.sample(l, &[]).unwrap()).collect()
}

#[test]
fn sampling_is_seeded_and_honours_its_settings() {
    let l = logits(500, 1);
    let best = potluck_engine::llama::argmax(&l).unwrap();
    let warm = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 42,
        ..Default::default()
    };
    // Same seed, same tokens; another seed, another stream.
    assert_eq!(draw(warm.clone(), &l, 50), draw(warm.clone(), &l, 50));
    assert_ne!(
        draw(warm.clone(), &l, 50),
        draw(
            SamplingParams {
                seed: 43,
                ..warm.clone()
            },
            &l,
            50
        )
    );
    // Greedy and top-k 1 both give the argmax.
    assert!(draw(SamplingParams::default(), &l, 5)
        .iter()
        .all(|&t| t == best));
    assert!(draw(
        SamplingParams {
            top_k: 1,
            ..warm.clone()
        },
        &l,
        20
    )
    .iter()
    .all(|&t| t == best));
    // top-k 5 only ever picks among the 5 best.
    let mut order: Vec<u32> = (0..l.len() as u32).collect();
    order.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]));
    let top5 = &order[..5];
    assert!(draw(
        SamplingParams {
            top_k: 5,
            ..warm.clone()
        },
        &l,
        200
    )
    .iter()
    .all(|t| top5.contains(t)));
    // A tiny top-p keeps only the best token; a high min-p likewise.
    assert!(draw(
        SamplingParams {
            top_p: 1e-6,
            ..warm.clone()
        },
        &l,
        20
    )
    .iter()
    .all(|&t| t == best));
    assert!(draw(
        SamplingParams {
            min_p: 1.0,
            ..warm.clone()
        },
        &l,
        20
    )
    .iter()
    .all(|&t| t == best));
    // A huge repetition penalty steers greedy away from the seen best token.
    let mut s = Sampler::new(SamplingParams {
        repetition_penalty: 1e6,
        ..Default::default()
    })
    .unwrap();
    assert_ne!(s.sample(&l, &[best]).unwrap(), best);
    // Nonsense settings are refused.
    for bad in [
        SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        SamplingParams {
            top_p: 1.5,
            ..Default::default()
        },
        SamplingParams {
            min_p: -0.1,
            ..Default::default()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        },
    ] {
        assert!(Sampler::new(bad).is_err());
    }
}

#[test]
fn top_logprobs_are_normalised_and_ordered() {
    let l = logits(300, 5);
    let best = potluck_engine::llama::argmax(&l).unwrap();
    let (lp, top) = top_logprobs(&l, best, 10);
    assert_eq!(top.len(), 10);
    assert_eq!(top[0].token, best);
    assert!((top[0].logprob - lp).abs() < 1e-6);
    assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    let total: f64 = l
        .iter()
        .map(|&x| ((x - l[best as usize]) as f64).exp())
        .sum();
    assert!((lp as f64 + total.ln()).abs() < 1e-4);
}

#[test]
fn streamed_pieces_add_up_to_the_whole_decode() {
    let file = WeightFile::open(&smollm2_path()).unwrap();
    let tok = load_tokenizer(&file).unwrap();
    for s in SAMPLES {
        let ids = tok.encode(s).unwrap();
        let mut stream = tok.stream();
        let joined: String = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(joined, tok.decode(&ids).unwrap(), "{s:?}");
    }
}

/// A GGUF holding only a SentencePiece-style llama vocabulary (pieces with scores, byte
/// fallback tokens), as Llama 2 / TinyLlama / Mistral files carry.
fn spm_gguf(path: &std::path::Path) {
    use candle_core::quantized::gguf_file::{write, Value};
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "▁", "t", "h", "e", "c", "a", "▁t", "th", "▁th", "▁the", "▁c", "▁ca", "▁cat", "s",
    ];
    for p in pieces {
        tokens.push(p.to_string());
        types.push(1);
    }
    // Longer pieces score higher, so whole words win.
    let scores: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Value::F32(if i < 259 {
                0.0
            } else {
                t.chars().count() as f32 - 10.0
            })
        })
        .collect();
    let strs = Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect());
    let meta = [
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strs),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ];
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    write(&mut f, &refs, &[]).unwrap();
}

#[test]
fn sentencepiece_vocab_from_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    spm_gguf(&path);
    let g = potluck_engine::gguf::GgufFile::open(&path).unwrap();
    let tok = TextTokenizer::from_gguf(&g).unwrap();
    let ids = tok.encode("the cats").unwrap();
    let texts: Vec<String> = ids.iter().map(|&i| tok.token_text(i).unwrap()).collect();
    // BOS first (llama vocabularies add it), whole-word pieces, then the leftover letter.
    assert_eq!(texts, ["<s>", "▁the", "▁cat", "s"]);
    assert_eq!(tok.decode(&ids).unwrap(), "the cats");
    // Characters outside the vocabulary fall back to their UTF-8 bytes and decode back.
    let ids = tok.encode("thé").unwrap();
    assert!(
        ids.iter()
            .any(|&i| tok.token_text(i).as_deref() == Some("<0xC3>")),
        "{ids:?}"
    );
    assert_eq!(tok.decode(&ids).unwrap(), "thé");
    assert!(tok.is_eos(2));
}

#[test]
fn a_tokenizer_files_padding_and_truncation_are_not_obeyed() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(GgmlDType::F32);
    write_safetensors(&s, &dir.path().join("st"), candle_core::DType::F32).unwrap();
    let honest = load_tokenizer(&WeightFile::open(&dir.path().join("st")).unwrap()).unwrap();
    let path = dir.path().join("st/tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Every encode would allocate a hundred million ids, and prompts would be cut to two
    // tokens behind the context check.
    json["padding"] = serde_json::json!({"strategy": {"Fixed": 100_000_000}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
    json["truncation"] = serde_json::json!({"direction": "Right", "max_length": 2,
        "strategy": "LongestFirst", "stride": 0});
    std::fs::write(&path, json.to_string()).unwrap();
    let hostile = load_tokenizer(&WeightFile::open(&dir.path().join("st")).unwrap()).unwrap();
    for text in SAMPLES {
        assert_eq!(
            hostile.encode(text).unwrap(),
            honest.encode(text).unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn a_tokenizer_whose_normalizer_blows_text_up_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(GgmlDType::F32);
    write_safetensors(&s, &dir.path().join("st"), candle_core::DType::F32).unwrap();
    let path = dir.path().join("st/tokenizer.json");
    let honest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // One character to ten thousand; ten doublings in a row; an empty regex match between
    // every two characters: 5,000 characters of prompt would become tens of megabytes.
    let doubling =
        serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "  "});
    for normalizer in [
        serde_json::json!({"type": "Replace", "pattern": {"String": "a"}, "content": "x".repeat(10_000)}),
        serde_json::json!({"type": "Sequence", "normalizers": vec![doubling; 10]}),
        serde_json::json!({"type": "Replace", "pattern": {"Regex": ""}, "content": "y".repeat(500)}),
    ] {
        let mut json = honest.clone();
        json["normalizer"] = normalizer;
        std::fs::write(&path, json.to_string()).unwrap();
        let err = match load_tokenizer(&WeightFile::open(&dir.path().join("st")).unwrap()) {
            Ok(_) => panic!("a normalizer that blows text up was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("normalizer can grow text"), "{err}");
    }
    // The same grows every generated token when it is a decoder.
    let mut json = honest.clone();
    json["decoder"] = serde_json::json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "a"}, "content": "z".repeat(100_000)},
        {"type": "Fuse"},
    ]});
    std::fs::write(&path, json.to_string()).unwrap();
    let err = match load_tokenizer(&WeightFile::open(&dir.path().join("st")).unwrap()) {
        Ok(_) => panic!("a decoder that blows text up was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("decoder can grow text"), "{err}");
    // Real decoders pass: SentencePiece's and GPT-2's.
    for decoder in [
        serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]}),
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
    ] {
        let mut json = honest.clone();
        json["decoder"] = decoder;
        std::fs::write(&path, json.to_string()).unwrap();
        load_tokenizer(&WeightFile::open(&dir.path().join("st")).unwrap()).unwrap();
    }
}
