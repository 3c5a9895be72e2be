//! The collector of one file's semantic errors, and the checks of single values that
//! every part of a saga shares: names and integers within their [`limits`].

use std::path::Path;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::{LoadError, Pos};
use crate::saga::definition::limits;

/// Collects every semantic error of one file while building its
/// [`SagaDef`](crate::saga::SagaDef); its methods are spread over the files of this module,
/// one per part of a saga.
///
/// Invariant: a method returning `None` has recorded at least one error.
pub(super) struct Checker<'f> {
    /// The file being checked, named in every error.
    pub(super) file: &'f Path,
    /// The file's text.
    pub(super) src: &'f str,
    /// What was found so far, in the order found.
    pub(super) errors: Vec<LoadError>,
}

impl Checker<'_> {
    /// Records a problem at `at`, under the document path `field`.
    pub(super) fn error(&mut self, at: Pos, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(LoadError {
            file: self.file.to_path_buf(),
            line: at.line,
            column: at.column,
            field: field.into(),
            message: message.into(),
        });
    }

    /// An integer field that must lie in `min..=max` (`max` with the reason for it);
    /// `None` when absent or out of range (then reported at `field`).
    pub(super) fn integer_in(
        &mut self,
        raw: Option<&Spanned<i64>>,
        field: &str,
        min: u64,
        (max, why): (u64, &str),
    ) -> Option<u64> {
        let raw = raw?;
        let name = field.rsplit('.').next().unwrap_or(field);
        let message = match u64::try_from(raw.value) {
            Ok(v) if v < min => format!("{name} must be an integer >= {min}, found {v}"),
            Ok(v) if v > max => format!("{name} must be at most {max} ({why}), found {v}"),
            Ok(v) => return Some(v),
            Err(_) => format!("{name} must be an integer >= {min}, found {}", raw.value),
        };
        self.error(Pos::at(raw), field, message);
        None
    }

    /// [`Checker::integer_in`] for a `*_ms` field, as a duration.
    pub(super) fn millis_in(
        &mut self,
        raw: Option<&Spanned<i64>>,
        field: &str,
        min: u64,
        max: (u64, &str),
    ) -> Option<Duration> {
        self.integer_in(raw, field, min, max)
            .map(Duration::from_millis)
    }

    /// A saga or step name (`what`): `^[a-z][a-z0-9_]*$` and at most
    /// [`limits::MAX_NAME_CHARS`] characters; `None` (reported at `field`) otherwise.
    pub(super) fn snake_name(
        &mut self,
        name: &Spanned<String>,
        field: &str,
        what: &str,
    ) -> Option<String> {
        let chars = name.value.chars().count();
        let message = if chars > limits::MAX_NAME_CHARS {
            // The name itself may be huge: show its start only.
            let start: String = name.value.chars().take(20).collect();
            format!(
                "{what} name `{start}...` is {chars} characters long: at most {} are allowed",
                limits::MAX_NAME_CHARS
            )
        } else if is_snake_name(&name.value) {
            return Some(name.value.clone());
        } else {
            format!("{what} name `{}` must match ^[a-z][a-z0-9_]*$", name.value)
        };
        self.error(Pos::at(name), field, message);
        None
    }
}

