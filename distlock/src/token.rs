//! Owner tokens: a short owner tag and 128 random bits from the OS.

use crate::error::{Error, Result};

/// The default owner tag: `host:pid:`, so `GET` on a key shows who holds it.
pub(crate) fn default_owner_tag() -> String {
    let host = gethostname::gethostname();
    let host = host.to_string_lossy();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != ':')
        .take(32)
        .collect();
    format!("{host}:{}:", std::process::id())
}

/// Mints a fresh token: `tag` followed by 32 hex digits of OS randomness.
pub(crate) fn mint(tag: &str) -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::config(format!("the OS random number generator failed: {e}")))?;
    let mut out = String::with_capacity(tag.len() + 32);
    out.push_str(tag);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_tagged() {
        let a = mint("h:1:").unwrap();
        let b = mint("h:1:").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("h:1:"));
        assert_eq!(a.len(), 4 + 32);
    }

    #[test]
    fn default_tag_names_the_process() {
        let tag = default_owner_tag();
        assert!(tag.ends_with(&format!(":{}:", std::process::id())));
    }
}
