//! Writing JSON text: strings with the escapes JSON needs, UUIDs in their canonical form.

/// What follows a backslash for bytes that need escaping: 0 = none, `u` = `\u00XX`.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Writes `s` as a JSON string: quotes, backslashes and control characters escaped, the rest
/// (non-ASCII included) as UTF-8.
pub fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = ESCAPE[b as usize];
        if esc == 0 {
            continue;
        }
        // Escaped bytes are ASCII, so `start..i` are char boundaries.
        out.push_str(&s[start..i]);
        out.push('\\');
        if esc == b'u' {
            out.push_str("u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push(esc as char);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Writes a UUID as its canonical quoted text, `"12345678-1234-5678-1234-567812345678"`.
pub fn write_uuid(out: &mut String, v: u128) {
    let mut buf = uuid::Uuid::encode_buffer();
    out.push('"');
    out.push_str(uuid::Uuid::from_u128(v).hyphenated().encode_lower(&mut buf));
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        write_str(&mut out, s);
        out
    }

    #[test]
    fn strings_escape_quotes_backslashes_and_control_characters_only() {
        assert_eq!(escaped("plain"), r#""plain""#);
        assert_eq!(escaped("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(escaped("\n\t\u{1}"), r#""\n\t\u0001""#);
        assert_eq!(escaped("é€😀/"), "\"é€😀/\"");
    }

    #[test]
    fn uuids_use_the_canonical_form() {
        let mut out = String::new();
        write_uuid(&mut out, 0x1234_5678_1234_5678_1234_5678_1234_5678);
        assert_eq!(out, r#""12345678-1234-5678-1234-567812345678""#);
    }
}
