//! Small statistics used by every evaluation: means with their standard error, and percentile
//! bootstrap intervals from our own seeded generator.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// A mean with its standard error (sample standard deviation over `sqrt(n)`, as
/// lm-evaluation-harness reports it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanSe {
    pub mean: f64,
    pub stderr: f64,
    pub n: usize,
}

pub fn mean_se(xs: &[f64]) -> MeanSe {
    let n = xs.len();
    if n == 0 {
        return MeanSe {
            mean: f64::NAN,
            stderr: f64::NAN,
            n,
        };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let stderr = if n > 1 {
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    } else {
        f64::NAN
    };
    MeanSe { mean, stderr, n }
}

/// A 95% percentile-bootstrap interval of the mean: `resamples` draws with replacement from a
/// generator seeded by `seed`.
pub fn bootstrap_ci(xs: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    let n = xs.len();
    if n == 0 || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = Rng::new(seed, "bootstrap");
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| xs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((q * (resamples - 1) as f64).round() as usize).min(resamples - 1);
        means[i]
    };
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_standard_error_by_hand() {
        // mean 2.5, sample variance 5/3, se = sqrt(5/3 / 4).
        let m = mean_se(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m.mean, 2.5);
        assert!((m.stderr - (5.0f64 / 12.0).sqrt()).abs() < 1e-12);
        // Binary outcomes: sqrt(p (1 - p) / (n - 1)).
        let m = mean_se(&[1.0, 0.0, 0.0, 1.0, 1.0]);
        assert!((m.stderr - (0.6f64 * 0.4 / 4.0).sqrt()).abs() < 1e-12);
        assert!(mean_se(&[]).mean.is_nan());
    }

    #[test]
    fn bootstrap_interval_covers_the_mean_and_is_seeded() {
        let xs: Vec<f64> = (0..200).map(|i| (i % 5 == 0) as u8 as f64).collect();
        let (lo, hi) = bootstrap_ci(&xs, 1000, 1);
        assert!(lo < 0.2 && 0.2 < hi && hi - lo < 0.15, "{lo} {hi}");
        assert_eq!(bootstrap_ci(&xs, 1000, 1), (lo, hi));
        // Constant data: a zero-width interval.
        assert_eq!(bootstrap_ci(&[0.0; 10], 100, 1), (0.0, 0.0));
    }
}
