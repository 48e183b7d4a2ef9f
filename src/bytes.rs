//! Byte-string search, for the places that look for a secret or a JSON key in bytes as they pass (`redact`,
//! `metrics`): no searcher to set up per call, which for short needles in short texts costs more than the search.

/// Where `needle` first occurs in `hay`; None for an empty needle.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    // Most positions fail on their first byte, before any comparison of the rest.
    (0..=last_start).find(|&i| hay[i] == first && hay[i + 1..i + needle.len()] == *rest)
}

#[cfg(test)]
mod tests {
    use super::find;

    #[test]
    fn finds_the_first_occurrence_anywhere() {
        assert_eq!(find(b"abcabc", b"bc"), Some(1));
        assert_eq!(find(b"abc", b"abc"), Some(0));
        assert_eq!(find(b"xxabc", b"abc"), Some(2), "at the very end");
        assert_eq!(find(b"aab", b"ab"), Some(1), "after a false start");
        assert_eq!(find(b"ab", b"abc"), None, "needle longer than the text");
        assert_eq!(find(b"abc", b"x"), None);
        assert_eq!(find(b"abc", b""), None);
        assert_eq!(find(b"", b"a"), None);
    }
}
