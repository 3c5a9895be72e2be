//! Converting a step's JSON values to the types its SQL statement declares.
//!
//! A parameter is bound with the type PostgreSQL inferred for it when the statement
//! was prepared (`:qty` in `available >= :qty` is an `int4`, `:amount::numeric` is a
//! `numeric`), never with a type guessed from the JSON value. Binding by JSON type
//! would let the first value a statement ever saw decide its binary format for the
//! rest of the connection's life (sqlx caches prepared statements by their text), and
//! a later `20` sent as `int8` bytes into a `float8` slot is read as 1e-322.
//!
//! [`convert`] is the rule, pure and exhaustively unit-tested: each JSON value is
//! converted *exactly* to the declared type or refused with a [`ParamError`] naming the
//! parameter. Refusals are data errors: the step fails fatally, it is never retried.

use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Utc};
use serde_json::Value;
use sqlx::encode::{Encode, IsNull};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgTypeKind};
use sqlx::types::BigDecimal;
use sqlx::{Postgres, Type, TypeInfo};
use uuid::Uuid;

/// A JSON value that cannot be bound to its parameter's declared type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter {name}: {problem}")]
pub struct ParamError {
    /// The parameter's name in the saga file (`qty` for `:qty`).
    pub name: String,
    /// What is wrong, e.g. `expected integer, got string "two"`.
    pub problem: String,
}

/// A value ready to bind: encoded in the binary format of exactly the type the
/// statement declares for its parameter.
#[derive(Debug, Clone)]
pub struct Bound {
    ty: PgTypeInfo,
    value: Scalar,
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Numeric(BigDecimal),
    Text(String),
    Json(Value),
    Uuid(Uuid),
    Timestamptz(DateTime<Utc>),
    Timestamp(NaiveDateTime),
    Date(NaiveDate),
}

/// How a declared type takes its value, after looking through domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    /// Every type whose binary input is its text: text, varchar, char(n), name, citext,
    /// and enum labels.
    Text,
    Json,
    Uuid,
    Timestamptz,
    Timestamp,
    Date,
}

impl Target {
    fn of(ty: &PgTypeInfo) -> Option<Target> {
        match ty.kind() {
            PgTypeKind::Domain(base) => return Target::of(base),
            PgTypeKind::Enum(_) => return Some(Target::Text),
            _ => {}
        }
        Some(match ty.name() {
            "BOOL" => Target::Bool,
            "INT2" => Target::Int2,
            "INT4" => Target::Int4,
            "INT8" => Target::Int8,
            "FLOAT4" => Target::Float4,
            "FLOAT8" => Target::Float8,
            "NUMERIC" => Target::Numeric,
            // "CHAR" is sqlx's name for bpchar (char(n)); the one-byte `"char"` is not text.
            "TEXT" | "VARCHAR" | "CHAR" | "NAME" | "citext" => Target::Text,
            "JSON" | "JSONB" => Target::Json,
            "UUID" => Target::Uuid,
            "TIMESTAMPTZ" => Target::Timestamptz,
            "TIMESTAMP" => Target::Timestamp,
            "DATE" => Target::Date,
            _ => return None,
        })
    }

    /// The word used in "expected …".
    fn expected(self) -> &'static str {
        match self {
            Target::Bool => "boolean",
            Target::Int2 | Target::Int4 | Target::Int8 => "integer",
            Target::Float4 | Target::Float8 => "number",
            Target::Numeric => "number or decimal string",
            Target::Text => "string",
            Target::Json => "any JSON value",
            Target::Uuid => "UUID string",
            Target::Timestamptz => "RFC 3339 time with offset (2026-11-28T10:00:00Z)",
            Target::Timestamp => "date-time string without offset (2026-11-28T10:00:00)",
            Target::Date => "date string (2026-11-28)",
        }
    }
}

/// The earliest year PostgreSQL's date and timestamp types hold (4713 BC, in the
/// proleptic calendar chrono counts with: year 0 is 1 BC).
const MIN_PG_YEAR: i32 = -4712;

