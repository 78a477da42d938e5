//! Random draws for the simulator: a seeded stream per concern (so adding a draw to one
//! concern never shifts another's) and the distributions scenarios name.

use potluck_engine::rng::Rng;
use serde::{Deserialize, Serialize};

/// A seeded stream of draws.
#[derive(Debug, Clone)]
pub struct Draws {
    rng: Rng,
}

impl Draws {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
        }
    }

    /// An independent stream for `concern`, fixed by this stream's seed and the name alone.
    pub fn fork(seed: u64, concern: &str) -> Self {
        let tag = potluck_protocol::signed::digest(concern.as_bytes());
        let mut mix = [0u8; 8];
        mix.copy_from_slice(&tag[..8]);
        Self::new(seed ^ u64::from_le_bytes(mix))
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// An exponential draw with mean `mean`.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// 32 random bytes (a peer's key).
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        out
    }

    /// 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Index into `shares` drawn in proportion to them (the last one if they are all 0).
    pub fn pick(&mut self, shares: &[f64]) -> usize {
        let total: f64 = shares.iter().map(|s| s.max(0.0)).sum();
        let mut x = self.unit() * total;
        for (i, s) in shares.iter().enumerate() {
            x -= s.max(0.0);
            if x < 0.0 {
                return i;
            }
        }
        shares.len().saturating_sub(1)
    }
}

/// A distribution a scenario names, in whatever unit the field says (hours, tokens).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Dist {
    /// Always `value`.
    Fixed {
        /// The value.
        value: f64,
    },
    /// Uniform over [low, high).
    Uniform {
        /// Lower end.
        low: f64,
        /// Upper end.
        high: f64,
    },
    /// Exponential with mean `mean`.
    Exponential {
        /// Its mean.
        mean: f64,
    },
    /// Weibull with `shape` k and `scale` λ: `λ (-ln U)^(1/k)`.
    Weibull {
        /// k.
        shape: f64,
        /// λ.
        scale: f64,
    },
    /// Log-normal: `exp(mu + sigma Z)`.
    LogNormal {
        /// Mean of the logarithm.
        mu: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
    },
}

impl Dist {
    /// One draw, never negative.
    pub fn sample(&self, d: &mut Draws) -> f64 {
        let x = match *self {
            Dist::Fixed { value } => value,
            Dist::Uniform { low, high } => low + (high - low) * d.unit(),
            Dist::Exponential { mean } => d.exponential(mean),
            Dist::Weibull { shape, scale } => {
                scale * (-(1.0 - d.unit()).ln()).powf(1.0 / shape.max(1e-6))
            }
            Dist::LogNormal { mu, sigma } => (mu + sigma * d.normal()).exp(),
        };
        x.max(0.0)
    }

    /// Its mean, for reports.
    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Fixed { value } => value,
            Dist::Uniform { low, high } => (low + high) / 2.0,
            Dist::Exponential { mean } => mean,
            Dist::Weibull { shape, scale } => scale * gamma(1.0 + 1.0 / shape),
            Dist::LogNormal { mu, sigma } => (mu + sigma * sigma / 2.0).exp(),
        }
    }

    /// Why its parameters make no distribution, if they do not.
    pub fn invalid(&self) -> Option<String> {
        let ok = match *self {
            Dist::Fixed { value } => value.is_finite() && value >= 0.0,
            Dist::Uniform { low, high } => low.is_finite() && high.is_finite() && low <= high,
            Dist::Exponential { mean } => mean.is_finite() && mean > 0.0,
            Dist::Weibull { shape, scale } => shape > 0.0 && scale > 0.0 && scale.is_finite(),
            Dist::LogNormal { mu, sigma } => mu.is_finite() && sigma.is_finite() && sigma >= 0.0,
        };
        (!ok).then(|| format!("{self:?} is not a distribution"))
    }
}

/// Γ(x) for x > 0 (Lanczos, g = 7), for the Weibull mean.
fn gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum: f64 = G[0]
        + G[1..]
            .iter()
            .enumerate()
            .map(|(i, g)| g / (x + i as f64 + 1.0))
            .sum::<f64>();
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_mean(dist: Dist, n: usize) -> f64 {
        let mut d = Draws::new(7);
        (0..n).map(|_| dist.sample(&mut d)).sum::<f64>() / n as f64
    }

    #[test]
    fn draws_have_the_means_their_parameters_say() {
        for dist in [
            Dist::Exponential { mean: 3.0 },
            Dist::Weibull {
                shape: 1.5,
                scale: 2.0,
            },
            Dist::LogNormal {
                mu: 0.5,
                sigma: 0.4,
            },
            Dist::Uniform {
                low: 10.0,
                high: 20.0,
            },
        ] {
            let (got, want) = (sample_mean(dist, 200_000), dist.mean());
            assert!(
                (got - want).abs() < 0.02 * want,
                "{dist:?}: {got} vs {want}"
            );
        }
        assert!((gamma(5.0) - 24.0).abs() < 1e-9);
    }

    #[test]
    fn streams_are_fixed_by_seed_and_concern() {
        let a: Vec<f64> = (0..4)
            .map({
                let mut d = Draws::fork(1, "peers");
                move |_| d.unit()
            })
            .collect();
        let mut same = Draws::fork(1, "peers");
        let mut other = Draws::fork(1, "load");
        assert_eq!(a, (0..4).map(|_| same.unit()).collect::<Vec<_>>());
        assert_ne!(a[0], other.unit());
        let bad = Dist::Weibull {
            shape: 0.0,
            scale: 1.0,
        };
        assert!(bad.invalid().is_some());
    }
}
