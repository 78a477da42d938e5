//! Comparing a stage result with its recomputation on another peer. Floats differ across
//! hardware and batch shapes, so results are compared with tolerances, not hashes: hidden
//! states row by row (each position) by cosine similarity and relative L2 error, last stages
//! by token agreement and the distance between log-probabilities. Between "clearly the same"
//! and "clearly different" lies "inconclusive": one more replica decides.
//!
//! The thresholds were calibrated on honest runs (`potluck bench --checks`; see
//! `docs/trust.md`): honest pairs sit orders of magnitude inside them.

use potluck_protocol::messages::{DeviceKind, NumericClass, StageOutputWire};

/// The three outcomes of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Within tolerance.
    Pass,
    /// Neither clearly the same nor clearly different.
    Inconclusive,
    /// Clearly different.
    Fail,
}

impl Verdict {
    /// Its name in logs and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Fail => "fail",
        }
    }
}

/// How far two honest results may be apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Every row's cosine similarity at least this passes...
    pub cos_pass: f64,
    /// ...and below this fails.
    pub cos_fail: f64,
    /// Every row's relative L2 error at most this passes...
    pub rel_pass: f64,
    /// ...and above this fails.
    pub rel_fail: f64,
    /// Log-probabilities (of the chosen token and shared top alternatives) this close pass...
    pub logprob_pass: f64,
    /// ...and further apart than this fail.
    pub logprob_fail: f64,
}

/// Two results computed the same way (same weights type, same kind of device).
pub const SAME_CLASS: Tolerance = Tolerance {
    cos_pass: 0.9995,
    cos_fail: 0.995,
    rel_pass: 0.01,
    rel_fail: 0.03,
    logprob_pass: 0.02,
    logprob_fail: 0.2,
};

/// Results from different kinds of device (a GPU's kernels round differently from a
/// CPU's): wider, still far from any corruption worth making.
pub const CROSS_DEVICE: Tolerance = Tolerance {
    cos_pass: 0.999,
    cos_fail: 0.99,
    rel_pass: 0.02,
    rel_fail: 0.06,
    logprob_pass: 0.05,
    logprob_fail: 0.3,
};

/// The tolerance for results computed as `a` and `b` say.
pub fn tolerance(a: &NumericClass, b: &NumericClass) -> Tolerance {
    // The same kind of device; which GPU index does not matter.
    let same_device = matches!(
        (&a.device, &b.device),
        (DeviceKind::Cpu, DeviceKind::Cpu) | (DeviceKind::Cuda(_), DeviceKind::Cuda(_))
    );
    if a.weights == b.weights && a.accumulation == b.accumulation && same_device {
        SAME_CLASS
    } else {
        CROSS_DEVICE
    }
}

/// A comparison's outcome and the distances behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// What the distances say.
    pub verdict: Verdict,
    /// Lowest row cosine similarity (hidden states), or 1.
    pub cos: f64,
    /// Highest row relative L2 error (hidden states), or 0.
    pub rel_l2: f64,
    /// Largest log-probability difference (tokens), or 0.
    pub logprob: f64,
    /// Whether the tokens agree (tokens), or true.
    pub same_token: bool,
}

impl Comparison {
    fn shape(why: &str) -> (Self, String) {
        (
            Self {
                verdict: Verdict::Fail,
                cos: 0.0,
                rel_l2: f64::INFINITY,
                logprob: f64::INFINITY,
                same_token: false,
            },
            why.to_string(),
        )
    }

    /// How much worse than `other` its distances are, verdict aside: lower cosine, then
    /// higher relative L2, then larger log-probability difference.
    pub fn severity(&self, other: &Self) -> std::cmp::Ordering {
        other
            .cos
            .total_cmp(&self.cos)
            .then(self.rel_l2.total_cmp(&other.rel_l2))
            .then(self.logprob.total_cmp(&other.logprob))
    }

    /// The distances, for logs and the audit log.
    pub fn detail(&self) -> String {
        format!(
            "cos {:.6} rel_l2 {:.2e} logprob {:.2e} same_token {}",
            self.cos, self.rel_l2, self.logprob, self.same_token
        )
    }
}

