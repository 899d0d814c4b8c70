//! Small statistics used by every evaluation: means with their standard error, percentile
//! bootstrap intervals from our own seeded generator, Wilson intervals of proportions, Holm's
//! multiple-comparison correction, and a paired, hierarchical bootstrap that compares two arms of
//! an experiment (a defence against the undefended model, or two defences) under the same attack
//! seeds and prompts.
//!
//! Just over 700 lines: the estimators, and their tests by hand and against enumerated
//! distributions, together.

use serde::{Deserialize, Serialize};

use crate::util::rng::Rng;

/// A mean with its standard error (sample standard deviation over `sqrt(n)`, as
/// lm-evaluation-harness reports it).
///
/// JSON has no NaN: serde_json writes an undefined figure (the standard error of one item) as
/// `null`, and it reads back as NaN, so a cached result that has one still loads.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanSe {
    #[serde(deserialize_with = "null_as_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub stderr: f64,
    pub n: usize,
}

/// A number, or NaN where the JSON says `null` (how serde_json writes NaN).
pub fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
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

/// The two-sided 95% normal quantile, `Phi^-1(0.975)`.
const Z_975: f64 = 1.959963984540054;

/// The 80% normal quantile, `Phi^-1(0.80)` (power of a minimum detectable difference).
const Z_80: f64 = 0.8416212335729143;

/// The 95% Wilson score interval of a proportion `successes / n` (z = 1.959963984540054).
///
/// Unlike the normal ("Wald") interval it stays inside `[0, 1]` and has a non-zero width at 0 and
/// at `n` successes. Returns `(NaN, NaN)` when `n == 0` or when `successes > n`.
pub fn wilson_ci(successes: usize, n: usize) -> (f64, f64) {
    if n == 0 || successes > n {
        return (f64::NAN, f64::NAN);
    }
    let nf = n as f64;
    let p = successes as f64 / nf;
    let z2 = Z_975 * Z_975;
    let denom = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / denom;
    let half = Z_975 / denom * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt();
    // The bounds are exactly 0 and 1 at the extremes; pin them so rounding cannot leak outside.
    let lo = if successes == 0 {
        0.0
    } else {
        (centre - half).clamp(0.0, 1.0)
    };
    let hi = if successes == n {
        1.0
    } else {
        (centre + half).clamp(0.0, 1.0)
    };
    (lo, hi)
}

/// Holm-Bonferroni adjusted p-values, returned in the input order.
///
/// Step-down: with the `m` non-NaN p-values sorted ascending as `p_(0) <= ... <= p_(m-1)`, the
/// adjusted value of `p_(i)` is `max over j <= i of min(1, (m - j) * p_(j))`. NaN inputs stay NaN
/// and do not count in `m`. Rejecting where the adjusted value is below `alpha` controls the
/// family-wise error rate at `alpha`.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| !p[i].is_nan()).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let m = order.len();
    let mut adjusted = vec![f64::NAN; p.len()];
    let mut running = 0.0f64;
    for (j, &i) in order.iter().enumerate() {
        running = running.max(((m - j) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// One arm's per-item values: `values[d][s][i]` for defence seed d, attack seed s (the same
/// attack seeds, in the same order, in both arms of a comparison: that is the pairing) and prompt
/// i (the same prompts in the same order in both arms). An arm without defence seeds (the
/// undefended model) has d = 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmValues {
    /// `values[defence seed][attack seed][item]`; every inner level has the same length.
    pub values: Vec<Vec<Vec<f64>>>,
}

/// Which direction of the difference (a - b) the comparison is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Arm a is lower than arm b (the interval, and after Holm the adjusted p-value, say so).
    Lower,
    /// Arm a is higher than arm b.
    Higher,
    /// The data do not settle the direction.
    Undetermined,
}

/// The result of comparing two arms with [`paired_bootstrap`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    /// Mean of arm a over all its (defence seed, attack seed, item) values.
    pub mean_a: f64,
    /// Mean of arm b over all its (defence seed, attack seed, item) values.
    pub mean_b: f64,
    /// mean_a - mean_b (the point estimate on the data as observed)
    pub diff: f64,
    /// 95% percentile-bootstrap interval of the difference
    pub ci95: (f64, f64),
    /// bootstrap standard deviation of the difference
    pub se: f64,
    /// two-sided bootstrap p-value for "no difference": min(1, 2 * min(P*(d <= 0), P*(d >= 0)))
    /// over the resampled differences, floored at 1/(resamples+1)
    pub p_value: f64,
    /// Holm-adjusted p-value within its family (None until `holm_verdicts` is applied)
    pub p_holm: Option<f64>,
    /// minimum detectable difference at 5% two-sided and 80% power: (1.959964 + 0.841621) * se
    pub mdd: f64,
    /// Direction of the difference: from the interval alone, or after [`holm_verdicts`] from the
    /// interval and the Holm-adjusted p-value.
    pub verdict: Verdict,
    /// Number of (paired) attack seeds.
    pub attack_seeds: usize,
    /// Number of defence seeds of arm a.
    pub defence_seeds_a: usize,
    /// Number of defence seeds of arm b.
    pub defence_seeds_b: usize,
    /// Number of (paired) items per (defence seed, attack seed).
    pub items: usize,
    /// Number of bootstrap resamples.
    pub resamples: usize,
}

