//! Decoders for the backend messages that describe and carry a result:
//! RowDescription, ParameterDescription and DataRow.
//!
//! The shadow comparer, the router's type check, the shadow executor and
//! the mirror's applier all read results; they read them through these, so
//! a malformed message is judged in one place. Like the rest of `protocol`,
//! each decoder takes a complete message body, borrows from it and returns
//! an error instead of panicking; none trusts a count to size memory.

use std::ops::Range;

use super::message::{take_cstr, take_value};
use super::FrameError;

// Backend message tags of results.
pub const ROW_DESCRIPTION: u8 = b'T';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const DATA_ROW: u8 = b'D';

/// One field of a RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    pub name: &'a [u8],
    /// The table the column comes from (0: none).
    pub table_oid: u32,
    /// Its attribute number in that table (0: none).
    pub column: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary (0 in a statement's Describe: not known yet).
    pub format: i16,
}

/// The fields of a RowDescription body, in order; the last item is an error
/// if the body is malformed (truncated, or bytes after the last field).
pub fn row_description(body: &[u8]) -> Fields<'_> {
    match split_count(body) {
        Ok((left, rest)) => Fields {
            rest,
            left,
            pending: None,
            done: false,
        },
        Err(e) => Fields {
            rest: &[],
            left: 0,
            pending: Some(e),
            done: false,
        },
    }
}

