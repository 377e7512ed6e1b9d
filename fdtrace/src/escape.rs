//! Text another process controls (its `comm`, its file names, socket paths)
//! made safe to show. A traced process picks those bytes, and fdtrace often
//! runs as root over every process of a host: printed raw, they would put
//! escape sequences, bells and line breaks into the operator's terminal, or
//! break one-object-per-line NDJSON. Both escapes are lossless: the original
//! bytes can be read back from the text.
use std::{borrow::Cow, fmt::Write as _};

/// Bytes as valid UTF-8 with nothing lost: UTF-8 sequences stay as they are,
/// a backslash becomes `\\` and every byte that is not part of valid UTF-8
/// becomes `\xNN` (unlike U+FFFD, which loses the byte). For NDJSON (whose
/// encoder escapes control characters itself) and metric labels.
pub fn lossless(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// `lossless` text made safe for a terminal: every control character (C0,
/// DEL, C1) and every bidirectional override is escaped, `\n`, `\r` and `\t`
/// by name, the rest as `\xNN` (C0 and DEL) or `\u{NNNN}`. Backslashes were
/// already doubled by `lossless`, so the escapes stay unambiguous.
pub fn terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Raw bytes straight to terminal-safe text (for tests: the sinks escape
/// text already made lossless at its source).
#[cfg(test)]
pub fn terminal_bytes(bytes: &[u8]) -> String {
    terminal(&lossless(bytes)).into_owned()
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        // Bidirectional embeddings, overrides and isolates reorder what the
        // terminal shows around them (CVE-2021-42574).
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Reads `lossless` text back to its bytes (for tests: proves nothing is
/// lost).
#[cfg(test)]
fn unescape(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            let hex = std::str::from_utf8(&b[i + 2..i + 4]).expect("hex");
            out.push(u8::from_str_radix(hex, 16).expect("hex"));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn hostile_comm_is_escaped_on_the_terminal() {
        let comm = b"\x1b[31mEVIL\x1b[0m\n";
        assert_eq!(terminal_bytes(comm), "\\x1b[31mEVIL\\x1b[0m\\n");
    }

    #[test]
    fn hostile_file_name_is_escaped_on_the_terminal() {
        let path = b"/tmp/x\x1b[2J\nline2\x07.txt";
        assert_eq!(terminal_bytes(path), "/tmp/x\\x1b[2J\\nline2\\x07.txt");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_kept_as_hex() {
        assert_eq!(lossless(b"caf\xc3\xa9 \xff\xfe"), "café \\xff\\xfe");
        assert_eq!(terminal_bytes(b"\xff"), "\\xff");
    }

    #[test]
    fn a_backslash_is_doubled_so_escapes_stay_unambiguous() {
        // A file really named `\xff` must not read back as the byte 0xff.
        assert_eq!(lossless(b"\\xff"), "\\\\xff");
        assert_eq!(unescape(&lossless(b"\\xff")), b"\\xff");
    }

    #[test]
    fn c1_controls_and_bidi_overrides_are_escaped() {
        assert_eq!(terminal("a\u{9b}b"), "a\\u{009b}b");
        assert_eq!(terminal("x\u{202e}y"), "x\\u{202e}y");
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        assert!(matches!(terminal("python3 /srv/app.py"), Cow::Borrowed(_)));
    }

    proptest! {
        #[test]
        fn lossless_is_valid_utf8_and_loses_nothing(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let text = lossless(&bytes);
            prop_assert_eq!(unescape(&text), bytes);
        }

        #[test]
        fn terminal_text_has_no_control_character(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let text = terminal_bytes(&bytes);
            prop_assert!(!text.chars().any(needs_escape));
        }

        #[test]
        fn terminal_is_idempotent_on_its_output(s in ".*") {
            let once = terminal(&s).into_owned();
            prop_assert_eq!(terminal(&once).into_owned(), once);
        }
    }
}
