//! FNV-1a, 64 bit: a fast hash that is stable across processes and Rust
//! versions (unlike `DefaultHasher`). Not for anything an attacker may target.

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