/// An arm checked for shape and flattened row-major as `[d][s][i]`.
struct Flat {
    defences: usize,
    seeds: usize,
    items: usize,
    data: Vec<f64>,
}

impl Flat {
    /// Check that `arm` is non-empty, rectangular and finite; `name` names it in errors.
    fn new(arm: &ArmValues, name: &str) -> std::result::Result<Self, String> {
        let defences = arm.values.len();
        let first = arm
            .values
            .first()
            .ok_or_else(|| format!("arm {name} is empty: it has no defence seeds"))?;
        let seeds = first.len();
        let items = first
            .first()
            .ok_or_else(|| format!("arm {name} is empty: defence seed 0 has no attack seeds"))?
            .len();
        if items == 0 {
            return Err(format!(
                "arm {name} is empty: defence seed 0, attack seed 0 has no items"
            ));
        }
        let mut data = Vec::with_capacity(defences * seeds * items);
        for (d, per_seed) in arm.values.iter().enumerate() {
            if per_seed.len() != seeds {
                return Err(format!(
                    "arm {name} is ragged: defence seed {d} has {} attack seeds but defence seed 0 \
                     has {seeds}",
                    per_seed.len()
                ));
            }
            for (s, row) in per_seed.iter().enumerate() {
                if row.len() != items {
                    return Err(format!(
                        "arm {name} is ragged: defence seed {d}, attack seed {s} has {} items but \
                         defence seed 0, attack seed 0 has {items}",
                        row.len()
                    ));
                }
                if let Some(i) = row.iter().position(|v| !v.is_finite()) {
                    return Err(format!(
                        "arm {name} has a non-finite value ({}) at defence seed {d}, attack seed \
                         {s}, item {i}",
                        row[i]
                    ));
                }
                data.extend_from_slice(row);
            }
        }
        Ok(Self {
            defences,
            seeds,
            items,
            data,
        })
    }

    /// Mean over all values.
    fn mean(&self) -> f64 {
        self.data.iter().sum::<f64>() / self.data.len() as f64
    }

    /// Mean over a resample given as multiplicities: defence seed d drawn `def_w[d]` times,
    /// attack seed s `seed_w[s]` times, item i `item_w[i]` times (each summing to its length).
    fn resampled_mean(&self, def_w: &[usize], seed_w: &[usize], item_w: &[usize]) -> f64 {
        let mut total = 0.0;
        for (d, &wd) in def_w.iter().enumerate().filter(|(_, &w)| w > 0) {
            for (s, &ws) in seed_w.iter().enumerate().filter(|(_, &w)| w > 0) {
                let start = (d * self.seeds + s) * self.items;
                let row = &self.data[start..start + self.items];
                let dot: f64 = row.iter().zip(item_w).map(|(x, &w)| x * w as f64).sum();
                total += (wd * ws) as f64 * dot;
            }
        }
        total / (self.defences * self.seeds * self.items) as f64
    }
}

