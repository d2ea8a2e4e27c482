//! The hash of the memory store's map.

use std::hash::{BuildHasher, Hasher};

/// Hashes record keys with seeds drawn per store. Record keys are digests
/// of client-chosen keys, so an unseeded hash of them would let a client
/// grind keys into one bucket; here every word of a key passes through a
/// multiply by a secret, so which keys share a bucket cannot be known
/// without the seeds. Cheaper than the default SipHash on 32 bytes.
#[derive(Clone)]
pub(super) struct Seeded([u64; 4]);

impl Seeded {
    pub(super) fn new() -> Self {
        let random = std::collections::hash_map::RandomState::new();
        Self(std::array::from_fn(|i| random.hash_one(i)))
    }
}

impl BuildHasher for Seeded {
    type Hasher = SeededHasher;

    fn build_hasher(&self) -> SeededHasher {
        SeededHasher {
            seeds: self.0,
            state: self.0[3],
        }
    }
}

pub(super) struct SeededHasher {
    seeds: [u64; 4],
    state: u64,
}

/// The high and low halves of a full 64×64-bit product, folded.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        for pair in bytes.chunks(16) {
            let mut words = [0u8; 16];
            words[..pair.len()].copy_from_slice(pair);
            let [a, b] = [&words[..8], &words[8..]]
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()));
            self.state = fold(a ^ self.seeds[0] ^ self.state, b ^ self.seeds[1]);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.state = fold(self.state ^ n as u64 ^ self.seeds[2], self.seeds[1]);
    }

    fn finish(&self) -> u64 {
        fold(self.state ^ self.seeds[2], self.seeds[3])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::RecordKey;

    #[test]
    fn record_keys_hash_differently_under_different_seeds() {
        let key = RecordKey::from_bytes([7; 32]);
        let (one, two) = (Seeded::new(), Seeded::new());
        assert_ne!(one.hash_one(key), two.hash_one(key));
    }

    #[test]
    fn every_byte_of_a_record_key_reaches_its_hash() {
        let seeded = Seeded::new();
        let base = seeded.hash_one(RecordKey::from_bytes([0; 32]));
        for i in 0..32 {
            let mut bytes = [0; 32];
            bytes[i] = 1;
            assert_ne!(
                seeded.hash_one(RecordKey::from_bytes(bytes)),
                base,
                "byte {i}"
            );
        }
    }
}
