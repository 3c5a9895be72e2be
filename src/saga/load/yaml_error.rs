//! Translating a serde-saphyr error (syntax, unknown field, wrong type, duplicate key)
//! into one [`LoadError`] with a one-line message, pointing at the node's path in the
//! document when its position can be mapped back to one.

use std::path::Path;

use serde_saphyr::MessageFormatter;
use serde_saphyr::granit_parser::{Event, Parser};

use super::{DOCUMENT, LoadError, Pos};

/// Turns a serde-saphyr error into one [`LoadError`] with a one-line message and, when
/// the position can be mapped back to a node, the path of that node.
pub(super) fn yaml_error(src: &str, file: &Path, err: &serde_saphyr::Error) -> LoadError {
    let inner = innermost(err);
    let mut at = err
        .location()
        .map_or(Pos { line: 0, column: 0 }, |l| Pos::of(&l));
    // serde-saphyr reports a missing field at the mapping's last key (or at the mapping
    // itself when it is empty).
    let prefer = match inner {
        serde_saphyr::Error::SerdeUnknownField { .. }
        | serde_saphyr::Error::DuplicateMappingKey { .. }
        | serde_saphyr::Error::SerdeMissingField { .. } => Prefer::Key,
        _ => Prefer::Container,
    };
    let located = if at.line == 0 {
        Located::Nothing
    } else {
        locate(src, at, prefer)
    };
    let (path, scalar, is_key, parent_start) = match located {
        Located::Node {
            path,
            scalar,
            is_key,
            parent_start,
        } => (Some(path), scalar, is_key, parent_start),
        Located::Syntax | Located::Nothing => (None, None, false, None),
    };
    let field = match (inner, path) {
        (serde_saphyr::Error::SerdeMissingField { field, .. }, path) => {
            let mut path = path.unwrap_or_default();
            if is_key {
                // Point at the mapping the field is missing from, not at its last key.
                path.pop();
                at = parent_start.unwrap_or(at);
            }
            path.push(Seg::Key((*field).to_owned()));
            render_path(&path)
        }
        (_, Some(path)) => render_path(&path),
        (_, None) => DOCUMENT.to_owned(),
    };
    LoadError {
        file: file.to_path_buf(),
        line: at.line,
        column: at.column,
        field,
        message: one_line(&yaml_message(inner, scalar.as_deref())),
    }
}

/// The error itself, without the snippet and alias wrappers.
fn innermost(mut err: &serde_saphyr::Error) -> &serde_saphyr::Error {
    loop {
        match err {
            serde_saphyr::Error::WithSnippet { error, .. }
            | serde_saphyr::Error::AliasError { error, .. } => err = error,
            _ => return err,
        }
    }
}

/// The message of an (innermost) error, without location or snippet; `scalar` is the
/// source text at the error position when it is a scalar.
fn yaml_message(err: &serde_saphyr::Error, scalar: Option<&str>) -> String {
    use serde_saphyr::Error as E;
    let found = scalar
        .map(|s| {
            const MAX: usize = 40;
            let cut: String = s.chars().take(MAX).collect();
            let more = if s.chars().count() > MAX { "..." } else { "" };
            format!(", found `{cut}{more}`")
        })
        .unwrap_or_default();
    match err {
        E::InvalidScalar { ty, .. } => match *ty {
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" | "u8" | "u16" | "u32" | "u64"
            | "u128" | "usize" => format!("expected an integer{found}"),
            "f32" | "f64" => format!("expected a number{found}"),
            "bool" => format!("expected true or false{found}"),
            other => format!("invalid {other}{found}"),
        },
        E::DuplicateMappingKey { key: Some(key), .. } => {
            format!("duplicate key `{key}` in the same mapping")
        }
        E::DuplicateMappingKey { key: None, .. } => "duplicate key in the same mapping".to_owned(),
        E::Eof { .. } => "unexpected end of file: expected a saga mapping".to_owned(),
        E::Unexpected { expected, .. } => match *expected {
            "mapping start" => "expected a mapping (`key: value` pairs)".to_owned(),
            "sequence start" => "expected a sequence (a `- item` list or `[...]`)".to_owned(),
            "string scalar" | "scalar" => {
                "expected a single value, not a list or mapping".to_owned()
            }
            other => format!("expected {other}{found}"),
        },
        other => serde_saphyr::UserMessageFormatter
            .format_message(other)
            .into_owned(),
    }
}

