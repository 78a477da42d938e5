//! Our own CPU matmul kernels for the two weight types the default model uses, Q4_1 and Q8_0
//! (candle's Q4_1 dot product is scalar). Activations are quantized once per row to 8 bits in
//! blocks of 32 (llama.cpp's Q8_1 pairing: a scale and the block's scaled sum). Weights are
//! re-laid at load into tiles of eight rows per block, f16 scales widened to f32, with each
//! row's values in groups of four so one 256-bit register holds a group of all eight rows:
//! every multiply lands in its own row's lane, a block's integer dot products need no
//! horizontal sums, and one scale multiply serves eight rows. A tile is loaded once for up to
//! four activation rows, so a batch of many rows costs far less per row than one.
//! Every output is one integer dot product per block over its own weight row, scaled and
//! summed over blocks in a fixed order, so results do not depend on how rows are stacked,
//! tiled, batched or split across threads: stages and batches stay bit-identical to a
//! session run alone.

use crate::error::{EngineError, Result};
use crate::parallel::{check_rows, par_rows, SendPtr};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Values per quantization block.
const QK: usize = 32;
/// Weight rows per tile.
const TILE: usize = 8;
/// Activation rows one pass over a tile serves.
const ROWS: usize = 4;

/// Eight Q4_1 rows of one block: value = d * q + m, q in 0..16. `qs` is four 32-byte
/// groups; byte `h * 32 + row * 4 + b` holds value `4h + b` of that row in its low nibble
/// and value `4h + 16 + b` in its high one.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct TileQ4_1 {
    d: [f32; TILE],
    m: [f32; TILE],
    qs: [u8; 128],
}

impl Default for TileQ4_1 {
    fn default() -> Self {
        Self {
            d: [0.0; TILE],
            m: [0.0; TILE],
            qs: [0; 128],
        }
    }
}

/// Eight Q8_0 rows of one block: value = d * q. Byte `g * 32 + row * 4 + b` of `qs` holds
/// value `4g + b` of that row.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct TileQ8_0 {
    qs: [i8; 256],
    d: [f32; TILE],
}

impl Default for TileQ8_0 {
    fn default() -> Self {
        Self {
            qs: [0; 256],
            d: [0.0; TILE],
        }
    }
}

/// A weight matrix (rows = outputs, cols = inputs) in one of our kernels' layouts.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    /// Blocks per row.
    nb: usize,
    weights: Weights,
}

/// Tiles ordered (row quad, block): quad q's tiles are `q * nb .. (q + 1) * nb`.
enum Weights {
    Q4_1(Vec<TileQ4_1>),
    Q8_0(Vec<TileQ8_0>),
}

/// One activation block: 32 signed 8-bit values, their scale, and scale * sum(q).
#[derive(Clone, Copy, Default)]
#[repr(C, align(32))]
struct ActBlock {
    qs: [i8; 32],
    d: f32,
    s: f32,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl QuantMatrix {
    /// Whether a tensor type runs on these kernels.
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
    }

