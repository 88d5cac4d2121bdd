//! Hashing and normalisation: a value's type-aware canonical form, so that
//! representation-only differences (float digits, time zones, jsonb key
//! order, trailing zeros) hash equal; the row and key hashes built on it.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::ops::Range;

use super::*;

pub(super) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Row hash as it enters the multiset sums (decorrelated from the row hash itself).
pub(super) fn mix(hash: u64) -> u64 {
    fmix64(hash ^ 0x9e37_79b9_7f4a_7c15)
}

/// FNV-1a with an fmix64 finaliser: deterministic across processes, unlike RandomState.
pub(super) struct Fnv(pub(super) u64);

impl Fnv {
    pub(super) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(super) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Length-prefixed with a NULL marker, so NULL != '' and values can't run together.
    pub(super) fn value(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.write(&[0]),
            Some(v) => {
                self.write(&[1]);
                self.write(&(v.len() as u64).to_le_bytes());
                self.write(v);
            }
        }
    }

    pub(super) fn finish(&self) -> u64 {
        fmix64(self.0)
    }
}

pub(super) fn column_type(columns: Option<&[Column]>, i: usize) -> (u32, i16) {
    columns
        .and_then(|c| c.get(i))
        .map_or((0, 0), |c| (c.type_oid, c.format))
}

pub(super) fn row_hashes(
    body: &[u8],
    fields: &[Option<Range<usize>>],
    columns: Option<&[Column]>,
    ignored: &[bool],
    mode: &Mode,
) -> (u64, u64) {
    let mut h = Fnv::new();
    for (i, range) in fields.iter().enumerate() {
        if ignored.get(i).copied().unwrap_or(false) {
            continue;
        }
        let (ty, format) = column_type(columns, i);
        h.value(
            field(body, range.as_ref())
                .map(|v| normalize(ty, format, v))
                .as_deref(),
        );
    }
    let key = match mode {
        Mode::Unordered => 0,
        Mode::Keyed(keys) => {
            let mut k = Fnv::new();
            for &c in keys {
                let (ty, format) = column_type(columns, c);
                let v = field(body, fields.get(c).and_then(Option::as_ref));
                k.value(v.map(|v| normalize(ty, format, v)).as_deref());
            }
            k.finish()
        }
    };
    (h.finish(), key)
}

/// Type-aware canonical form of one value, so representation-only differences hash equal.
pub(super) fn normalize(ty: u32, format: i16, raw: &[u8]) -> Cow<'_, [u8]> {
    if format != 0 {
        return normalize_binary(ty, raw);
    }
    // Most columns are not normalised: skip the UTF-8 check for them.
    if !matches!(
        ty,
        OID_FLOAT8
            | OID_FLOAT4
            | OID_NUMERIC
            | OID_TIME
            | OID_TIMETZ
            | OID_TIMESTAMP
            | OID_TIMESTAMPTZ
            | OID_INTERVAL
            | OID_JSONB
    ) {
        return Cow::Borrowed(raw);
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return Cow::Borrowed(raw);
    };
    let out = match ty {
        OID_FLOAT8 => float_text(text, 15),
        OID_FLOAT4 => float_text(text, 6),
        OID_NUMERIC => numeric_text(text),
        OID_TIME | OID_TIMETZ | OID_TIMESTAMP => strip_fraction(text, false),
        OID_INTERVAL => strip_fraction(text, true),
        OID_TIMESTAMPTZ => {
            let stripped = strip_fraction(text, false);
            let base = stripped.as_deref().unwrap_or(text);
            timestamptz_utc(base).or(stripped)
        }
        OID_JSONB => jsonb_canonical(text),
        _ => None,
    };
    match out {
        Some(s) => Cow::Owned(s.into_bytes()),
        None => Cow::Borrowed(raw),
    }
}

pub(super) fn normalize_binary(ty: u32, raw: &[u8]) -> Cow<'_, [u8]> {
    match ty {
        OID_FLOAT8 => match <[u8; 8]>::try_from(raw) {
            Ok(b) => {
                let v = f64::from_be_bytes(b);
                if v == 0.0 {
                    Cow::Owned(0f64.to_be_bytes().to_vec())
                } else if v.is_nan() {
                    Cow::Owned(f64::NAN.to_be_bytes().to_vec())
                } else {
                    Cow::Borrowed(raw)
                }
            }
            Err(_) => Cow::Borrowed(raw),
        },
        OID_FLOAT4 => match <[u8; 4]>::try_from(raw) {
            Ok(b) => {
                let v = f32::from_be_bytes(b);
                if v == 0.0 {
                    Cow::Owned(0f32.to_be_bytes().to_vec())
                } else if v.is_nan() {
                    Cow::Owned(f32::NAN.to_be_bytes().to_vec())
                } else {
                    Cow::Borrowed(raw)
                }
            }
            Err(_) => Cow::Borrowed(raw),
        },
        _ => Cow::Borrowed(raw),
    }
}

/// Rounds to `digits` significant digits, which hides extra_float_digits and
/// last-bit noise (e.g. from parallel aggregation).
pub(super) fn float_text(text: &str, digits: usize) -> Option<String> {
    let v: f64 = text.trim().parse().ok()?;
    if v.is_nan() {
        return Some("NaN".into());
    }
    if v.is_infinite() {
        return Some(if v > 0.0 { "Infinity" } else { "-Infinity" }.into());
    }
    let v = if v == 0.0 { 0.0 } else { v };
    Some(format!("{:.*e}", digits.saturating_sub(1), v))
}