/// Fill `counts` with the multiplicities of `counts.len()` draws with replacement from
/// `0..counts.len()`. A single unit is always drawn once, without consuming randomness.
fn draw_counts(rng: &mut Rng, counts: &mut [usize]) {
    let n = counts.len();
    counts.fill(0);
    if n == 1 {
        counts[0] = 1;
        return;
    }
    for _ in 0..n {
        counts[rng.below(n)] += 1;
    }
}

/// The resampled differences (mean of a minus mean of b), one per bootstrap draw, in draw order.
fn paired_bootstrap_draws(a: &Flat, b: &Flat, resamples: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed, "paired-bootstrap");
    let mut seed_w = vec![0; a.seeds];
    let mut def_a = vec![0; a.defences];
    let mut def_b = vec![0; b.defences];
    let mut item_w = vec![0; a.items];
    (0..resamples)
        .map(|_| {
            draw_counts(&mut rng, &mut seed_w);
            draw_counts(&mut rng, &mut def_a);
            draw_counts(&mut rng, &mut def_b);
            draw_counts(&mut rng, &mut item_w);
            a.resampled_mean(&def_a, &seed_w, &item_w) - b.resampled_mean(&def_b, &seed_w, &item_w)
        })
        .collect()
}

/// The `q` quantile of sorted, non-empty `xs` (the element at rank `round(q * (n - 1))`, the same
/// rule as [`bootstrap_ci`]).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    sorted[((q * (n - 1) as f64).round() as usize).min(n - 1)]
}

/// Compare arm `a` with arm `b` (difference a - b) by a paired, hierarchical percentile
/// bootstrap with `resamples` draws from a generator seeded by `seed` (same seed, same numbers).
///
/// Each draw resamples, with replacement and in this order:
/// 1. the attack seeds: one draw shared by both arms (they were attacked with the same seeds:
///    this is the pairing, which removes the common seed-to-seed variation from the difference);
/// 2. arm a's defence seeds, then 3. arm b's defence seeds, each arm independently (they are
///    independent trainings);
/// 4. the prompts: one draw shared by both arms (paired, as they are scored on the same prompts).
///
/// The statistic is the mean of a over the drawn (defence seed, attack seed, prompt) cells minus
/// the same for b. A level with a single unit is not resampled, so with one attack seed and one
/// defence seed per arm only the prompts are. From the resampled differences come the 95%
/// percentile interval, their (population) standard deviation `se`, the two-sided p-value
/// `min(1, 2 * min(P*(d <= 0), P*(d >= 0)))` floored at `1 / (resamples + 1)`, and the minimum
/// detectable difference `(z_0.975 + z_0.80) * se`. The verdict is `Lower` when the interval lies
/// below 0, `Higher` when it lies above, else `Undetermined`; [`holm_verdicts`] later tightens it
/// for a family of comparisons.
///
/// Errors, naming the problem: an empty arm (no defence seeds, attack seeds or items), a ragged
/// arm, arms with different numbers of attack seeds or items, a non-finite value, or
/// `resamples == 0`.
pub fn paired_bootstrap(
    a: &ArmValues,
    b: &ArmValues,
    resamples: usize,
    seed: u64,
) -> std::result::Result<PairedDiff, String> {
    if resamples == 0 {
        return Err("resamples must be at least 1".to_string());
    }
    let fa = Flat::new(a, "a")?;
    let fb = Flat::new(b, "b")?;
    if fa.seeds != fb.seeds {
        return Err(format!(
            "arms are not paired: arm a has {} attack seeds, arm b has {}",
            fa.seeds, fb.seeds
        ));
    }
    if fa.items != fb.items {
        return Err(format!(
            "arms are not paired: arm a has {} items per attack seed, arm b has {}",
            fa.items, fb.items
        ));
    }
    let (mean_a, mean_b) = (fa.mean(), fb.mean());
    let diff = mean_a - mean_b;

    let mut draws = paired_bootstrap_draws(&fa, &fb, resamples, seed);
    draws.sort_by(f64::total_cmp);
    let ci95 = (percentile(&draws, 0.025), percentile(&draws, 0.975));
    let r = resamples as f64;
    let centre = draws.iter().sum::<f64>() / r;
    let se = (draws.iter().map(|d| (d - centre).powi(2)).sum::<f64>() / r).sqrt();
    let at_most_zero = draws.iter().filter(|&&d| d <= 0.0).count() as f64 / r;
    let at_least_zero = draws.iter().filter(|&&d| d >= 0.0).count() as f64 / r;
    let p_value = (2.0 * at_most_zero.min(at_least_zero))
        .min(1.0)
        .max(1.0 / (r + 1.0));
    let verdict = if ci95.1 < 0.0 {
        Verdict::Lower
    } else if ci95.0 > 0.0 {
        Verdict::Higher
    } else {
        Verdict::Undetermined
    };
    Ok(PairedDiff {
        mean_a,
        mean_b,
        diff,
        ci95,
        se,
        p_value,
        p_holm: None,
        mdd: (Z_975 + Z_80) * se,
        verdict,
        attack_seeds: fa.seeds,
        defence_seeds_a: fa.defences,
        defence_seeds_b: fb.defences,
        items: fa.items,
        resamples,
    })
}

