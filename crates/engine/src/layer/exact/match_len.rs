//! The common prefix of two byte strings: the inner loop of every match finder (zlib's,
//! Go's and klauspost's), where a deflate encoder measures a candidate match.

/// Length of the common prefix of `a` and `b` (`a` the shorter), 8 bytes at a time: with
/// plain indices, which the compiler checks once per word, rather than zipped iterators,
/// which it did not inline.
#[inline(always)]
pub(crate) fn match_len(a: &[u8], b: &[u8]) -> usize {
    let b = &b[..a.len()];
    let mut n = 0;
    while n + 8 <= a.len() {
        let x = u64::from_le_bytes(a[n..n + 8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(b[n..n + 8].try_into().expect("8 bytes"));
        let diff = x ^ y;
        if diff != 0 {
            return n + (diff.trailing_zeros() >> 3) as usize;
        }
        n += 8;
    }
    while n < a.len() && a[n] == b[n] {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_len_counts_the_common_prefix() {
        assert_eq!(match_len(b"abcdefghijk", b"abcdefghijX"), 10);
        assert_eq!(match_len(b"abc", b"abcd"), 3);
        assert_eq!(match_len(b"", b"x"), 0);
        assert_eq!(match_len(b"Xbcdefghij", b"abcdefghij"), 0);
    }
}
