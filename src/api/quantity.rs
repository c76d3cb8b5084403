//! Kubernetes resource quantities (`256Mi`, `1G`, `1.5Gi`) as byte counts.

use thiserror::Error;

/// A memory quantity that cannot be turned into bytes.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum QuantityError {
    #[error("quantity {0:?} is empty")]
    Empty(String),
    #[error(
        "quantity {0:?} is not a number with an optional suffix (Ki Mi Gi Ti Pi Ei k M G T P E)"
    )]
    Malformed(String),
    #[error("quantity {0:?} does not fit in 64 bits")]
    Overflow(String),
    #[error("quantity {0:?} is negative")]
    Negative(String),
}

/// Parse a Kubernetes quantity into a whole number of bytes (rounded up, as the API server
/// rounds memory requests up to whole units).
pub(crate) fn parse_quantity_bytes(input: &str) -> Result<u64, QuantityError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty(input.to_string()));
    }
    if s.starts_with('-') {
        return Err(QuantityError::Negative(input.to_string()));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(QuantityError::Malformed(input.to_string()));
    }
    let (multiplier, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        other => match other.strip_prefix(['e', 'E']) {
            Some(exp) => (
                1,
                exp.parse::<i32>()
                    .map_err(|_| QuantityError::Malformed(input.to_string()))?,
            ),
            None => return Err(QuantityError::Malformed(input.to_string())),
        },
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{whole}{frac}");
    let mut mantissa: u128 = digits
        .parse()
        .map_err(|_| QuantityError::Overflow(input.to_string()))?;
    mantissa = mantissa
        .checked_mul(multiplier)
        .ok_or_else(|| QuantityError::Overflow(input.to_string()))?;
    let scale = exp10
        - i32::try_from(frac.len()).map_err(|_| QuantityError::Overflow(input.to_string()))?;
    let value = if scale >= 0 {
        10u128
            .checked_pow(scale.unsigned_abs())
            .and_then(|p| mantissa.checked_mul(p))
            .ok_or_else(|| QuantityError::Overflow(input.to_string()))?
    } else {
        let divisor = 10u128
            .checked_pow(scale.unsigned_abs())
            .ok_or_else(|| QuantityError::Overflow(input.to_string()))?;
        mantissa.div_ceil(divisor)
    };
    u64::try_from(value).map_err(|_| QuantityError::Overflow(input.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(parse_quantity_bytes("256Mi"), Ok(256 << 20));
        assert_eq!(parse_quantity_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity_bytes("64M"), Ok(64_000_000));
        assert_eq!(parse_quantity_bytes("1e3"), Ok(1000));
        assert_eq!(parse_quantity_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_quantity_bytes("1500m"), Ok(2));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_quantity_bytes("lots"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("12Xi"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity_bytes(""),
            Err(QuantityError::Empty(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("1.2.3"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("99999Ei"),
            Err(QuantityError::Overflow(_))
        ));
    }
}
