//! Reporting a difference: the rows that differ on each side, shown
//! bounded and with their values clipped.

use std::fmt::Write as _;

use super::*;

pub(super) fn hex(raw: &[u8]) -> String {
    let mut s = String::with_capacity(2 + raw.len() * 2);
    s.push_str("\\x");
    for b in raw {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(super) fn clip(s: String, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((at, _)) => {
            let mut out = s.get(..at).unwrap_or_default().to_string();
            out.push('…');
            out
        }
        None => s,
    }
}

pub(super) fn report(
    i: usize,
    x: &ResultSet,
    y: &ResultSet,
    ctx: &RowCtx<'_>,
    found: &Found<'_>,
    max_rows_compared: usize,
) -> Difference {
    let ra = decode_some(&found.a);
    let rb = decode_some(&found.b);
    // Greedy pairing by most equal columns, served rows in order.
    let mut used = vec![false; rb.len()];
    let mut pairs: Vec<(usize, Option<usize>)> = Vec::new();
    for (ia, row) in ra.iter().enumerate() {
        let best = rb
            .iter()
            .enumerate()
            .filter(|(j, _)| !used.get(*j).copied().unwrap_or(true))
            .max_by_key(|(j, other)| (ctx.equal_columns(row, other), std::cmp::Reverse(*j)))
            .map(|(j, _)| j);
        if let Some(u) = best.and_then(|j| used.get_mut(j)) {
            *u = true;
        }
        pairs.push((ia, best));
    }
    // Under a tolerance, pairs equal within it are not differences: leave them out.
    if ctx.tolerance > 0.0 {
        pairs.retain(|(ia, ib)| match (ra.get(*ia), ib.and_then(|j| rb.get(j))) {
            (Some(p), Some(q)) => ctx.first_difference(p, q).is_some(),
            _ => true,
        });
    }
    let mut rows_a = Vec::new();
    let mut rows_b = Vec::new();
    for (ia, ib) in &pairs {
        if let Some(r) = ra.get(*ia).filter(|_| rows_a.len() < MAX_SHOWN_ROWS) {
            rows_a.push(ctx.render_row(r));
        }
        if let Some(r) = ib
            .and_then(|j| rb.get(j))
            .filter(|_| rows_b.len() < MAX_SHOWN_ROWS)
        {
            rows_b.push(ctx.render_row(r));
        }
    }
    for (j, r) in rb.iter().enumerate() {
        if rows_b.len() >= MAX_SHOWN_ROWS {
            break;
        }
        if !used.get(j).copied().unwrap_or(true) {
            rows_b.push(ctx.render_row(r));
        }
    }
    // The first pair that differs in a compared column names the column.
    let first_pair = pairs.iter().find_map(|(ia, ib)| {
        let (p, q) = (ra.get(*ia)?, rb.get((*ib)?)?);
        Some((p, q, ctx.first_difference(p, q)?))
    });
    let mut first_column = None;
    let mut column_detail = None;
    if let Some((p, q, c)) = first_pair {
        first_column = ctx.name(c);
        let label = match ctx.name(c) {
            Some(name) => format!("column {} \"{}\"", c + 1, name),
            None => format!("column {}", c + 1),
        };
        let value = |row: &[Option<&[u8]>]| {
            if c < row.len() {
                ctx.shown(c, row.get(c).copied().flatten())
            } else {
                "(no such column)".into()
            }
        };
        column_detail = Some(format!(
            "{label} differs: served {} vs shadow {}",
            value(p),
            value(q)
        ));
    }
    let at = found
        .at_row
        .map(|r| format!("row {r}: "))
        .unwrap_or_default();
    let (kind, detail) = if x.rows != y.rows {
        (
            DiffKind::RowCount,
            format!("row count differs: served {} vs shadow {}", x.rows, y.rows),
        )
    } else if let Some(d) = column_detail {
        (DiffKind::Rows, format!("{at}{d}"))
    } else if found.a.is_empty() && found.b.is_empty() {
        (
            DiffKind::Rows,
            format!(
                "rows differ beyond the first {max_rows_compared} rows kept per result set (only a combined hash was compared)"
            ),
        )
    } else if !ra.is_empty() && rb.is_empty() && found.b.is_empty() {
        (
            DiffKind::Rows,
            format!("{at}{} served row(s) are missing on shadow", found.a.len()),
        )
    } else if ra.is_empty() && !rb.is_empty() && found.a.is_empty() {
        (
            DiffKind::Rows,
            format!("{at}{} shadow row(s) are missing on served", found.b.len()),
        )
    } else if ra.len() < found.a.len() || rb.len() < found.b.len() {
        (
            DiffKind::Rows,
            format!(
                "{at}{} served and {} shadow row(s) differ; not all their bytes were retained (re-check with the wanted hashes)",
                found.a.len(),
                found.b.len()
            ),
        )
    } else {
        (
            DiffKind::Rows,
            format!(
                "{at}{} served and {} shadow row(s) differ",
                found.a.len(),
                found.b.len()
            ),
        )
    };
    Difference {
        result_set: i,
        kind,
        detail,
        first_column,
        rows_a,
        rows_b,
        wanted_a: wanted(&found.a),
        wanted_b: wanted(&found.b),
    }
}
