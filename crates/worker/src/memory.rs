//! This process's resident memory, as heartbeats and `LoadShard` answers report it.

/// Resident set size of this process in bytes, from `/proc/self/statm`; 0 where that is not
/// available (not Linux).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| parse_statm(&s))
        .unwrap_or(0)
}

/// The resident pages (second field) of a statm line, in bytes.
fn parse_statm(s: &str) -> Option<u64> {
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The page size; statm counts pages. 4 KiB on the platforms we run on; reading it needs
/// libc, which this crate does not otherwise use.
fn page_size() -> u64 {
    4096
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that statm's second field is read as resident pages, and junk gives `None`.
    #[test]
    fn parses_statm() {
        assert_eq!(parse_statm("1000 250 30 1 0 90 0\n"), Some(250 * 4096));
        assert_eq!(parse_statm("1000"), None);
        assert_eq!(parse_statm("x y"), None);
    }

    /// Ensures that on Linux the live process reports a plausible non-zero size.
    #[test]
    fn live_process_has_resident_memory() {
        if cfg!(target_os = "linux") {
            let rss = resident_bytes();
            assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        }
    }
}
