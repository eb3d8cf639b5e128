//! Human-friendly units in the config file: durations (`"250ms"`, `"5s"`,
//! `"2m"`) and sizes (`"64KiB"`, `"16MiB"`).
//!
//! These are the checked types every duration and size key goes through, so
//! a bad value is refused once, at parse time, with the key's position,
//! instead of at each use: no negative or non-finite number, no overflow, and
//! nothing beyond [`MAX_DURATION`] / [`MAX_SIZE`] (a year-long timeout or a
//! terabyte limit is a typo, and a bound here keeps `Instant + d`, `d * n`
//! and `as usize` free of overflow wherever a value is used).
//!
//! Both types keep the text the user wrote next to the parsed value, so the
//! effective config shown on `/config` reads the way the file does.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration any key accepts: 365 days.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The largest size any key accepts: 1 TiB.
pub const MAX_SIZE: u64 = 1 << 40;

/// A duration written as a number followed by `us`, `ms`, `s`, `m` or `h`;
/// at most [`MAX_DURATION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// A byte size written as a number followed by `B`, `KiB`, `MiB`, `GiB`
/// (or `KB`, `MB`, `GB` for powers of ten); a bare integer means bytes.
/// At most [`MAX_SIZE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("duration \"{text}\" must not be negative"));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration \"{text}\" needs a unit: ms, s, m or h"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("duration \"{text}\" does not start with a number"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("duration \"{text}\" does not start with a number"))?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "duration \"{text}\": unknown unit \"{unit}\" (use ms, s, m or h)"
            ))
        }
    };
    let seconds = value * scale;
    // Digits and dots only, so never negative or NaN; but a long run of
    // digits parses to a huge (or infinite) number.
    if !seconds.is_finite() || seconds > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "duration \"{text}\" is too long (at most 365 days, \"8760h\")"
        ));
    }
    Duration::try_from_secs_f64(seconds)
        .map_err(|e| format!("duration \"{text}\" is not a valid duration: {e}"))
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("size \"{text}\" must not be negative"));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "size \"{text}\" does not start with a whole number"
        ));
    }
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "size \"{text}\": unknown unit \"{other}\" (use B, KiB, MiB or GiB; whole numbers only)"
            ))
        }
    };
    let too_large = || format!("size \"{text}\" is too large (at most 1 TiB, \"1024GiB\")");
    let value: u64 = number.parse().map_err(|_| too_large())?;
    value
        .checked_mul(scale)
        .filter(|v| *v <= MAX_SIZE)
        .ok_or_else(too_large)
}

/// A size given as a bare TOML integer (bytes).
fn size_from_int(v: i64) -> Result<u64, String> {
    match u64::try_from(v) {
        Err(_) => Err(format!("size {v} must not be negative")),
        Ok(v) if v > MAX_SIZE => Err(format!("size {v} is too large (at most 1 TiB)")),
        Ok(v) => Ok(v),
    }
}

// === impl Dur ===

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"5s\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        if us % 1_000_000 == 0 {
            write!(f, "{}s", us / 1_000_000)
        } else if us % 1000 == 0 {
            write!(f, "{}ms", us / 1000)
        } else {
            write!(f, "{us}us")
        }
    }
}

// === impl Size ===

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64KiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                size_from_int(v).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                let v = i64::try_from(v).unwrap_or(i64::MAX);
                size_from_int(v).map(Size).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
    }

    #[test]
    fn durations_out_of_range_are_errors() {
        for bad in [
            "99999999999999999999s",
            "8761h",
            "1e400s",
            "-1s",
            "-0.5ms",
            "NaNs",
            "nan",
            "inf",
            ".s",
            "1..2s",
            "",
            "s",
        ] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("duration"), "{bad}: {e}");
        }
        let digits = "9".repeat(400) + "s";
        assert!(parse_duration(&digits).unwrap_err().contains("too long"));
    }

    #[test]
    fn durations_display_as_written() {
        for text in ["5s", "250ms", "10us", "0s"] {
            let d = Dur(parse_duration(text).unwrap());
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("1 TiB").is_err());
        assert_eq!(parse_size("1024GiB"), Ok(MAX_SIZE));
    }

    #[test]
    fn sizes_out_of_range_are_errors() {
        for bad in [
            "99999999999999999999",
            "18446744073709551615GiB",
            "1025GiB",
            "-1",
            "-5KiB",
            "1.5MiB",
            "KiB",
            "",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(size_from_int(-1).is_err());
        assert!(size_from_int(i64::MAX).is_err());
        assert_eq!(size_from_int(4096), Ok(4096));
    }
}