/// Least cosine similarity at which two sentence vectors agree. Honest recomputations on
/// CPUs agree to 1e-6 (see docs/batch.md); a corrupted vector falls far below.
pub const EMBED_AGREEMENT: f32 = 0.999;

/// Whether two embedding answers agree: as many vectors, each pair of the same width and
/// within [`EMBED_AGREEMENT`] (batch quorums and online embedding checks alike).
pub fn vectors_agree(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.len() == y.len() && row_distances(x, y, x.len()).0 >= f64::from(EMBED_AGREEMENT)
        })
}

/// Per-row cosine similarity and relative L2 error of `a` against reference `b`, both
/// `rows` × `cols`: the worst row of each.
pub fn row_distances(a: &[f32], b: &[f32], cols: usize) -> (f64, f64) {
    let mut worst_cos = 1.0f64;
    let mut worst_rel = 0.0f64;
    for (ra, rb) in a.chunks(cols.max(1)).zip(b.chunks(cols.max(1))) {
        let (mut dot, mut na, mut nb, mut diff) = (0f64, 0f64, 0f64, 0f64);
        for (&x, &y) in ra.iter().zip(rb) {
            let (x, y) = (f64::from(x), f64::from(y));
            dot += x * y;
            na += x * x;
            nb += y * y;
            diff += (x - y) * (x - y);
        }
        let cos = if na == 0.0 && nb == 0.0 {
            1.0
        } else if na == 0.0 || nb == 0.0 {
            0.0
        } else {
            dot / (na.sqrt() * nb.sqrt())
        };
        let rel = if nb == 0.0 {
            if diff == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (diff / nb).sqrt()
        };
        worst_cos = worst_cos.min(if cos.is_nan() { 0.0 } else { cos });
        worst_rel = worst_rel.max(if rel.is_nan() { f64::INFINITY } else { rel });
    }
    (worst_cos, worst_rel)
}