/// Converts `value` for parameter `name`, declared by the statement as `ty`.
///
/// JSON `null` binds SQL `NULL` for every type. Otherwise:
/// - integers (`int2`/`int4`/`int8`): a JSON number with no fractional part, in range
///   (`2500.0` is 2500; `2.5` is refused, never rounded);
/// - `float4`/`float8`: any JSON number (an integer beyond 2^53 is refused: it has no
///   exact `float8`);
/// - `numeric`: a JSON number (its exact decimal text) or a string holding a decimal;
/// - `bool`: `true`/`false`; text types, `citext` and enums: a string;
/// - `json`/`jsonb`: any JSON value; `uuid`: a UUID string;
/// - `timestamptz`: an RFC 3339 string with offset; `timestamp`: the same without
///   offset; `date`: `YYYY-MM-DD`;
/// - text never holds NUL (`\u0000`): PostgreSQL cannot store it.
///
/// Any other declared type is refused with a hint to cast from text in SQL
/// (`:x::text::interval`), which makes the parameter a `text`.
pub fn convert(name: &str, value: &Value, ty: &PgTypeInfo) -> Result<Bound, ParamError> {
    let err = |problem: String| ParamError {
        name: name.to_string(),
        problem,
    };
    let Some(target) = Target::of(ty) else {
        return Err(err(format!(
            "the statement expects type {ty_name}, which skald does not bind directly; \
             cast from text in the SQL instead (:{name}::text::{lower})",
            ty_name = ty.name(),
            lower = ty.name().to_ascii_lowercase(),
        )));
    };
    let mismatch = || {
        err(format!(
            "expected {}, got {}",
            target.expected(),
            describe(value)
        ))
    };
    let out_of_range = |what: &str| err(format!("{} is out of range for {what}", describe(value)));
    let scalar = match (target, value) {
        (_, Value::Null) => Scalar::Null,
        (Target::Json, v) => Scalar::Json(v.clone()),
        (Target::Bool, Value::Bool(b)) => Scalar::Bool(*b),
        (Target::Int2 | Target::Int4 | Target::Int8, Value::Number(n)) => {
            let i = exact_integer(n).ok_or_else(mismatch)?;
            match target {
                Target::Int2 => {
                    Scalar::Int2(i16::try_from(i).map_err(|_| out_of_range("smallint (int2)"))?)
                }
                Target::Int4 => {
                    Scalar::Int4(i32::try_from(i).map_err(|_| out_of_range("integer (int4)"))?)
                }
                _ => Scalar::Int8(i64::try_from(i).map_err(|_| out_of_range("bigint (int8)"))?),
            }
        }
        (Target::Float4 | Target::Float8, Value::Number(n)) => {
            let f = exact_float(n).ok_or_else(|| {
                err(format!(
                    "{} has no exact double-precision value",
                    describe(value)
                ))
            })?;
            if target == Target::Float4 {
                let narrow = f as f32;
                if narrow.is_infinite() {
                    return Err(out_of_range("real (float4)"));
                }
                Scalar::Float4(narrow)
            } else {
                Scalar::Float8(f)
            }
        }
        (Target::Numeric, Value::Number(n)) => {
            Scalar::Numeric(BigDecimal::from_str(&n.to_string()).map_err(|_| mismatch())?)
        }
        (Target::Numeric, Value::String(s)) => Scalar::Numeric(decimal(s).ok_or_else(mismatch)?),
        (Target::Text, Value::String(s)) => {
            if s.contains('\0') {
                return Err(err(
                    "text contains a NUL character (\\u0000), which PostgreSQL cannot store".into(),
                ));
            }
            Scalar::Text(s.clone())
        }
        (Target::Uuid, Value::String(s)) => {
            Scalar::Uuid(Uuid::parse_str(s).map_err(|_| mismatch())?)
        }
        (Target::Timestamptz, Value::String(s)) => {
            let t = DateTime::parse_from_rfc3339(s).map_err(|_| mismatch())?;
            let t = t.with_timezone(&Utc);
            if t.year() < MIN_PG_YEAR {
                return Err(out_of_range("timestamptz"));
            }
            Scalar::Timestamptz(t)
        }
        (Target::Timestamp, Value::String(s)) => {
            let t = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
                .ok_or_else(mismatch)?;
            if t.year() < MIN_PG_YEAR {
                return Err(out_of_range("timestamp"));
            }
            Scalar::Timestamp(t)
        }
        (Target::Date, Value::String(s)) => {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| mismatch())?;
            if d.year() < MIN_PG_YEAR {
                return Err(out_of_range("date"));
            }
            Scalar::Date(d)
        }
        _ => return Err(mismatch()),
    };
    Ok(Bound {
        ty: ty.clone(),
        value: scalar,
    })
}

/// The integer a JSON number denotes exactly, if it denotes one (`2500.0` does).
fn exact_integer(n: &serde_json::Number) -> Option<i128> {
    if let Some(i) = n.as_i64() {
        return Some(i.into());
    }
    if let Some(u) = n.as_u64() {
        return Some(u.into());
    }
    let f = n.as_f64()?;
    // Every f64 of magnitude ≥ 2^53 is an integer, but not the integer that was written
    // (serde_json read the text into an f64): refuse rather than guess.
    (f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0).then_some(f as i128)
}

