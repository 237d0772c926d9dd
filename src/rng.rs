//! A small, fixed pseudo-random generator (SplitMix64 seeding + xoshiro256++), so that seeded
//! test matrices and synthetic data are identical on every rank, platform and crate version.

/// A stable 64-bit key of a name (FNV-1a), e.g. to draw a layer's test matrix.
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// xoshiro256++ (Blackman & Vigna 2019), seeded through SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
    spare: Option<f64>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator determined by `words` alone (e.g. `[seed, layer, unit]`).
    pub fn new(words: &[u64]) -> Self {
        let mut state = 0x243F_6A88_85A3_08D3u64;
        for &w in words {
            state ^= splitmix64(&mut { w ^ state });
            splitmix64(&mut state);
        }
        let mut s = [0u64; 4];
        for v in &mut s {
            *v = splitmix64(&mut state);
        }
        Rng { s, spare: None }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in the open interval (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller, both values used).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * v).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn streams_depend_only_on_their_words() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(&[7, 1, 2]);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = Rng::new(&[7, 1, 2]);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert_ne!(
            Rng::new(&[7, 1, 3]).next_u64(),
            Rng::new(&[7, 1, 2]).next_u64()
        );
        assert_ne!(Rng::new(&[1, 7]).next_u64(), Rng::new(&[7, 1]).next_u64());
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut r = Rng::new(&[3]);
        let n = 200_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let z = r.normal();
            s += z;
            s2 += z * z;
        }
        assert!((s / n as f64).abs() < 0.01);
        assert!((s2 / n as f64 - 1.0).abs() < 0.02);
    }
}