    /// Builds the matrix from the stored blocks of one or more tensors with equal column
    /// counts, stacked by rows in order (q/k/v, or gate/up, share one activation pass).
    pub fn from_qtensors(parts: &[&QTensor]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| EngineError::invalid("no tensors to stack"))?;
        let dtype = first.dtype();
        let (_, cols) = first.shape().dims2()?;
        if !Self::supports(dtype) || !cols.is_multiple_of(QK) || cols == 0 {
            return Err(EngineError::Unsupported(format!(
                "{dtype:?} with {cols} columns"
            )));
        }
        let nb = cols / QK;
        let block_bytes = dtype.type_size();
        let mut raw = Vec::new();
        let mut rows = 0;
        for p in parts {
            let (r, c) = p.shape().dims2()?;
            if p.dtype() != dtype || c != cols {
                return Err(EngineError::invalid(
                    "stacked tensors differ in type or width",
                ));
            }
            let data = p.data()?;
            if data.len() != r * nb * block_bytes {
                return Err(EngineError::invalid("tensor data has the wrong length"));
            }
            raw.extend_from_slice(&data);
            rows += r;
        }
        let octs = rows.div_ceil(TILE);
        // Block b of row r, as stored in the file.
        let block =
            |r: usize, b: usize| &raw[(r * nb + b) * block_bytes..(r * nb + b + 1) * block_bytes];
        let weights = match dtype {
            GgmlDType::Q4_1 => {
                let mut tiles = huge_vec(octs * nb, TileQ4_1::default());
                for r in 0..rows {
                    for b in 0..nb {
                        let src = block(r, b);
                        let (t, l) = (&mut tiles[(r / TILE) * nb + b], r % TILE);
                        t.d[l] = f16_at(src, 0);
                        t.m[l] = f16_at(src, 2);
                        for v in 0..QK {
                            let byte = src[4 + v % 16];
                            let q = if v < 16 { byte & 0x0F } else { byte >> 4 };
                            let (h, hi, b) = ((v % 16) / 4, v >= 16, v % 4);
                            t.qs[h * 32 + l * 4 + b] |= if hi { q << 4 } else { q };
                        }
                    }
                }
                Weights::Q4_1(tiles)
            }
            _ => {
                let mut tiles = huge_vec(octs * nb, TileQ8_0::default());
                for r in 0..rows {
                    for b in 0..nb {
                        let src = block(r, b);
                        let (t, l) = (&mut tiles[(r / TILE) * nb + b], r % TILE);
                        t.d[l] = f16_at(src, 0);
                        for (v, &q) in src[2..34].iter().enumerate() {
                            t.qs[(v / 4) * 32 + l * 4 + v % 4] = q as i8;
                        }
                    }
                }
                Weights::Q8_0(tiles)
            }
        };
        Ok(Self {
            rows,
            cols,
            nb,
            weights,
        })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` (m, cols) row-major times the transposed weights: (m, rows) row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        check_rows(x, m, self.cols)?;
        let mut acts = vec![ActBlock::default(); m * self.nb];
        par_rows(&mut acts, self.nb, 2 * self.cols, |i, dst| {
            quantize_row(&x[i * self.cols..(i + 1) * self.cols], dst)
        });
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let octs = self.rows.div_ceil(TILE);
        let acts = &acts[..];
        candle_core::utils::barrier_pool().execute_chunked(octs, |range| {
            let out_ptr = &out_ptr;
            let mut dots = [[0f32; TILE]; ROWS];
            for oct in range {
                let r0 = oct * TILE;
                let nr = (self.rows - r0).min(TILE);
                let mut i = 0;
                while i < m {
                    let take = (m - i).min(ROWS);
                    self.tile_dots(
                        oct,
                        &acts[i * self.nb..(i + take) * self.nb],
                        take,
                        &mut dots,
                    );
                    for (k, row_dots) in dots.iter().enumerate().take(take) {
                        for (j, &v) in row_dots[..nr].iter().enumerate() {
                            // SAFETY: (i + k, r0 + j) is inside the (m, rows) output, and each
                            // tile of rows is written by exactly one worker.
                            unsafe { *out_ptr.0.add((i + k) * self.rows + r0 + j) = v };
                        }
                    }
                    i += take;
                }
            }
        });
        Ok(out)
    }

    /// Dots of the eight rows of tile `oct` with `take` (1 to 4) activation rows laid end to
    /// end.
    fn tile_dots(&self, oct: usize, acts: &[ActBlock], take: usize, out: &mut [[f32; TILE]; ROWS]) {
        let nb = self.nb;
        let tiles = oct * nb..(oct + 1) * nb;
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: AVX2 and FMA are present (checked); the tile and activation slices hold
            // exactly `nb` blocks per row, which is all the kernels read.
            unsafe {
                match (&self.weights, take) {
                    (Weights::Q4_1(t), 1) => x86::q4_1_tile::<1>(&t[tiles], acts, out),
                    (Weights::Q4_1(t), 2) => x86::q4_1_tile::<2>(&t[tiles], acts, out),
                    (Weights::Q4_1(t), 3) => x86::q4_1_tile::<3>(&t[tiles], acts, out),
                    (Weights::Q4_1(t), _) => x86::q4_1_tile::<4>(&t[tiles], acts, out),
                    (Weights::Q8_0(t), 1) => x86::q8_0_tile::<1>(&t[tiles], acts, out),
                    (Weights::Q8_0(t), 2) => x86::q8_0_tile::<2>(&t[tiles], acts, out),
                    (Weights::Q8_0(t), 3) => x86::q8_0_tile::<3>(&t[tiles], acts, out),
                    (Weights::Q8_0(t), _) => x86::q8_0_tile::<4>(&t[tiles], acts, out),
                }
            }
            return;
        }
        for (k, o) in out.iter_mut().enumerate().take(take) {
            let a = &acts[k * nb..(k + 1) * nb];
            for (j, v) in o.iter_mut().enumerate() {
                *v = self.dot_portable(tiles.clone(), j, a);
            }
        }
    }

    /// One row's dot product without SIMD, for CPUs without AVX2: the same integer sums and
    /// the same fused scaling, block by block, as the SIMD kernels.
    fn dot_portable(&self, tiles: std::ops::Range<usize>, j: usize, a: &[ActBlock]) -> f32 {
        let mut acc = 0f32;
        match &self.weights {
            Weights::Q4_1(t) => {
                for (tile, act) in t[tiles].iter().zip(a) {
                    let mut sum = 0i32;
                    for v in 0..QK {
                        let (h, b) = ((v % 16) / 4, v % 4);
                        let byte = tile.qs[h * 32 + j * 4 + b];
                        let q = if v < 16 { byte & 0x0F } else { byte >> 4 };
                        sum += q as i32 * act.qs[v] as i32;
                    }
                    acc = (sum as f32).mul_add(tile.d[j] * act.d, acc);
                    acc = tile.m[j].mul_add(act.s, acc);
                }
            }
            Weights::Q8_0(t) => {
                for (tile, act) in t[tiles].iter().zip(a) {
                    let mut sum = 0i32;
                    for v in 0..QK {
                        sum += tile.qs[(v / 4) * 32 + j * 4 + v % 4] as i32 * act.qs[v] as i32;
                    }
                    acc = (sum as f32).mul_add(tile.d[j] * act.d, acc);
                }
            }
        }
        acc
    }
}

/// A vector of `n` copies of `v` whose pages the kernel is asked to back with huge pages
/// (Linux, transparent huge pages in "madvise" mode): decode streams every weight once per
/// token, and 4 KiB pages make that a stream of TLB misses.
fn huge_vec<T: Clone>(n: usize, v: T) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = out.as_ptr() as usize;
        let aligned = start.next_multiple_of(PAGE);
        let end = start + n * std::mem::size_of::<T>();
        if end > aligned + PAGE {
            // SAFETY: the range lies inside this vector's own (not yet used) allocation;
            // madvise only changes how the kernel backs it.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    (end - aligned) / PAGE * PAGE,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    out.resize(n, v);
    out
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Quantizes one row (a whole number of blocks) to 8-bit blocks with scale and scaled sum,
/// rounding to nearest even (what the SIMD conversion does, so both paths agree).
fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    for (chunk, dst) in x.chunks_exact(QK).zip(out) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: AVX2 is present and the chunk holds exactly 32 values.
            *dst = unsafe { x86::quantize_block(chunk) };
            continue;
        }
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; 32];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(chunk) {
            let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            *q = r;
            sum += r as i32;
        }
        *dst = ActBlock {
            qs,
            d,
            s: d * sum as f32,
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register arrays indexed by row and activation row
mod x86 {
    use super::{ActBlock, TileQ4_1, TileQ8_0, ROWS, TILE};
    use std::arch::x86_64::*;

    /// How far ahead of the current tile to prefetch: the weights stream from memory once per
    /// token, and the hardware prefetcher alone leaves the loads waiting.
    const PREFETCH_TILES: usize = 6;

    /// Asks for every cache line of the tile at `p`; past the end it is a harmless hint.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn prefetch<T>(p: *const T) {
        let p = p as *const i8;
        let mut at = 0;
        while at < std::mem::size_of::<T>() {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at));
            at += 64;
        }
    }

    /// One block of 32 activations to 8 bits: scale amax / 127, nearest-even rounding.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block(x: &[f32]) -> ActBlock {
        let p = x.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut m = _mm256_and_ps(v[0], abs_mask);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_and_ps(*vi, abs_mask));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let i = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)),
        ];
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01)));
        // Packing works within 128-bit lanes; the permute restores value order.
        let p16 = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let ordered = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut out = ActBlock {
            qs: [0; 32],
            d,
            s: d * total as f32,
        };
        _mm256_storeu_si256(out.qs.as_mut_ptr() as *mut __m256i, ordered);
        out
    }

    /// Eight Q4_1 rows against R activation rows (`nb` blocks apart in `acts`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4_1_tile<const R: usize>(
        tiles: &[TileQ4_1],
        acts: &[ActBlock],
        out: &mut [[f32; TILE]; ROWS],
    ) {
        let nb = tiles.len();
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let t = tiles.get_unchecked(b);
            prefetch(tiles.as_ptr().wrapping_add(b + PREFETCH_TILES));
            // Per row lane, at most 8 pairs of 15 x 127 per 16-bit sum: no saturation.
            let mut s16 = [_mm256_setzero_si256(); R];
            for h in 0..4 {
                let p = _mm256_load_si256(t.qs.as_ptr().add(32 * h) as *const __m256i);
                let lo = _mm256_and_si256(p, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
                for k in 0..R {
                    let q = acts.get_unchecked(k * nb + b).qs.as_ptr() as *const i32;
                    let xl = _mm256_set1_epi32(std::ptr::read_unaligned(q.add(h)));
                    let xh = _mm256_set1_epi32(std::ptr::read_unaligned(q.add(h + 4)));
                    let pair = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, xl),
                        _mm256_maddubs_epi16(hi, xh),
                    );
                    s16[k] = _mm256_add_epi16(s16[k], pair);
                }
            }
            let dv = _mm256_load_ps(t.d.as_ptr());
            let mv = _mm256_load_ps(t.m.as_ptr());
            for k in 0..R {
                let a = acts.get_unchecked(k * nb + b);
                let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[k], ones));
                let scale = _mm256_mul_ps(dv, _mm256_set1_ps(a.d));
                acc[k] = _mm256_fmadd_ps(sum, scale, acc[k]);
                acc[k] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a.s), acc[k]);
            }
        }
        for k in 0..R {
            _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]);
        }
    }

    /// Eight Q8_0 rows against R activation rows (`nb` blocks apart in `acts`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q8_0_tile<const R: usize>(
        tiles: &[TileQ8_0],
        acts: &[ActBlock],
        out: &mut [[f32; TILE]; ROWS],
    ) {
        let nb = tiles.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let t = tiles.get_unchecked(b);
            prefetch(tiles.as_ptr().wrapping_add(b + PREFETCH_TILES));
            let mut s32 = [_mm256_setzero_si256(); R];
            for g in 0..8 {
                let w = _mm256_load_si256(t.qs.as_ptr().add(32 * g) as *const __m256i);
                let aw = _mm256_sign_epi8(w, w);
                for k in 0..R {
                    let q = acts.get_unchecked(k * nb + b).qs.as_ptr() as *const i32;
                    let x = _mm256_set1_epi32(std::ptr::read_unaligned(q.add(g)));
                    // |w| as unsigned times x with w's sign moved onto it; a pair of products
                    // fits 16 bits, two pairs may not, so each widens at once.
                    let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
                    s32[k] = _mm256_add_epi32(s32[k], _mm256_madd_epi16(p, ones));
                }
            }
            let dv = _mm256_load_ps(t.d.as_ptr());
            for k in 0..R {
                let a = acts.get_unchecked(k * nb + b);
                let scale = _mm256_mul_ps(dv, _mm256_set1_ps(a.d));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[k]), scale, acc[k]);
            }
        }
        for k in 0..R {
            _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]);
        }
    }
}