/// Holm correction over a family of comparisons: sets `p_holm` and makes each verdict
/// Lower/Higher only where the adjusted p-value is below `alpha` (and the interval excludes 0),
/// else Undetermined.
pub fn holm_verdicts(family: &mut [PairedDiff], alpha: f64) {
    let p: Vec<f64> = family.iter().map(|c| c.p_value).collect();
    for (c, adjusted) in family.iter_mut().zip(holm(&p)) {
        c.p_holm = Some(adjusted);
        // A NaN adjusted p-value is never significant.
        let significant = adjusted < alpha;
        c.verdict = if significant && c.ci95.1 < 0.0 {
            Verdict::Lower
        } else if significant && c.ci95.0 > 0.0 {
            Verdict::Higher
        } else {
            Verdict::Undetermined
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(x: f64, y: f64, tol: f64) -> bool {
        (x - y).abs() <= tol
    }

    /// An arm with one defence seed.
    fn arm1(rows: Vec<Vec<f64>>) -> ArmValues {
        ArmValues { values: vec![rows] }
    }

    #[test]
    fn an_undefined_standard_error_survives_a_json_round_trip() {
        // One item has no standard error; the cached result must still load (a stability
        // task's MMLU subjects with one item were recomputed on every resume).
        let m = mean_se(&[0.5]);
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("null"), "{text}");
        let back: MeanSe = serde_json::from_str(&text).unwrap();
        assert_eq!((back.mean, back.n), (0.5, 1));
        assert!(back.stderr.is_nan());
    }

    #[test]
    fn wilson_interval_by_hand() {
        // z^2 = 3.8415. 3 of 10: centre (0.3 + 0.19207) / 1.38415 = 0.35550, half-width
        // 1.95996 / 1.38415 * sqrt(0.021 + 0.0096037) = 0.24771 -> [0.1078, 0.6032].
        let (lo, hi) = wilson_ci(3, 10);
        assert!(
            close(lo, 0.1078, 1e-4) && close(hi, 0.6032, 1e-4),
            "{lo} {hi}"
        );
        // 0 of 12: centre 0.160061 / 1.320122 = 0.121248 = half-width -> [0, 0.2425].
        assert_eq!(wilson_ci(0, 12).0, 0.0);
        assert!(close(wilson_ci(0, 12).1, 0.2425, 1e-4));
        // 12 of 12 mirrors it: [0.7575, 1].
        let (lo, hi) = wilson_ci(12, 12);
        assert!(close(lo, 0.7575, 1e-4) && hi == 1.0, "{lo} {hi}");
        for n in 1..30 {
            for k in 0..=n {
                let (lo, hi) = wilson_ci(k, n);
                assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && lo <= hi);
            }
        }
        assert!(wilson_ci(0, 0).0.is_nan() && wilson_ci(0, 0).1.is_nan());
    }

    #[test]
    fn holm_by_hand() {
        // Sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised
        // to the running maximum 0.06); back in input order.
        let adj = holm(&[0.01, 0.04, 0.03, 0.005]);
        for (x, y) in adj.iter().zip([0.03, 0.06, 0.06, 0.02]) {
            assert!(close(*x, y, 1e-12), "{adj:?}");
        }
        // NaN stays NaN and does not count: m = 2, so 0.01 x2 = 0.02 and 0.04 x1 = 0.04.
        let adj = holm(&[0.01, f64::NAN, 0.04]);
        assert!(close(adj[0], 0.02, 1e-12) && adj[1].is_nan() && close(adj[2], 0.04, 1e-12));
        // Capped at 1.
        assert_eq!(holm(&[0.6, 0.7]), vec![1.0, 1.0]);
    }

    #[test]
    fn point_estimate_is_the_observed_mean_difference() {
        // a: 2 defence seeds x 2 attack seeds x 2 items, values 1..8, mean 36 / 8 = 4.5.
        // b: 1 defence seed, values 0, 1, 1, 0, mean 0.5. Difference 4.0.
        let a = ArmValues {
            values: vec![
                vec![vec![1.0, 2.0], vec![3.0, 4.0]],
                vec![vec![5.0, 6.0], vec![7.0, 8.0]],
            ],
        };
        let b = arm1(vec![vec![0.0, 1.0], vec![1.0, 0.0]]);
        let r = paired_bootstrap(&a, &b, 500, 3).unwrap();
        assert_eq!((r.mean_a, r.mean_b, r.diff), (4.5, 0.5, 4.0));
        assert_eq!(
            (
                r.attack_seeds,
                r.defence_seeds_a,
                r.defence_seeds_b,
                r.items,
                r.resamples
            ),
            (2, 2, 1, 2, 500)
        );
        assert_eq!(r.p_holm, None);
        assert!(close(r.mdd, (Z_975 + Z_80) * r.se, 1e-12));
    }

    #[test]
    fn identical_arms_give_a_zero_difference() {
        let a = arm1(vec![vec![0.2, 0.9, 0.4], vec![0.7, 0.1, 0.3]]);
        let r = paired_bootstrap(&a, &a.clone(), 1000, 5).unwrap();
        assert_eq!(r.diff, 0.0);
        assert_eq!(r.ci95, (0.0, 0.0));
        assert_eq!(r.se, 0.0);
        assert_eq!(r.p_value, 1.0);
        assert_eq!(r.verdict, Verdict::Undetermined);
    }

    #[test]
    fn a_large_shift_is_detected_in_both_directions_and_is_seeded() {
        // Two defence seeds per arm, 3 attack seeds, 20 items; a is b shifted by +5.
        let mut rng = Rng::new(11, "test");
        let b = ArmValues {
            values: (0..2)
                .map(|_| {
                    (0..3)
                        .map(|_| (0..20).map(|_| rng.uniform()).collect())
                        .collect()
                })
                .collect(),
        };
        let mut a = b.clone();
        a.values
            .iter_mut()
            .flatten()
            .flatten()
            .for_each(|v| *v += 5.0);
        let up = paired_bootstrap(&a, &b, 2000, 1).unwrap();
        assert!(close(up.diff, 5.0, 1e-9), "{}", up.diff);
        assert_eq!(up.verdict, Verdict::Higher);
        assert!(up.ci95.0 <= 5.0 && 5.0 <= up.ci95.1, "{:?}", up.ci95);
        assert_eq!(up.p_value, 1.0 / 2001.0);
        let down = paired_bootstrap(&b, &a, 2000, 1).unwrap();
        assert_eq!(down.verdict, Verdict::Lower);
        assert!(
            down.ci95.0 <= -5.0 && -5.0 <= down.ci95.1,
            "{:?}",
            down.ci95
        );
        // Same seed, same numbers; another seed, other numbers.
        assert_eq!(paired_bootstrap(&a, &b, 2000, 1).unwrap(), up);
        assert_ne!(paired_bootstrap(&a, &b, 2000, 2).unwrap().ci95, up.ci95);
    }

    #[test]
    fn bootstrap_matches_the_enumerated_distribution() {
        // One defence seed per arm, 2 attack seeds, 3 prompts, with a - b = x_s + y_i for seed
        // effects x = (0, 0.2) and prompt effects y = (0, 0.3, 0.6). The mean over a resample is
        // mean(x over the 2 drawn seeds) + mean(y over the 3 drawn prompts):
        //   seed part 0, 0.1, 0.2 with probabilities 1, 2, 1 (/4);
        //   prompt part 0.1 * (sum of 3 draws from {0, 1, 2}) = 0, 0.1, ..., 0.6 with
        //   counts 1, 3, 6, 7, 6, 3, 1 (/27).
        // Convolved, the resampled difference is 0, 0.1, ..., 0.8 with counts (/108)
        //   1, 5, 13, 22, 26, 22, 13, 5, 1,
        // cumulative 1, 6, 19, 41, 67, 89, 102, 107, 108. Expectation 0.4 (symmetric); variance
        // var(x) / 2 + var(y) / 3 = 0.01 / 2 + 0.06 / 3 = 0.025, sd 0.158. The 2.5% quantile is
        // 0.1 (1/108 < 0.025 <= 6/108), the 97.5% quantile is 0.7 (102/108 < 0.975 <= 107/108).
        let x = [0.0, 0.2];
        let y = [0.0, 0.3, 0.6];
        let b_rows = vec![vec![0.5, 0.25, 1.0], vec![0.75, 0.0, 0.5]];
        let a_rows: Vec<Vec<f64>> = (0..2)
            .map(|s| (0..3).map(|i| b_rows[s][i] + x[s] + y[i]).collect())
            .collect();
        let (a, b) = (arm1(a_rows), arm1(b_rows));
        let fa = Flat::new(&a, "a").unwrap();
        let fb = Flat::new(&b, "b").unwrap();
        let draws = paired_bootstrap_draws(&fa, &fb, 20000, 9);
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!(close(mean, 0.4, 0.01), "{mean}");
        // Every draw is one of the enumerated values.
        assert!(draws
            .iter()
            .all(|d| close((d * 10.0).round(), d * 10.0, 1e-9)));
        let r = paired_bootstrap(&a, &b, 20000, 9).unwrap();
        assert!(
            close(r.ci95.0, 0.1, 1e-9) && close(r.ci95.1, 0.7, 1e-9),
            "{:?}",
            r.ci95
        );
        assert!(close(r.se, 0.025f64.sqrt(), 0.005), "{}", r.se);
        assert!(close(r.diff, 0.1 + 0.3, 1e-9));
    }

    #[test]
    fn pairing_removes_the_common_seed_effect() {
        // 8 attack seeds with a large seed effect (sd 2) shared by both arms, 20 prompts with a
        // shared prompt effect, small independent noise, and a true shift of 0.1.
        let mut rng = Rng::new(4, "test");
        let seed_effect: Vec<f64> = (0..8).map(|_| 2.0 * rng.normal()).collect();
        let prompt_effect: Vec<f64> = (0..20).map(|_| rng.uniform()).collect();
        let mut arm = |shift: f64| {
            arm1(
                seed_effect
                    .iter()
                    .map(|e| {
                        prompt_effect
                            .iter()
                            .map(|p| e + p + shift + 0.02 * rng.normal())
                            .collect()
                    })
                    .collect(),
            )
        };
        let a = arm(0.1);
        let b = arm(0.0);
        let paired = paired_bootstrap(&a, &b, 2000, 7).unwrap();
        assert!(paired.ci95.0 > 0.0 && paired.ci95.0 < 0.1 && 0.1 < paired.ci95.1);
        assert!(paired.ci95.1 - paired.ci95.0 < 0.05, "{:?}", paired.ci95);
        assert_eq!(paired.verdict, Verdict::Higher);
        // Breaking the pairing (b's attack seeds rotated by one) leaves the means unchanged but
        // the seed effect no longer cancels: the interval is far wider and includes 0.
        let mut shuffled = b.clone();
        shuffled.values[0].rotate_left(1);
        let unpaired = paired_bootstrap(&a, &shuffled, 2000, 7).unwrap();
        assert!(close(unpaired.diff, paired.diff, 1e-9));
        let (w_paired, w_unpaired) = (
            paired.ci95.1 - paired.ci95.0,
            unpaired.ci95.1 - unpaired.ci95.0,
        );
        assert!(w_unpaired > 10.0 * w_paired, "{w_paired} {w_unpaired}");
        assert!(
            unpaired.ci95.0 < 0.0 && 0.0 < unpaired.ci95.1,
            "{:?}",
            unpaired.ci95
        );
        assert_eq!(unpaired.verdict, Verdict::Undetermined);
    }

    #[test]
    fn holm_turns_a_borderline_result_undetermined_in_a_large_family() {
        // One seed each, 40 prompts: a - b is -1 on 12 prompts, +1 on 3, 0 on 25. Mean -0.225,
        // se about 0.09: p about 0.012, significant alone but not after x10 for 10 comparisons.
        let a = arm1(vec![(0..40).map(|i| (i >= 37) as u8 as f64).collect()]);
        let b = arm1(vec![(0..40).map(|i| (i < 12) as u8 as f64).collect()]);
        let borderline = paired_bootstrap(&a, &b, 4000, 1).unwrap();
        assert_eq!(borderline.verdict, Verdict::Lower);
        assert!(
            borderline.p_value > 0.005 && borderline.p_value < 0.05,
            "{}",
            borderline.p_value
        );
        // Alone, it stays Lower.
        let mut alone = vec![borderline.clone()];
        holm_verdicts(&mut alone, 0.05);
        assert_eq!(alone[0].verdict, Verdict::Lower);
        assert_eq!(alone[0].p_holm, Some(borderline.p_value));
        // In a family of 10 (nine null comparisons), it does not.
        let null = paired_bootstrap(&a, &a, 100, 1).unwrap();
        let mut family = vec![borderline.clone()];
        family.extend(std::iter::repeat_n(null, 9));
        holm_verdicts(&mut family, 0.05);
        let adjusted = family[0].p_holm.unwrap();
        assert!(close(adjusted, (10.0 * borderline.p_value).min(1.0), 1e-12));
        assert_eq!(family[0].verdict, Verdict::Undetermined);
        assert!(family.iter().all(|c| c.verdict == Verdict::Undetermined));
    }

    #[test]
    fn bad_input_is_an_error_naming_the_problem() {
        let good = arm1(vec![vec![0.0, 1.0], vec![1.0, 0.0]]);
        let err = |a: &ArmValues, b: &ArmValues| paired_bootstrap(a, b, 10, 1).unwrap_err();
        // Ragged attack seeds across defence seeds.
        let ragged = ArmValues {
            values: vec![vec![vec![0.0, 1.0], vec![1.0, 0.0]], vec![vec![0.0, 1.0]]],
        };
        let e = err(&ragged, &good);
        assert!(
            e.contains("arm a is ragged") && e.contains("defence seed 1"),
            "{e}"
        );
        // Ragged items.
        let e = err(&good, &arm1(vec![vec![0.0, 1.0], vec![1.0]]));
        assert!(
            e.contains("arm b is ragged") && e.contains("attack seed 1 has 1 items"),
            "{e}"
        );
        // Empty arms.
        assert!(err(&ArmValues { values: vec![] }, &good).contains("arm a is empty"));
        assert!(err(&good, &arm1(vec![])).contains("arm b is empty"));
        assert!(err(&good, &arm1(vec![vec![], vec![]])).contains("no items"));
        // Unpaired shapes.
        let e = err(&good, &arm1(vec![vec![0.0, 1.0]]));
        assert!(e.contains("2 attack seeds") && e.contains("has 1"), "{e}");
        let e = err(&good, &arm1(vec![vec![0.0], vec![1.0]]));
        assert!(e.contains("items"), "{e}");
        // Non-finite values and no resamples.
        let e = err(&good, &arm1(vec![vec![0.0, 1.0], vec![f64::NAN, 0.0]]));
        assert!(
            e.contains("non-finite") && e.contains("attack seed 1, item 0"),
            "{e}"
        );
        assert!(paired_bootstrap(&good, &good, 0, 1)
            .unwrap_err()
            .contains("resamples"));
    }

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
