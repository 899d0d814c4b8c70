//! Seeded randomness. Every random draw in the crate comes from a [`Rng`] built from a user seed
//! and a purpose string, so that adding a new consumer of randomness never shifts the numbers an
//! existing one sees (candle's own CPU generator cannot be seeded).

use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic generator: ChaCha8 seeded from `(seed, purpose)`.
#[derive(Clone, Debug)]
pub struct Rng {
    inner: ChaCha8Rng,
}

/// FNV-1a, used only to turn a purpose string into a stream number.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl Rng {
    /// A generator for one purpose (for example `"init"`, `"data-order"`, `"sampling"`).
    pub fn new(seed: u64, purpose: &str) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(fnv1a(purpose));
        Self { inner }
    }

    /// The generator's position, for checkpoints: `(seed words, stream, word position)`.
    pub fn state(&self) -> ([u8; 32], u64, u128) {
        (
            self.inner.get_seed(),
            self.inner.get_stream(),
            self.inner.get_word_pos(),
        )
    }

    /// Restore a generator saved with [`Rng::state`].
    pub fn from_state(seed: [u8; 32], stream: u64, word_pos: u128) -> Self {
        let mut inner = ChaCha8Rng::from_seed(seed);
        inner.set_stream(stream);
        inner.set_word_pos(word_pos);
        Self { inner }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.inner.random::<f64>()
    }

    /// Uniform integer in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }

    /// Standard normal draw (Box-Muller; one value per call, kept simple and portable).
    pub fn normal(&mut self) -> f64 {
        loop {
            let u1 = self.uniform();
            if u1 > f64::MIN_POSITIVE {
                let u2 = self.uniform();
                return (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            }
        }
    }

    /// `n` draws from N(0, std^2) as f32.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }

    /// The positions of `n` of `len` items, drawn by one shuffle of all positions and kept in
    /// ascending order; all of them, with no draw, when `n` is 0 or at least `len`.
    pub fn subset_indices(&mut self, len: usize, n: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..len).collect();
        if n > 0 && n < len {
            self.shuffle(&mut idx);
            idx.truncate(n);
            idx.sort_unstable();
        }
        idx
    }

    /// `n` of `xs` in their original order ([`Rng::subset_indices`]): a seeded subset kept in
    /// file order.
    pub fn subset<T: Clone>(&mut self, xs: &[T], n: usize) -> Vec<T> {
        self.subset_indices(xs.len(), n)
            .into_iter()
            .map(|i| xs[i].clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subset_is_one_shuffle_truncated_in_original_order_and_all_draws_nothing() {
        let xs: Vec<u32> = (100..140).collect();
        let got = Rng::new(3, "s").subset(&xs, 7);
        // The six copies it replaced: shuffle every position, keep the first n, sort.
        let mut idx: Vec<usize> = (0..xs.len()).collect();
        Rng::new(3, "s").shuffle(&mut idx);
        idx.truncate(7);
        idx.sort();
        let want: Vec<u32> = idx.iter().map(|&i| xs[i]).collect();
        assert_eq!(got, want);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        // All of them (n = 0 or n >= len): no draw, so a shared generator goes on unchanged.
        for n in [0, 40, 41] {
            let mut a = Rng::new(5, "s");
            let mut b = Rng::new(5, "s");
            assert_eq!(a.subset(&xs, n), xs);
            assert_eq!(a.below(1000), b.below(1000));
        }
    }

    #[test]
    fn same_seed_same_numbers_and_purposes_differ() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7, "init");
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(7, "init");
            (0..4).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(7, "sampling");
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn state_round_trip() {
        let mut r = Rng::new(3, "x");
        r.next_u64();
        let (s, st, pos) = r.state();
        let mut r2 = Rng::from_state(s, st, pos);
        assert_eq!(r.next_u64(), r2.next_u64());
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(1, "n");
        let xs: Vec<f64> = (0..20000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }
}