/// Iterator over a RowDescription's fields (see [`row_description`]).
pub struct Fields<'a> {
    rest: &'a [u8],
    left: u16,
    /// An error found before the first field, yielded first.
    pending: Option<FrameError>,
    /// An error was yielded, or the fields are over.
    done: bool,
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<FieldDescription<'a>, FrameError> {
        let name = take_cstr(&mut self.rest)?;
        let (fixed, rest) = self
            .rest
            .split_first_chunk::<18>()
            .ok_or(FrameError::Malformed("truncated RowDescription"))?;
        self.rest = rest;
        let u32_at = |at: usize| {
            u32::from_be_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let i16_at = |at: usize| i16::from_be_bytes([fixed[at], fixed[at + 1]]);
        Ok(FieldDescription {
            name,
            table_oid: u32_at(0),
            column: i16_at(4),
            type_oid: u32_at(6),
            type_size: i16_at(10),
            type_modifier: u32_at(12) as i32,
            format: i16_at(16),
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<FieldDescription<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending.take() {
            self.done = true;
            return Some(Err(e));
        }
        if self.done {
            return None;
        }
        if self.left == 0 {
            self.done = true;
            return (!self.rest.is_empty()).then_some(Err(FrameError::Malformed(
                "RowDescription has bytes after its last field",
            )));
        }
        self.left -= 1;
        let field = self.field();
        self.done = field.is_err();
        Some(field)
    }
}

/// The parameter type OIDs of a ParameterDescription body.
pub fn parameter_description(body: &[u8]) -> Result<impl Iterator<Item = u32> + '_, FrameError> {
    let (n, rest) = split_count(body)?;
    if rest.len() != 4 * usize::from(n) {
        return Err(FrameError::Malformed(
            "ParameterDescription length does not match its count",
        ));
    }
    Ok(rest
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
}

/// The values of a DataRow body, in order (None: NULL).
pub fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, FrameError> {
    let (n, mut rest) = split_count(body)?;
    // Each value takes at least its 4-byte length.
    let mut out = Vec::with_capacity(usize::from(n).min(rest.len() / 4));
    for _ in 0..n {
        out.push(take_value(&mut rest)?);
    }
    no_trailing(rest)?;
    Ok(out)
}

/// The values of a DataRow body as byte ranges of `body` (None: NULL), into
/// `out` (cleared first): for a caller that decodes many rows with one
/// buffer and reads the values later.
pub fn data_row_ranges(body: &[u8], out: &mut Vec<Option<Range<usize>>>) -> Result<(), FrameError> {
    out.clear();
    let (n, mut rest) = split_count(body)?;
    for _ in 0..n {
        let value = take_value(&mut rest)?;
        out.push(value.map(|v| {
            let start = body.len() - rest.len() - v.len();
            start..start + v.len()
        }));
    }
    no_trailing(rest)
}

/// The leading Int16 count of a message and what follows it.
fn split_count(body: &[u8]) -> Result<(u16, &[u8]), FrameError> {
    let (n, rest) = body
        .split_first_chunk::<2>()
        .ok_or(FrameError::Malformed("message without its count"))?;
    let n = i16::from_be_bytes(*n);
    let n = u16::try_from(n).map_err(|_| FrameError::Malformed("negative count"))?;
    Ok((n, rest))
}

fn no_trailing(rest: &[u8]) -> Result<(), FrameError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(FrameError::Malformed("bytes after the last value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_description_body(fields: &[(&str, u32, i16)]) -> Vec<u8> {
        let mut b = (fields.len() as i16).to_be_bytes().to_vec();
        for (name, type_oid, format) in fields {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&16385u32.to_be_bytes());
            b.extend_from_slice(&2i16.to_be_bytes());
            b.extend_from_slice(&type_oid.to_be_bytes());
            b.extend_from_slice(&4i16.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&format.to_be_bytes());
        }
        b
    }

    #[test]
    fn row_description_fields_and_their_errors() {
        let body = row_description_body(&[("id", 23, 0), ("t", 25, 1)]);
        let fields: Vec<_> = row_description(&body).collect::<Result<_, _>>().unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[0].name, b"id");
        assert_eq!(
            (fields[0].table_oid, fields[0].column, fields[0].type_oid),
            (16385, 2, 23)
        );
        assert_eq!((fields[0].type_size, fields[0].type_modifier), (4, -1));
        assert_eq!(
            (fields[1].name, fields[1].type_oid, fields[1].format),
            (&b"t"[..], 25, 1)
        );

        // Every truncation of it is an error, never a panic nor a short list
        // taken for the whole.
        for cut in 0..body.len() {
            let r: Result<Vec<_>, _> = row_description(&body[..cut]).collect();
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(row_description(&long)
            .collect::<Result<Vec<_>, _>>()
            .is_err());
        // A negative count.
        assert!(row_description(&[0xff, 0xff])
            .collect::<Result<Vec<_>, _>>()
            .is_err());
        // A huge count with nothing behind it fails on the first field.
        let mut it = row_description(&[0x7f, 0xff]);
        assert!(it.next().is_some_and(|f| f.is_err()));
        assert!(it.next().is_none());
        assert_eq!(row_description(&[0, 0]).count(), 0);
    }

    #[test]
    fn parameter_descriptions() {
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&23u32.to_be_bytes());
        body.extend_from_slice(&16390u32.to_be_bytes());
        assert_eq!(
            parameter_description(&body).unwrap().collect::<Vec<_>>(),
            [23, 16390]
        );
        assert!(parameter_description(&body[..body.len() - 1]).is_err());
        assert!(parameter_description(&[0x7f, 0xff]).is_err());
    }

    #[test]
    fn data_rows_values_ranges_and_their_errors() {
        let mut body = 3i16.to_be_bytes().to_vec();
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"42");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        let values = data_row(&body).unwrap();
        assert_eq!(values, [Some(&b"42"[..]), None, Some(&b""[..])]);
        let mut ranges = vec![None];
        data_row_ranges(&body, &mut ranges).unwrap();
        assert_eq!(ranges, [Some(6..8), None, Some(16..16)]);
        for cut in 0..body.len() {
            assert!(data_row(&body[..cut]).is_err(), "cut at {cut}");
            assert!(
                data_row_ranges(&body[..cut], &mut ranges).is_err(),
                "cut at {cut}"
            );
        }
        let mut long = body.clone();
        long.push(1);
        assert!(data_row(&long).is_err());
        // A negative length other than -1, and a length past the end.
        assert!(data_row(&[0, 1, 0xff, 0xff, 0xff, 0xfe]).is_err());
        assert!(data_row(&[0, 1, 0x7f, 0xff, 0xff, 0xff]).is_err());
        assert!(data_row(&[0x7f, 0xff]).is_err());
        assert_eq!(data_row(&[0, 0]).unwrap(), Vec::<Option<&[u8]>>::new());
    }
}
