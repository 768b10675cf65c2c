//! Seeded randomness for workloads: a xorshift generator and a Zipf sampler.
//!
//! Benchmarks must be repeatable, so every random choice comes from a seed; no `rand`
//! crate is needed for this.

/// Marsaglia's xorshift64* generator: fast, seeded, good enough to pick keys and fill
/// buffers (not for anything secret).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value; 0 is replaced, since xorshift never leaves it).
    pub fn new(seed: u64) -> Self {
        // Spread nearby seeds apart (splitmix64's finalizer) so seeds 1, 2, 3 differ at once.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        XorShift(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift: no division, bias below 2^-64 * n.
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Samples ranks `0..n` with probability proportional to `1 / (rank + 1)^s`: rank 0 is the
/// most popular. `s = 0.8` is the skew the spill benchmark reads with.
#[derive(Clone, Debug)]
pub struct Zipf {
    /// The cumulative distribution, `cdf[k]` = P(rank <= k); the last entry is 1.
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n` ranks (`n > 0`) with exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        assert!(n > 0, "a Zipf distribution needs at least one rank");
        let weights: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        *cdf.last_mut().expect("n > 0") = 1.0;
        Zipf { cdf }
    }

    /// How many ranks there are.
    pub fn len(&self) -> usize {
        self.cdf.len()
    }

    /// Always false: a distribution has at least one rank.
    pub fn is_empty(&self) -> bool {
        self.cdf.is_empty()
    }

    /// The probability of `rank`.
    pub fn probability(&self, rank: usize) -> f64 {
        self.cdf[rank] - if rank == 0 { 0.0 } else { self.cdf[rank - 1] }
    }

    /// Draws a rank.
    pub fn sample(&self, rng: &mut XorShift) -> usize {
        let u = rng.next_f64();
        self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_seeded_and_spreads() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = XorShift::new(1);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = XorShift::new(1);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(XorShift::new(1).next_u64(), XorShift::new(2).next_u64());
        assert_ne!(XorShift::new(0).next_u64(), 0);
        let mut r = XorShift::new(7);
        assert!((0..1000).all(|_| r.below(10) < 10));
        let mut buf = [0u8; 13];
        r.fill(&mut buf);
        assert!(buf.iter().any(|&b| b != 0));
    }

    #[test]
    fn zipf_favours_low_ranks_in_proportion() {
        let zipf = Zipf::new(100, 0.8);
        assert_eq!(zipf.len(), 100);
        let total: f64 = (0..100).map(|k| zipf.probability(k)).sum();
        assert!((total - 1.0).abs() < 1e-9);
        // p(0) / p(9) = 10^0.8.
        assert!((zipf.probability(0) / zipf.probability(9) - 10f64.powf(0.8)).abs() < 1e-9);
        let mut rng = XorShift::new(3);
        let mut counts = [0usize; 100];
        for _ in 0..200_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        let expected = zipf.probability(0) * 200_000.0;
        assert!((counts[0] as f64 - expected).abs() < expected * 0.05, "{} vs {expected}", counts[0]);
        assert!(counts[0] > counts[50]);
        assert!(counts.iter().all(|&c| c > 0));
    }
}
