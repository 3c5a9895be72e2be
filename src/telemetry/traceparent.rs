//! The W3C Trace Context `traceparent` value (Level 1): reading and writing it, as pure
//! functions. It is how a saga's trace crosses processes: carried in the envelope, in
//! commands to participant services and in their replies.

use std::fmt;

/// The longest `traceparent` value skald reads, in bytes: the spec's own length (55)
/// plus room for a future version's additions. Longer is malformed.
pub const MAX_TRACEPARENT_BYTES: usize = 512;

/// A valid `traceparent`: `00-<trace-id>-<parent-id>-<flags>`, all lowercase hex.
///
/// ```
/// use skald::telemetry::TraceParent;
/// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap();
/// assert!(tp.sampled());
/// assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace the message belongs to (never all zeros).
    pub trace_id: u128,
    /// The span that sent the message (never all zeros).
    pub parent_id: u64,
    /// The trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

/// Why a `traceparent` value is not usable. The message that carries it is still read
/// (the value is ignored and this reason logged): trace context never makes a message
/// malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Over [`MAX_TRACEPARENT_BYTES`].
    #[error("longer than {MAX_TRACEPARENT_BYTES} bytes ({0})")]
    TooLong(usize),
    /// Not `version-traceid-parentid-flags` with lengths 2, 32, 16 and 2.
    #[error("not version-traceid-parentid-flags (2-32-16-2 lowercase hex digits)")]
    Shape,
    /// A part holds something other than lowercase hex digits.
    #[error("{0} is not lowercase hex")]
    NotHex(&'static str),
    /// Version `ff`, which the spec forbids.
    #[error("version ff is forbidden")]
    ForbiddenVersion,
    /// Version `00` with anything after the flags.
    #[error("version 00 must be exactly 55 characters")]
    TrailingData,
    /// A trace id of all zeros.
    #[error("trace id is all zeros")]
    ZeroTraceId,
    /// A parent id of all zeros.
    #[error("parent id is all zeros")]
    ZeroParentId,
}

impl TraceParent {
    /// Reads a `traceparent` value. A version above `00` is read by its first four
    /// parts, as the spec asks, when what follows starts with `-`.
    pub fn parse(value: &str) -> Result<TraceParent, TraceParentError> {
        if value.len() > MAX_TRACEPARENT_BYTES {
            return Err(TraceParentError::TooLong(value.len()));
        }
        // 2 + 1 + 32 + 1 + 16 + 1 + 2 = 55.
        let head = value.get(..55).ok_or(TraceParentError::Shape)?;
        let rest = &value[55..];
        let parts: Vec<&str> = head.split('-').collect();
        let [version, trace, parent, flags] = parts[..] else {
            return Err(TraceParentError::Shape);
        };
        if version.len() != 2 || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
            return Err(TraceParentError::Shape);
        }
        let version = hex(version, "version")? as u8;
        if version == 0xff {
            return Err(TraceParentError::ForbiddenVersion);
        }
        if (version == 0 && !rest.is_empty())
            || (version != 0 && !rest.is_empty() && !rest.starts_with('-'))
        {
            return Err(TraceParentError::TrailingData);
        }
        let trace_id = hex(trace, "trace id")?;
        let parent_id = hex(parent, "parent id")? as u64;
        let flags = hex(flags, "flags")? as u8;
        if trace_id == 0 {
            return Err(TraceParentError::ZeroTraceId);
        }
        if parent_id == 0 {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Whether the sender sampled (recorded) its span.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lowercase hex digits, as logs and trace tools show it.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl std::str::FromStr for TraceParent {
    type Err = TraceParentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s)
    }
}

/// Always version `00`, whatever version was read.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// `digits` (at most 32) as a number, when all are lowercase hex.
fn hex(digits: &str, part: &'static str) -> Result<u128, TraceParentError> {
    if !digits
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(TraceParentError::NotHex(part));
    }
    u128::from_str_radix(digits, 16).map_err(|_| TraceParentError::NotHex(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_value_round_trips() {
        let tp = TraceParent::parse(VALID).unwrap();
        assert_eq!(tp.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(tp.parent_id, 0x00f067aa0ba902b7);
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), VALID);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled = TraceParent::parse(&VALID.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn leading_zeros_are_kept_when_written() {
        let tp = TraceParent {
            trace_id: 1,
            parent_id: 2,
            flags: 0,
        };
        assert_eq!(
            tp.to_string(),
            "00-00000000000000000000000000000001-0000000000000002-00"
        );
        assert_eq!(TraceParent::parse(&tp.to_string()).unwrap(), tp);
    }

    #[test]
    fn a_future_version_is_read_by_its_first_four_parts() {
        let future = VALID.replacen("00", "cc", 1) + "-what-comes-next";
        let tp = TraceParent::parse(&future).unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.to_string(), VALID, "written back as version 00");
        assert_eq!(
            TraceParent::parse(&(VALID.replacen("00", "cc", 1) + "x")),
            Err(TraceParentError::TrailingData)
        );
    }

    #[test]
    fn malformed_values_say_why() {
        let cases: Vec<(String, TraceParentError)> = vec![
            (String::new(), TraceParentError::Shape),
            ("garbage".into(), TraceParentError::Shape),
            (VALID[..54].into(), TraceParentError::Shape),
            (VALID.replace('-', "_"), TraceParentError::Shape),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e47-3600f067aa0ba902b7-01".into(),
                TraceParentError::Shape,
            ),
            (VALID.to_uppercase(), TraceParentError::NotHex("trace id")),
            (
                VALID.replace("4bf9", "4bfz"),
                TraceParentError::NotHex("trace id"),
            ),
            (
                VALID.replace("00f0", "00g0"),
                TraceParentError::NotHex("parent id"),
            ),
            (
                VALID.replace("-01", "-0x"),
                TraceParentError::NotHex("flags"),
            ),
            (
                VALID.replacen("00", "0z", 1),
                TraceParentError::NotHex("version"),
            ),
            (
                VALID.replacen("00", "ff", 1),
                TraceParentError::ForbiddenVersion,
            ),
            (format!("{VALID}-"), TraceParentError::TrailingData),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
                TraceParentError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".into(),
                TraceParentError::ZeroParentId,
            ),
            ("x".repeat(513), TraceParentError::TooLong(513)),
            // A multi-byte character where the 55th byte falls inside it.
            (format!("{}é{}", &VALID[..54], "x"), TraceParentError::Shape),
        ];
        for (value, why) in cases {
            assert_eq!(TraceParent::parse(&value), Err(why), "{value:?}");
        }
    }
}
