//! A tiny deterministic random source: splitmix64 from a seed, or a fuzzer's bytes.
//!
//! No `rand` crate: the simulator must replay a seed exactly on every platform and
//! every version, so the generator is ten lines we own.

/// Where the randomness comes from.
#[derive(Clone, Debug)]
enum Source {
    /// splitmix64 state.
    Seeded(u64),
    /// A fuzzer's input, consumed eight bytes per draw; when it runs out, splitmix64
    /// seeded from the input's length takes over (deterministic, and the run still ends).
    Bytes { data: Vec<u8>, pos: usize, tail: u64 },
}

/// A deterministic pseudo-random generator.
#[derive(Clone, Debug)]
pub struct Rng {
    source: Source,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator driven by `seed` (splitmix64).
    pub fn new(seed: u64) -> Rng {
        Rng { source: Source::Seeded(seed) }
    }

    /// A generator that draws from `data` first (as a fuzzer's input), then from
    /// splitmix64 seeded with the data's length.
    pub fn from_bytes(data: &[u8]) -> Rng {
        Rng {
            source: Source::Bytes {
                data: data.to_vec(),
                pos: 0,
                tail: 0xF0F0_5EED ^ data.len() as u64,
            },
        }
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        match &mut self.source {
            Source::Seeded(s) => splitmix(s),
            Source::Bytes { data, pos, tail } => {
                if *pos >= data.len() {
                    return splitmix(tail);
                }
                // Small draws dominate; one byte per draw keeps fuzzer mutations local.
                let b = data[*pos];
                *pos += 1;
                u64::from(b).wrapping_mul(0x0101_0101_0101_0101)
            }
        }
    }

    /// A value in `0..n` (`n > 0`; returns 0 for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift: bias is irrelevant at these sizes.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }

    /// A `usize` in `lo..=hi`.
    pub fn range_usize(&mut self, lo: usize, hi: usize) -> usize {
        self.range(lo as u64, hi as u64) as usize
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// A uniformly chosen element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Whether this generator is still consuming fuzzer bytes (always false when seeded).
    pub fn is_consuming_input(&self) -> bool {
        matches!(&self.source, Source::Bytes { data, pos, .. } if *pos < data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_is_deterministic_and_spread() {
        let a: Vec<u64> = (0..8).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..8).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        let mut r = Rng::new(1);
        let mut hist = [0u32; 4];
        for _ in 0..4000 {
            hist[r.below(4) as usize] += 1;
        }
        assert!(hist.iter().all(|&h| h > 800), "{hist:?}");
    }

    #[test]
    fn bytes_then_fallback() {
        let mut r = Rng::from_bytes(&[0, 255]);
        assert_eq!(r.below(10), 0);
        assert_eq!(r.below(10), 9);
        assert!(!r.is_consuming_input());
        let _ = r.below(10);
    }
}