pub(super) fn numeric_text(text: &str) -> Option<String> {
    let mut s = text.trim();
    if s.contains('.') {
        s = s.trim_end_matches('0');
        s = s.strip_suffix('.').unwrap_or(s);
    }
    if s == "-0" {
        s = "0";
    }
    (s != text).then(|| s.to_string())
}

/// Drops trailing zeros of fractional seconds (and a bare '.'). Outside
/// intervals only a '.' after ":SS" counts, so dates like "02.10.2024" survive.
pub(super) fn strip_fraction(text: &str, any_dot: bool) -> Option<String> {
    let b = text.as_bytes();
    let digit = |i: Option<usize>| i.and_then(|i| b.get(i)).is_some_and(u8::is_ascii_digit);
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        let seconds_dot = b.get(i) == Some(&b'.')
            && digit(i.checked_sub(1))
            && (any_dot
                || (digit(i.checked_sub(2))
                    && i.checked_sub(3).and_then(|j| b.get(j)) == Some(&b':')));
        if !seconds_dot {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut end = start;
        while digit(Some(end)) {
            end += 1;
        }
        if end == start {
            i += 1;
            continue;
        }
        let digits = b.get(start..end).unwrap_or_default();
        let keep = digits.iter().rposition(|d| *d != b'0').map_or(0, |p| p + 1);
        out.extend_from_slice(b.get(copied..i).unwrap_or_default());
        if keep > 0 {
            out.push(b'.');
            out.extend_from_slice(digits.get(..keep).unwrap_or_default());
        }
        copied = end;
        i = end;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(b.get(copied..).unwrap_or_default());
    // Only ASCII was removed, so this cannot fail; fall back to no change if it did.
    String::from_utf8(out).ok()
}

pub(super) fn small_number(s: &str, min_len: usize, max_len: usize) -> Option<i64> {
    if s.len() < min_len || s.len() > max_len || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Rewrites an ISO-style timestamptz ("2024-01-02 03:04:05.5+01[:30[:15]][ BC]") in
/// UTC, so the session TimeZone doesn't matter. None if anything is unexpected.
pub(super) fn timestamptz_utc(text: &str) -> Option<String> {
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let (date, time) = body.split_once(' ')?;
    let mut d = date.split('-');
    let year = small_number(d.next()?, 4, 7)?;
    let month = small_number(d.next()?, 2, 2)?;
    let day = small_number(d.next()?, 2, 2)?;
    if d.next().is_some() || year == 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let sign_at = time.find(['+', '-'])?;
    let (clock, offset) = (time.get(..sign_at)?, time.get(sign_at..)?);
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) => (hms, Some(f)),
        None => (clock, None),
    };
    if let Some(f) = fraction {
        if f.is_empty() || !f.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    let mut t = hms.split(':');
    let hour = small_number(t.next()?, 2, 2)?;
    let minute = small_number(t.next()?, 2, 2)?;
    let second = small_number(t.next()?, 2, 2)?;
    if t.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut o = offset.get(1..)?.split(':');
    let mut offset_secs = small_number(o.next()?, 2, 2)? * 3600;
    if let Some(m) = o.next() {
        offset_secs += small_number(m, 2, 2)? * 60;
    }
    if let Some(s) = o.next() {
        offset_secs += small_number(s, 2, 2)?;
    }
    if o.next().is_some() {
        return None;
    }
    let astronomical = if bc { 1 - year } else { year };
    let secs =
        days_from_civil(astronomical, month, day) * 86_400 + hour * 3600 + minute * 60 + second
            - sign * offset_secs;
    let (y, m, dd) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let (shown_year, era) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    let mut out = format!(
        "{shown_year:04}-{m:02}-{dd:02} {:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    );
    if let Some(f) = fraction {
        out.push('.');
        out.push_str(f);
    }
    out.push_str("+00");
    out.push_str(era);
    Some(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub(super) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(super) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub(super) fn jsonb_canonical(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let mut out = String::with_capacity(text.len());
    write_json(&value, &mut out);
    Some(out)
}

/// Canonical JSON: object keys sorted. Depth is bounded by serde_json's parse limit.
pub(super) fn write_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(k, out);
                out.push(':');
                write_json(v, out);
            }
            out.push('}');
        }
    }
}

pub(super) fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A value as a float, for tolerance checks: float4/float8 (text or binary), numeric text.
pub(super) fn float_value(ty: u32, format: i16, raw: &[u8]) -> Option<f64> {
    match (ty, format) {
        (OID_FLOAT8 | OID_FLOAT4 | OID_NUMERIC, 0) => {
            std::str::from_utf8(raw).ok()?.trim().parse().ok()
        }
        (OID_FLOAT8, 1) => Some(f64::from_be_bytes(<[u8; 8]>::try_from(raw).ok()?)),
        (OID_FLOAT4, 1) => Some(f64::from(f32::from_be_bytes(
            <[u8; 4]>::try_from(raw).ok()?,
        ))),
        _ => None,
    }
}

pub(super) fn is_floaty(ty: u32, format: i16) -> bool {
    matches!(
        (ty, format),
        (OID_FLOAT8 | OID_FLOAT4, _) | (OID_NUMERIC, 0)
    )
}

pub(super) fn close(x: f64, y: f64, tolerance: f64) -> bool {
    if x.is_nan() || y.is_nan() {
        return x.is_nan() && y.is_nan();
    }
    if x.is_infinite() || y.is_infinite() {
        return x == y;
    }
    (x - y).abs() <= tolerance * 1f64.max(x.abs()).max(y.abs())
}
