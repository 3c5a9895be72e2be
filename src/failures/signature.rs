//! The signature of an error: what makes two failures "the same problem". Pure.
//!
//! An error text is split into a code — the SQLSTATE of a database error (skald
//! writes them `SQLSTATE 23505: …`) or a handler's code (a leading `UPPER_CASE:`
//! word) — and a message in which what varies from one instance to the next is
//! replaced: quoted literals (`'…'`, `"…"`) by `<str>`, UUIDs by `<uuid>`, numbers by
//! `<n>`. Words that merely contain digits (`v2`, `t1`) are kept.

use serde::Serialize;
use uuid::Uuid;

/// An error's code and normalised message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Signature {
    /// The SQLSTATE or handler code, when the error has one.
    pub code: Option<String>,
    /// The message with quoted literals, UUIDs and numbers replaced.
    pub message: String,
}

/// The signature of `error` (see the module).
pub fn signature(error: &str) -> Signature {
    let error = error.trim();
    if let Some(rest) = error.strip_prefix("SQLSTATE ")
        && let Some((code, message)) = rest.split_once(": ")
        && code.len() == 5
        && code.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Signature {
            code: Some(code.to_string()),
            message: normalise(message),
        };
    }
    if let Some((code, message)) = error.split_once(": ")
        && code.len() >= 2
        && code.starts_with(|c: char| c.is_ascii_uppercase())
        && code
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        return Signature {
            code: Some(code.to_string()),
            message: normalise(message),
        };
    }
    Signature {
        code: None,
        message: normalise(error),
    }
}

/// `message` with quoted literals, UUIDs and numbers replaced (see the module).
pub fn normalise(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::with_capacity(message.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let word_start = i == 0 || !is_word(chars[i - 1]);
        if c == '\'' || c == '"' {
            if let Some(end) = closing_quote(&chars, i) {
                out.push_str("<str>");
                i = end + 1;
                continue;
            }
        } else if word_start && is_uuid_at(&chars, i) {
            out.push_str("<uuid>");
            i += 36;
            continue;
        } else if word_start && c.is_ascii_digit() {
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_ascii_digit()
                    || (chars[j] == '.' && chars.get(j + 1).is_some_and(char::is_ascii_digit)))
            {
                j += 1;
            }
            // A number followed by letters is a word (`2nd`, `10ms` stay as they are).
            if j == chars.len() || !is_word(chars[j]) {
                out.push_str("<n>");
                i = j;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// The id of the failure group of `saga`, `step`, `phase` and `signature`: the same
/// key always gives the same id (a UUID v5).
pub fn group_id(saga: &str, step: Option<&str>, phase: Option<&str>, sig: &Signature) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x5a1d_f417_0000_4000_8000_6f75_7073_0000);
    let key = format!(
        "{saga}\n{}\n{}\n{}\n{}",
        step.unwrap_or(""),
        phase.unwrap_or(""),
        sig.code.as_deref().unwrap_or(""),
        sig.message
    );
    Uuid::new_v5(&NAMESPACE, key.as_bytes())
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The index of the quote closing the one at `start` (a doubled quote inside is an
/// escaped one), if it closes on this text.
fn closing_quote(chars: &[char], start: usize) -> Option<usize> {
    let quote = chars[start];
    let mut j = start + 1;
    while j < chars.len() {
        if chars[j] == quote {
            if chars.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return Some(j);
        }
        j += 1;
    }
    None
}

fn is_uuid_at(chars: &[char], i: usize) -> bool {
    if chars.len() < i + 36 || chars.get(i + 36).is_some_and(|&c| is_word(c)) {
        return false;
    }
    chars[i..i + 36].iter().enumerate().all(|(k, c)| match k {
        8 | 13 | 18 | 23 => *c == '-',
        _ => c.is_ascii_hexdigit(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_uuids_and_quoted_literals_are_replaced() {
        assert_eq!(
            normalise(
                "out of stock: item 42 for order 1b4e28ba-2fa1-11d2-883f-0016d3cca427 (12.50 EUR)"
            ),
            "out of stock: item <n> for order <uuid> (<n> EUR)"
        );
        assert_eq!(
            normalise(r#"card '4242 it''s' declined by "acme 7""#),
            "card <str> declined by <str>"
        );
        assert_eq!(
            normalise("Key (id)=(17) already exists"),
            "Key (id)=(<n>) already exists"
        );
    }

    #[test]
    fn words_with_digits_and_unclosed_quotes_are_kept() {
        assert_eq!(
            normalise("table t1 v2 in 10ms, 2nd try"),
            "table t1 v2 in 10ms, 2nd try"
        );
        assert_eq!(normalise("it's 3"), "it's <n>");
    }

    #[test]
    fn the_code_is_the_sqlstate_or_a_handler_code() {
        assert_eq!(
            signature("SQLSTATE 23505: duplicate key value; detail: Key (id)=(5) already exists"),
            Signature {
                code: Some("23505".into()),
                message: "duplicate key value; detail: Key (id)=(<n>) already exists".into()
            }
        );
        assert_eq!(
            signature("CARD_DECLINED: card 99 declined"),
            Signature {
                code: Some("CARD_DECLINED".into()),
                message: "card <n> declined".into()
            }
        );
        assert_eq!(
            signature("handler timed out after 5000 ms"),
            Signature {
                code: None,
                message: "handler timed out after <n> ms".into()
            }
        );
    }

    #[test]
    fn one_key_one_group_id() {
        let a = signature("SQLSTATE 55000: item 1");
        let b = signature("SQLSTATE 55000: item 2");
        assert_eq!(a, b);
        let id = group_id("s", Some("x"), Some("forward"), &a);
        assert_eq!(id, group_id("s", Some("x"), Some("forward"), &b));
        assert_ne!(id, group_id("s", Some("y"), Some("forward"), &b));
        assert_ne!(id, group_id("s", Some("x"), Some("compensate"), &b));
    }
}