/// `^[a-z][a-z0-9_]*$`: saga and step names.
fn is_snake_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{load, loaded, render};
    use crate::saga::definition::limits;

    /// A saga with every limited field set from `values`: (field, value) replaces the
    /// `{field}` placeholder; the others keep a valid value.
    fn with_limits(values: &[(&str, String)]) -> String {
        let mut src = "name: {name}\nversion: {version}\naggregate: payload.id\n\
                       timeout_ms: {saga_timeout}\nordering: strict\n\
                       ordering_max_wait_ms: {wait}\n\
                       retry: { max_attempts: {attempts}, initial_delay_ms: {initial}, \
                       max_delay_ms: {max_delay} }\n\
                       steps:\n\
                       - name: {step}\n  role: retriable\n  action: { handler: h }\n\
                       \x20 timeout_ms: {step_timeout}\n"
            .to_owned();
        let defaults = [
            ("name", "s"),
            ("version", "1"),
            ("saga_timeout", "1000"),
            ("wait", "1000"),
            ("attempts", "3"),
            ("initial", "100"),
            ("max_delay", "1000"),
            ("step", "a"),
            ("step_timeout", "1000"),
        ];
        for (field, default) in defaults {
            let value = values
                .iter()
                .find(|(f, _)| *f == field)
                .map_or(default.to_owned(), |(_, v)| v.clone());
            src = src.replace(&format!("{{{field}}}"), &value);
        }
        src
    }

    #[test]
    fn every_limit_is_accepted_at_its_maximum() {
        let def = loaded(&with_limits(&[
            ("name", "n".repeat(limits::MAX_NAME_CHARS)),
            ("version", limits::MAX_VERSION.to_string()),
            ("saga_timeout", limits::MAX_SAGA_TIMEOUT_MS.to_string()),
            ("wait", limits::MAX_ORDERING_WAIT_MS.to_string()),
            ("attempts", limits::MAX_ATTEMPTS.to_string()),
            ("initial", limits::MAX_RETRY_DELAY_MS.to_string()),
            ("max_delay", limits::MAX_RETRY_DELAY_MS.to_string()),
            ("step", "s".repeat(limits::MAX_NAME_CHARS)),
            ("step_timeout", limits::MAX_STEP_TIMEOUT_MS.to_string()),
        ]));
        assert_eq!(def.version, 2_147_483_647);
        assert_eq!(def.timeout, Some(Duration::from_secs(365 * 24 * 3600)));
        assert_eq!(def.steps[0].retry.max_delay, Duration::from_secs(3600));
    }

    #[test]
    fn every_value_above_its_limit_is_an_error_naming_line_and_field() {
        let over = |max: u64| (max + 1).to_string();
        let cases = [
            (
                "name",
                "n".repeat(64),
                1,
                "name",
                "is 64 characters long: at most 63",
            ),
            (
                "name",
                "n".repeat(1 << 20),
                1,
                "name",
                "is 1048576 characters long",
            ),
            (
                "version",
                over(limits::MAX_VERSION),
                2,
                "version",
                "version must be at most 2147483647",
            ),
            (
                "version",
                i64::MAX.to_string(),
                2,
                "version",
                "found 9223372036854775807",
            ),
            (
                "saga_timeout",
                over(limits::MAX_SAGA_TIMEOUT_MS),
                4,
                "timeout_ms",
                "timeout_ms must be at most 31536000000",
            ),
            (
                "wait",
                i64::MAX.to_string(),
                6,
                "ordering_max_wait_ms",
                "ordering_max_wait_ms must be at most 600000",
            ),
            (
                "attempts",
                over(limits::MAX_ATTEMPTS),
                7,
                "retry.max_attempts",
                "max_attempts must be at most 2147483647",
            ),
            (
                "max_delay",
                over(limits::MAX_RETRY_DELAY_MS),
                7,
                "retry.max_delay_ms",
                "max_delay_ms must be at most 3600000 (1 hour",
            ),
            (
                "max_delay",
                i64::MAX.to_string(),
                7,
                "retry.max_delay_ms",
                "max_delay_ms must be at most 3600000",
            ),
            (
                "step",
                "s".repeat(64),
                9,
                "steps[0].name",
                "step name `ssssssssssssssssssss...` is 64 characters long",
            ),
            (
                "step_timeout",
                i64::MAX.to_string(),
                12,
                "steps[0].timeout_ms",
                "timeout_ms must be at most 2147483647",
            ),
        ];
        for (field, value, line, path, phrase) in cases {
            let errors = load(&with_limits(&[(field, value)])).expect_err(path);
            assert_eq!(errors.len(), 1, "{path}: {}", render(&errors));
            let e = &errors[0];
            assert_eq!((e.line, e.field.as_str()), (line, path), "{e}");
            assert!(e.message.contains(phrase), "{e}");
            assert!(e.message.len() < 200, "a huge value is not echoed: {e}");
        }
        // initial_delay_ms alone: its own limit, before the comparison with max_delay_ms.
        let errors = load(&with_limits(&[
            ("initial", over(limits::MAX_RETRY_DELAY_MS)),
            ("max_delay", over(limits::MAX_RETRY_DELAY_MS)),
        ]))
        .expect_err("both delays");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["retry.initial_delay_ms", "retry.max_delay_ms"],
            "{}",
            render(&errors)
        );
    }
}