/// Collapses control characters and runs of whitespace into single spaces.
fn one_line(message: &str) -> String {
    message
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `steps[2].action.params.qty`; the empty path is `<document>`.
fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    if out.is_empty() {
        DOCUMENT.to_owned()
    } else {
        out
    }
}

/// Which node to pick when several start at the error position (a block mapping starts
/// where its first key does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefer {
    /// The outermost node: the mapping a field is missing from, the value of a wrong type.
    Container,
    /// The mapping key: an unknown or duplicate field.
    Key,
}

/// What [`locate`] found at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Located {
    /// The YAML does not parse up to that position.
    Syntax,
    /// The node at (or the last one before) the position.
    Node {
        /// Its path; a mapping key's path ends with the key itself.
        path: Vec<Seg>,
        /// Its text when it is a scalar.
        scalar: Option<String>,
        /// Whether it is a mapping key.
        is_key: bool,
        /// Where the mapping or sequence holding it starts.
        parent_start: Option<Pos>,
    },
    /// No node starts at or before the position.
    Nothing,
}

/// Re-reads the YAML events up to `at` to find the path of the node there.
fn locate(src: &str, at: Pos, prefer: Prefer) -> Located {
    enum Kind {
        Map { key: Option<String>, want_key: bool },
        Seq { next: usize },
    }
    struct Frame {
        seg: Option<Seg>,
        kind: Kind,
        start: Pos,
    }

    let mut frames: Vec<Frame> = Vec::new();
    let mut exact: Option<Located> = None;
    let mut before: Option<Located> = None;
    let mut parser = Parser::new_from_str(src);
    while let Some(next) = parser.next_event() {
        let (event, span) = match next {
            Ok(event) => event,
            Err(e) => {
                if Pos::of_marker(e.marker()) <= at {
                    return Located::Syntax;
                }
                break;
            }
        };
        let (opens, scalar) = match &event {
            Event::Scalar(text, ..) => (None, Some(text.to_string())),
            Event::Alias(..) => (None, None),
            Event::MappingStart(..) => (
                Some(Kind::Map {
                    key: None,
                    want_key: true,
                }),
                None,
            ),
            Event::SequenceStart(..) => (Some(Kind::Seq { next: 0 }), None),
            Event::MappingEnd | Event::SequenceEnd => {
                frames.pop();
                continue;
            }
            _ => continue,
        };
        let start = Pos::of_marker(&span.start);
        if start > at {
            break;
        }

        let (seg, is_key) = match frames.last_mut().map(|f| &mut f.kind) {
            None => (None, false),
            Some(Kind::Map { key, want_key }) => {
                if *want_key {
                    *want_key = false;
                    let name = scalar.clone().unwrap_or_else(|| "?".to_owned());
                    *key = Some(name.clone());
                    (Some(Seg::Key(name)), true)
                } else {
                    *want_key = true;
                    (key.clone().map(Seg::Key), false)
                }
            }
            Some(Kind::Seq { next }) => {
                let index = *next;
                *next += 1;
                (Some(Seg::Index(index)), false)
            }
        };
        let path: Vec<Seg> = frames
            .iter()
            .filter_map(|f| f.seg.clone())
            .chain(seg.clone())
            .collect();

        let node = Located::Node {
            path,
            scalar,
            is_key,
            parent_start: frames.last().map(|f| f.start),
        };
        if start == at {
            if prefer == Prefer::Key && is_key {
                return node;
            }
            if exact.is_none() {
                exact = Some(node.clone());
            }
        }
        before = Some(node);
        if let Some(kind) = opens {
            frames.push(Frame { seg, kind, start });
        }
    }
    exact.or(before).unwrap_or(Located::Nothing)
}

#[cfg(test)]
mod tests {
    use super::super::DOCUMENT;
    use super::super::test_support::load;

    #[test]
    fn empty_file_is_an_error() {
        let errors = load("").expect_err("empty");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, DOCUMENT);
    }

    #[test]
    fn missing_required_field_names_it() {
        let errors = load(
            "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
             - name: a\n  action: { handler: h }\n",
        )
        .expect_err("missing role");
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].line, errors[0].field.as_str()),
            (5, "steps[0].role")
        );
        assert!(errors[0].message.contains("missing field `role`"));
    }
}