/// The f64 a JSON number denotes exactly: floats as parsed, integers only while f64
/// holds them exactly.
fn exact_float(n: &serde_json::Number) -> Option<f64> {
    if let Some(i) = n.as_i64() {
        let f = i as f64;
        return (f as i64 == i && f.abs() < 9_007_199_254_740_992.0).then_some(f);
    }
    if let Some(u) = n.as_u64() {
        let f = u as f64;
        return (f < 9_007_199_254_740_992.0).then_some(f);
    }
    n.as_f64().filter(|f| f.is_finite())
}

/// A decimal string (`"19.90"`, `"-1e3"`), with nothing else around it.
fn decimal(s: &str) -> Option<BigDecimal> {
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
    if !plain || s.is_empty() {
        return None;
    }
    BigDecimal::from_str(s).ok()
}

/// A short description of a JSON value for an error message.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => {
            let mut shown: String = s.chars().take(40).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            format!("string {}", Value::String(shown))
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl Type<Postgres> for Bound {
    /// Never used to choose the wire type: [`Encode::produces`] names the declared type.
    fn type_info() -> PgTypeInfo {
        <String as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Bound {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        match &self.value {
            Scalar::Null => Ok(IsNull::Yes),
            Scalar::Bool(v) => <bool as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Int2(v) => <i16 as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Int4(v) => <i32 as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Int8(v) => <i64 as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Float4(v) => <f32 as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Float8(v) => <f64 as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Numeric(v) => <BigDecimal as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Text(v) => <String as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Json(v) => {
                <sqlx::types::Json<&Value> as Encode<Postgres>>::encode(sqlx::types::Json(v), buf)
            }
            Scalar::Uuid(v) => <Uuid as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Timestamptz(v) => <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Timestamp(v) => <NaiveDateTime as Encode<Postgres>>::encode_by_ref(v, buf),
            Scalar::Date(v) => <NaiveDate as Encode<Postgres>>::encode_by_ref(v, buf),
        }
    }

    fn produces(&self) -> Option<PgTypeInfo> {
        Some(self.ty.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The resolved type info sqlx gives a statement parameter of this name.
    fn ty(name: &'static str) -> PgTypeInfo {
        use sqlx::postgres::types::PgInterval;
        match name {
            "BOOL" => <bool as Type<Postgres>>::type_info(),
            "INT2" => <i16 as Type<Postgres>>::type_info(),
            "INT4" => <i32 as Type<Postgres>>::type_info(),
            "INT8" => <i64 as Type<Postgres>>::type_info(),
            "FLOAT4" => <f32 as Type<Postgres>>::type_info(),
            "FLOAT8" => <f64 as Type<Postgres>>::type_info(),
            "NUMERIC" => <BigDecimal as Type<Postgres>>::type_info(),
            "TEXT" => <String as Type<Postgres>>::type_info(),
            "JSONB" => <sqlx::types::Json<Value> as Type<Postgres>>::type_info(),
            "UUID" => <Uuid as Type<Postgres>>::type_info(),
            "TIMESTAMPTZ" => <DateTime<Utc> as Type<Postgres>>::type_info(),
            "TIMESTAMP" => <NaiveDateTime as Type<Postgres>>::type_info(),
            "DATE" => <NaiveDate as Type<Postgres>>::type_info(),
            "INTERVAL" => <PgInterval as Type<Postgres>>::type_info(),
            other => panic!("no test type {other}"),
        }
    }

    fn ok(value: Value, t: &'static str) -> Scalar {
        match convert("p", &value, &ty(t)) {
            Ok(b) => b.value,
            Err(e) => panic!("{value} as {t}: {e}"),
        }
    }

    fn refused(value: Value, t: &'static str) -> String {
        match convert("p", &value, &ty(t)) {
            Ok(b) => panic!("{value} as {t} was accepted as {:?}", b.value),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn integers_take_whole_numbers_only() {
        assert_eq!(ok(json!(2500), "INT8"), Scalar::Int8(2500));
        assert_eq!(ok(json!(2500.0), "INT8"), Scalar::Int8(2500));
        assert_eq!(ok(json!(-3), "INT4"), Scalar::Int4(-3));
        assert_eq!(ok(json!(7.0), "INT2"), Scalar::Int2(7));
        assert_eq!(
            refused(json!(2.5), "INT4"),
            "parameter p: expected integer, got number 2.5"
        );
        assert_eq!(
            refused(json!("two"), "INT4"),
            "parameter p: expected integer, got string \"two\""
        );
        assert_eq!(
            refused(json!("2"), "INT8"),
            "parameter p: expected integer, got string \"2\""
        );
        assert_eq!(
            refused(json!(true), "INT8"),
            "parameter p: expected integer, got boolean true"
        );
    }

    #[test]
    fn integers_out_of_range_are_refused_not_wrapped() {
        assert!(refused(json!(70000), "INT2").contains("out of range for smallint"));
        assert!(refused(json!(3_000_000_000_i64), "INT4").contains("out of range for integer"));
        assert!(refused(json!(u64::MAX), "INT8").contains("out of range for bigint"));
        // A float too large to be the integer that was written.
        assert!(refused(json!(1e300), "INT8").contains("expected integer"));
    }

    #[test]
    fn floats_take_numbers_and_refuse_inexact_integers() {
        assert_eq!(ok(json!(19.9), "FLOAT8"), Scalar::Float8(19.9));
        assert_eq!(ok(json!(20), "FLOAT8"), Scalar::Float8(20.0));
        assert_eq!(ok(json!(1.5), "FLOAT4"), Scalar::Float4(1.5));
        assert!(refused(json!(9_007_199_254_740_993_i64), "FLOAT8").contains("no exact"));
        assert!(refused(json!(1e300), "FLOAT4").contains("out of range for real"));
        assert!(refused(json!("1.5"), "FLOAT8").contains("expected number"));
    }

    #[test]
    fn numeric_takes_the_exact_decimal_of_numbers_and_strings() {
        let n = |s: &str| Scalar::Numeric(BigDecimal::from_str(s).unwrap());
        assert_eq!(ok(json!(19.9), "NUMERIC"), n("19.9"));
        assert_eq!(ok(json!(2500), "NUMERIC"), n("2500"));
        assert_eq!(ok(json!("19.90"), "NUMERIC"), n("19.90"));
        assert_eq!(ok(json!("-1e3"), "NUMERIC"), n("-1000"));
        assert!(refused(json!("12 apples"), "NUMERIC").contains("expected number or decimal"));
        assert!(refused(json!("NaN"), "NUMERIC").contains("expected number or decimal"));
        assert!(refused(json!(""), "NUMERIC").contains("expected number or decimal"));
    }

    #[test]
    fn text_takes_strings_without_nul() {
        assert_eq!(ok(json!("SKU-1"), "TEXT"), Scalar::Text("SKU-1".into()));
        assert!(refused(json!(42), "TEXT").contains("expected string, got number 42"));
        assert!(refused(json!("a\u{0}b"), "TEXT").contains("NUL"));
    }

    #[test]
    fn null_is_sql_null_for_every_type() {
        for t in ["INT4", "FLOAT8", "NUMERIC", "TEXT", "JSONB", "UUID", "DATE"] {
            assert_eq!(ok(Value::Null, t), Scalar::Null, "{t}");
        }
    }

    #[test]
    fn json_takes_anything() {
        assert_eq!(
            ok(json!({"a": [1]}), "JSONB"),
            Scalar::Json(json!({"a": [1]}))
        );
        assert_eq!(ok(json!(3), "JSONB"), Scalar::Json(json!(3)));
    }

    #[test]
    fn uuids_times_and_dates_parse_exactly() {
        let id = "6f1c2a4e-8f0b-4b6e-9a51-0d2c7f3e1a01";
        assert_eq!(
            ok(json!(id), "UUID"),
            Scalar::Uuid(Uuid::parse_str(id).unwrap())
        );
        assert!(refused(json!("not-a-uuid"), "UUID").contains("expected UUID"));
        assert!(matches!(
            ok(json!("2026-11-28T10:00:00+01:00"), "TIMESTAMPTZ"),
            Scalar::Timestamptz(t) if t.to_rfc3339() == "2026-11-28T09:00:00+00:00"
        ));
        assert!(refused(json!("2026-11-28T10:00:00"), "TIMESTAMPTZ").contains("RFC 3339"));
        assert!(matches!(
            ok(json!("2026-11-28 10:00:00.5"), "TIMESTAMP"),
            Scalar::Timestamp(_)
        ));
        assert!(matches!(ok(json!("2026-11-28"), "DATE"), Scalar::Date(_)));
        assert!(refused(json!("-5000-01-01"), "DATE").contains("out of range"));
        assert!(refused(json!("28/11/2026"), "DATE").contains("expected date"));
    }

    #[test]
    fn bool_takes_booleans_only() {
        assert_eq!(ok(json!(true), "BOOL"), Scalar::Bool(true));
        assert!(refused(json!("true"), "BOOL").contains("expected boolean"));
        assert!(refused(json!(1), "BOOL").contains("expected boolean"));
    }

    #[test]
    fn other_types_are_refused_with_a_cast_hint() {
        let e = refused(json!("1 day"), "INTERVAL");
        assert!(e.contains(":p::text::interval"), "{e}");
    }

    #[test]
    fn the_bound_value_announces_the_declared_type() {
        let b = convert("p", &json!(5), &ty("INT4")).unwrap();
        assert_eq!(b.produces().unwrap().name(), "INT4");
    }
}