/// Compares `checked` (the result under check) with `reference` (its recomputation).
/// Returns the comparison and, when the shapes alone decide it, why.
pub fn compare(
    checked: &StageOutputWire,
    reference: &StageOutputWire,
    tol: &Tolerance,
) -> (Comparison, String) {
    match (checked, reference) {
        (StageOutputWire::Hidden(a), StageOutputWire::Hidden(b)) => {
            let dims = b.dims();
            if a.dims() != dims || dims.len() != 2 {
                return Comparison::shape("hidden states of another shape");
            }
            let (Ok(va), Ok(vb)) = (a.to_f32(), b.to_f32()) else {
                return Comparison::shape("hidden states that do not decode");
            };
            let (cos, rel_l2) = row_distances(&va, &vb, dims[1]);
            let verdict = if cos >= tol.cos_pass && rel_l2 <= tol.rel_pass {
                Verdict::Pass
            } else if cos < tol.cos_fail || rel_l2 > tol.rel_fail {
                Verdict::Fail
            } else {
                Verdict::Inconclusive
            };
            let c = Comparison {
                verdict,
                cos,
                rel_l2,
                logprob: 0.0,
                same_token: true,
            };
            let d = c.detail();
            (c, d)
        }
        (
            StageOutputWire::Token {
                token: ta,
                logprob: la,
                top: top_a,
            },
            StageOutputWire::Token {
                token: tb,
                logprob: lb,
                top: top_b,
            },
        ) => {
            let c = if ta == tb {
                // The chosen token's log-probability and those of the alternatives both list.
                let mut d = (f64::from(*la) - f64::from(*lb)).abs();
                for (t, l) in top_a {
                    if let Some((_, m)) = top_b.iter().find(|(u, _)| u == t) {
                        d = d.max((f64::from(*l) - f64::from(*m)).abs());
                    }
                }
                let d = if d.is_nan() { f64::INFINITY } else { d };
                Comparison {
                    verdict: if d <= tol.logprob_pass {
                        Verdict::Pass
                    } else if d > tol.logprob_fail {
                        Verdict::Fail
                    } else {
                        Verdict::Inconclusive
                    },
                    cos: 1.0,
                    rel_l2: 0.0,
                    logprob: d,
                    same_token: true,
                }
            } else {
                // A near tie can flip between honest machines; anything else is a wrong token.
                let tie = top_b.iter().find(|(u, _)| u == ta).map(|(_, m)| {
                    let d = (f64::from(*m) - f64::from(*lb)).abs();
                    if d.is_nan() {
                        f64::INFINITY
                    } else {
                        d
                    }
                });
                Comparison {
                    verdict: match tie {
                        Some(d) if d <= tol.logprob_fail => Verdict::Inconclusive,
                        _ => Verdict::Fail,
                    },
                    cos: 1.0,
                    rel_l2: 0.0,
                    logprob: tie.unwrap_or(f64::INFINITY),
                    same_token: false,
                }
            };
            let d = c.detail();
            (c, d)
        }
        _ => Comparison::shape("a result of another kind"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_protocol::tensor::{WireDType, WireTensor};

    fn hidden(v: &[f32], rows: usize) -> StageOutputWire {
        StageOutputWire::Hidden(
            WireTensor::from_f32(v, &[rows, v.len() / rows], WireDType::F32).unwrap(),
        )
    }

    fn token(token: u32, logprob: f32, top: &[(u32, f32)]) -> StageOutputWire {
        StageOutputWire::Token {
            token,
            logprob,
            top: top.to_vec(),
        }
    }

    #[test]
    fn hidden_states_pass_within_tolerance_and_each_row_counts() {
        let b: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let tiny: Vec<f32> = b.iter().map(|x| x * (1.0 + 1e-5)).collect();
        assert_eq!(
            compare(&hidden(&tiny, 4), &hidden(&b, 4), &SAME_CLASS)
                .0
                .verdict,
            Verdict::Pass
        );
        // One row of four replaced: the whole-tensor cosine would hide it, rows do not.
        let mut one_row = b.clone();
        one_row[16..32].iter_mut().for_each(|x| *x = -*x);
        let (c, _) = compare(&hidden(&one_row, 4), &hidden(&b, 4), &SAME_CLASS);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.cos < 0.0, "{c:?}");
        // Zeros, and another shape.
        let zeros = vec![0.0; 64];
        assert_eq!(
            compare(&hidden(&zeros, 4), &hidden(&b, 4), &SAME_CLASS)
                .0
                .verdict,
            Verdict::Fail
        );
        assert_eq!(
            compare(&hidden(&b, 2), &hidden(&b, 4), &SAME_CLASS)
                .0
                .verdict,
            Verdict::Fail
        );
        // Between the thresholds: inconclusive.
        let mid: Vec<f32> = b
            .iter()
            .enumerate()
            .map(|(i, x)| x + if i % 2 == 0 { 0.015 } else { -0.015 })
            .collect();
        let (c, _) = compare(&hidden(&mid, 4), &hidden(&b, 4), &SAME_CLASS);
        assert_eq!(c.verdict, Verdict::Inconclusive, "{c:?}");
    }

    #[test]
    fn tokens_must_agree_unless_a_near_tie_flipped() {
        let reference = token(7, -0.5, &[(7, -0.5), (9, -1.2), (3, -4.0)]);
        let same = token(7, -0.501, &[(7, -0.501), (9, -1.199)]);
        assert_eq!(
            compare(&same, &reference, &SAME_CLASS).0.verdict,
            Verdict::Pass
        );
        let drifted = token(7, -0.9, &[(7, -0.9)]);
        assert_eq!(
            compare(&drifted, &reference, &SAME_CLASS).0.verdict,
            Verdict::Fail
        );
        let wrong = token(3, -4.0, &[]);
        assert_eq!(
            compare(&wrong, &reference, &SAME_CLASS).0.verdict,
            Verdict::Fail
        );
        let tie_ref = token(7, -0.69, &[(7, -0.69), (9, -0.70)]);
        let flipped = token(9, -0.69, &[(9, -0.69), (7, -0.70)]);
        assert_eq!(
            compare(&flipped, &tie_ref, &SAME_CLASS).0.verdict,
            Verdict::Inconclusive
        );
        assert_eq!(
            compare(&hidden(&[1.0; 4], 1), &reference, &SAME_CLASS)
                .0
                .verdict,
            Verdict::Fail
        );
    }
}
