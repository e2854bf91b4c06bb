//! Arithmetic of the numeric rules, checked: a write that would overflow is refused with an
//! error naming the field, never wrapped.
//!
//! Every numeric rule takes numbers within ±[`MAX_SAFE`] (2^53 − 1): the range in which
//! every integer has an exact `f64`, so `max`/`min` compare exactly here and in the
//! TypeScript clients (where numbers are doubles). For `counter`s the bound also keeps
//! Automerge's own sum of increments (the value minus its start, which must fit an `i64`)
//! far from overflowing, with room for hundreds of concurrent writers each moving the
//! counter across the whole range:
//!
//! - a counter's value and every `$inc` are integers within ±`MAX_SAFE`;
//! - the value a writer sees plus its increment (or the value it sets) must stay within
//!   ±`MAX_SAFE`; else the write is refused whole;
//! - a view sums concurrent counter values saturating at the `i64` bounds
//!   ([`counter_sum`]), so merged data never wraps either.

use crate::Error;

/// Largest magnitude any numeric rule takes: 2^53 − 1 (JavaScript's `MAX_SAFE_INTEGER`).
pub const MAX_SAFE: i64 = 9_007_199_254_740_991;

fn out_of_range(field: &str, rule: &str, what: impl std::fmt::Display) -> Error {
    Error::Patch(format!(
        "field {field:?} (rule {rule}) takes numbers from -{MAX_SAFE} to {MAX_SAFE}, got {what}"
    ))
}

/// Checks a number for a `max`/`min` field.
pub fn check_ordered(field: &str, rule: &str, n: &serde_json::Number) -> Result<(), Error> {
    let in_range = match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => i.unsigned_abs() <= MAX_SAFE as u64,
        (None, Some(u), _) => u <= MAX_SAFE as u64,
        (None, None, Some(f)) => f.is_finite() && f.abs() <= MAX_SAFE as f64,
        _ => false,
    };
    if in_range {
        Ok(())
    } else {
        Err(out_of_range(field, rule, n))
    }
}

/// A counter's value or increment from a patch: an integer within ±`MAX_SAFE`.
pub fn counter_arg(field: &str, n: &serde_json::Number) -> Result<i64, Error> {
    match n.as_i64() {
        Some(i) if i.unsigned_abs() <= MAX_SAFE as u64 => Ok(i),
        Some(_) => Err(out_of_range(field, "counter", n)),
        None if n.as_u64().is_some() => Err(out_of_range(field, "counter", n)),
        None => Err(Error::Patch(format!(
            "field {field:?} (rule counter) takes an integer, got {n}"
        ))),
    }
}

/// The counter's value after adding `inc` to `current`, or why it would overflow.
pub fn counter_add(field: &str, current: i64, inc: i64) -> Result<i64, Error> {
    match current.checked_add(inc) {
        Some(v) if v.unsigned_abs() <= MAX_SAFE as u64 => Ok(v),
        _ => Err(Error::Patch(format!(
            "field {field:?}: adding {inc} to the counter's {current} would overflow (a counter holds -{MAX_SAFE} to {MAX_SAFE})"
        ))),
    }
}

/// The increment that takes the counter from `current` to `target`, or why it would overflow.
pub fn counter_delta(field: &str, current: i64, target: i64) -> Result<i64, Error> {
    match target.checked_sub(current) {
        Some(d) if target.unsigned_abs() <= MAX_SAFE as u64 && d.unsigned_abs() <= 2 * MAX_SAFE as u64 => Ok(d),
        _ => Err(Error::Patch(format!(
            "field {field:?}: setting the counter from {current} to {target} would overflow (a counter holds -{MAX_SAFE} to {MAX_SAFE})"
        ))),
    }
}

/// The sum of a counter's concurrent values, saturating at the `i64` bounds.
pub fn counter_sum(values: impl IntoIterator<Item = i64>) -> i64 {
    let sum: i128 = values.into_iter().map(i128::from).sum();
    sum.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAFE: i128 = MAX_SAFE as i128;

    fn near_bounds() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(MAX_SAFE),
            Just(-MAX_SAFE),
            Just(0i64),
            (MAX_SAFE - 3)..=(MAX_SAFE + 3),
            (-MAX_SAFE - 3)..=(-MAX_SAFE + 3),
            -3i64..=3,
            any::<i64>()
        ]
    }

    proptest! {
        /// Checked counter arithmetic agrees with exact (i128) arithmetic: the exact result
        /// when it is within ±MAX_SAFE, else an error naming the field — never a wrapped value.
        #[test]
        fn counter_arithmetic_is_exact_or_refused(current in near_bounds(), inc in near_bounds()) {
            let exact = i128::from(current) + i128::from(inc);
            match counter_add("stock", current, inc) {
                Ok(v) => prop_assert_eq!(i128::from(v), exact),
                Err(e) => {
                    prop_assert!(exact.abs() > SAFE);
                    prop_assert!(e.to_string().contains("\"stock\""));
                }
            }
            match counter_delta("stock", current, inc) {
                Ok(d) => {
                    prop_assert_eq!(i128::from(d), i128::from(inc) - i128::from(current));
                    prop_assert!(i128::from(inc).abs() <= SAFE);
                }
                Err(_) => prop_assert!(i128::from(inc).abs() > SAFE || (i128::from(inc) - i128::from(current)).abs() > 2 * SAFE),
            }
            let sum = counter_sum([current, inc]);
            prop_assert_eq!(i128::from(sum), exact.clamp(i128::from(i64::MIN), i128::from(i64::MAX)));
            prop_assert_eq!(counter_arg("stock", &serde_json::Number::from(current)).is_ok(), i128::from(current).abs() <= SAFE);
        }

        /// `max`/`min` take exactly the numbers within ±MAX_SAFE.
        #[test]
        fn ordered_numbers_are_bounded(i in near_bounds(), f in any::<f64>()) {
            let ok = check_ordered("progress", "max", &serde_json::Number::from(i)).is_ok();
            prop_assert_eq!(ok, i128::from(i).abs() <= SAFE);
            if let Some(n) = serde_json::Number::from_f64(f) {
                prop_assert_eq!(check_ordered("progress", "max", &n).is_ok(), f.abs() <= MAX_SAFE as f64);
            }
        }
    }
}
