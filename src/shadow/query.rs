//! What a read's text says about how its answers compare: per statement,
//! whether the rows come in a defined order (a top-level ORDER BY whose
//! keys are output columns) and whether the rows chosen are defined at all
//! (LIMIT or OFFSET without ORDER BY picks whichever rows a plan meets
//! first). Off the hot path, once per distinct text.

use pg_query::protobuf::node::Node as N;

use super::compare::{Order, SortKey};

#[derive(Debug, Clone, PartialEq)]
pub struct QueryInfo {
    /// pg_query's fingerprint (hex), the key mismatches are grouped by.
    pub fingerprint: String,
    /// Per statement, in order.
    pub orders: Vec<Order>,
    /// Why the answer is not defined, from the text alone.
    pub noise: Option<String>,
}

/// Analyzes a read's text (one statement or several).
pub fn analyze(sql: &str) -> QueryInfo {
    let a = crate::classify::analyze::analyze(sql);
    let mut info = QueryInfo {
        fingerprint: a.fingerprint,
        orders: Vec::new(),
        noise: None,
    };
    let Ok(Ok(parsed)) = std::panic::catch_unwind(|| pg_query::parse(sql, 0)) else {
        return info;
    };
    for raw in &parsed.protobuf.stmts {
        let node = raw.stmt.as_ref().and_then(|s| s.node.as_ref());
        let order = match node {
            Some(N::SelectStmt(s)) => {
                let limited = s.limit_count.is_some() || s.limit_offset.is_some();
                if limited && s.sort_clause.is_empty() && info.noise.is_none() {
                    info.noise = Some("LIMIT or OFFSET without ORDER BY".into());
                }
                sort_keys(&s.sort_clause)
            }
            _ => Order::Unordered,
        };
        info.orders.push(order);
    }
    info
}

/// The ORDER BY keys as output columns: a column name (the last part of
/// a qualified name) or a position. An expression key cannot be checked
/// against the output, so the rows are then compared as a multiset.
fn sort_keys(clause: &[pg_query::protobuf::Node]) -> Order {
    if clause.is_empty() {
        return Order::Unordered;
    }
    let mut keys = Vec::with_capacity(clause.len());
    for item in clause {
        let Some(N::SortBy(by)) = &item.node else {
            return Order::Unordered;
        };
        let key = match by.node.as_ref().and_then(|n| n.node.as_ref()) {
            Some(N::ColumnRef(c)) => match c.fields.last().and_then(|f| f.node.as_ref()) {
                Some(N::String(s)) => SortKey::Name(s.sval.clone()),
                _ => return Order::Unordered,
            },
            Some(N::AConst(c)) => match &c.val {
                Some(pg_query::protobuf::a_const::Val::Ival(i)) if i.ival > 0 => {
                    SortKey::Position(i.ival as usize)
                }
                _ => return Order::Unordered,
            },
            _ => return Order::Unordered,
        };
        keys.push(key);
    }
    Order::Keys(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_limit_and_statements() {
        let i = analyze("SELECT a, b FROM t ORDER BY t.a, 2 DESC");
        assert_eq!(
            i.orders,
            vec![Order::Keys(vec![
                SortKey::Name("a".into()),
                SortKey::Position(2)
            ])]
        );
        assert_eq!(i.noise, None);
        assert!(!i.fingerprint.is_empty());

        let i = analyze("SELECT a FROM t ORDER BY lower(a)");
        assert_eq!(i.orders, vec![Order::Unordered]);

        let i = analyze("SELECT * FROM t LIMIT 5");
        assert!(i.noise.unwrap().contains("LIMIT"));
        let i = analyze("SELECT * FROM t ORDER BY id LIMIT 5");
        assert_eq!(i.noise, None);

        let i = analyze("SELECT 1; SELECT x FROM t ORDER BY x");
        assert_eq!(i.orders.len(), 2);
        assert_eq!(i.orders[0], Order::Unordered);

        // Same shape, other constants: one fingerprint.
        assert_eq!(
            analyze("SELECT * FROM t WHERE id = 1").fingerprint,
            analyze("SELECT * FROM t WHERE id = 2").fingerprint
        );
        // A subquery's LIMIT does not make the outer rows undefined.
        assert_eq!(
            analyze("SELECT * FROM (SELECT * FROM t ORDER BY id LIMIT 3) s").noise,
            None
        );
    }
}
