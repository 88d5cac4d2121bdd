#!/usr/bin/env python3
"""A realistic psycopg 3 session, run through pgshift by tests/client_libs.rs.

Usage: psycopg_session.py CONNINFO

Transactions with autocommit off, executemany, server-side prepared
statements, binary COPY in and out, a server-side cursor, failing statements
with their SQLSTATE checked, and pipeline mode (with and without an error).
Prints "psycopg: OK" last and exits 0 only if every check held; any failure
raises, which exits non-zero with a traceback.
"""

import datetime as dt
import sys
from decimal import Decimal

import psycopg
from psycopg import errors
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

UTC = dt.timezone.utc
BASE = dt.datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=UTC)
COLUMNS = "id, customer, amount, placed, tags, payload, meta"
TYPES = ["int4", "text", "numeric", "timestamptz", "text[]", "bytea", "jsonb"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def make_row(i):
    return (
        i,
        f"customer {i % 17} \u00fc\u00f1\u00ef \U0001F418\t\\",
        Decimal(i) + Decimal(i % 100) / 100,
        BASE + dt.timedelta(minutes=i, microseconds=i),
        [f"t{i % 3}", "x y", '"quoted"'] if i % 4 else [],
        bytes((i * 7 + k) % 256 for k in range(i % 300)),
        {"i": i, "nested": {"ok": i % 2 == 0, "s": "\u65e5\u672c"}} if i % 5 else None,
    )


def as_stored(row):
    """What reading `row` back gives: Jsonb wrappers become plain values."""
    return tuple(v.obj if isinstance(v, Jsonb) else v for v in row)


def for_insert(row):
    return tuple(Jsonb(v) if isinstance(v, dict) else v for v in row)


def main(conninfo):
    with psycopg.connect(conninfo) as conn:
        check(not conn.autocommit, "autocommit should be off by default")
        cur = conn.cursor()
        cur.execute(
            "create table orders (id int primary key, customer text not null, amount numeric(12,2),"
            " placed timestamptz, tags text[], payload bytea, meta jsonb)"
        )
        check(conn.info.transaction_status == TransactionStatus.INTRANS, "DDL should open a transaction")
        conn.commit()

        # executemany in one transaction.
        rows = [make_row(i) for i in range(1, 1001)]
        cur.executemany(f"insert into orders ({COLUMNS}) values (%s, %s, %s, %s, %s, %s, %s)",
                        [for_insert(r) for r in rows])
        conn.commit()
        cur.execute("select count(*), sum(amount) from orders")
        check(cur.fetchone() == (1000, sum(r[2] for r in rows)), "count/sum after executemany")
        conn.rollback()

        # A transaction that is rolled back leaves nothing behind.
        cur.execute("insert into orders (id, customer) values (5000, 'gone')")
        cur.execute("update orders set amount = 0")
        check(cur.rowcount == 1001, f"update rowcount {cur.rowcount}")
        conn.rollback()
        cur.execute("select count(*), count(*) filter (where amount = 0) from orders")
        check(cur.fetchone() == (1000, 0), "rollback did not undo")
        conn.commit()

        # A nested transaction block (savepoint) that fails, inside one that commits.
        with conn.transaction():
            cur.execute("insert into orders (id, customer) values (6000, 'kept')")
            try:
                with conn.transaction():
                    cur.execute("insert into orders (id, customer) values (6001, 'dropped')")
                    cur.execute("insert into orders (id, customer) values (6000, 'dup')")
            except errors.UniqueViolation as e:
                check(e.sqlstate == "23505", f"sqlstate {e.sqlstate}")
            else:
                raise AssertionError("duplicate insert in savepoint did not fail")
        cur.execute("select array_agg(id order by id) from orders where id >= 6000")
        check(cur.fetchone()[0] == [6000], "savepoint rollback")
        conn.commit()

        # Server-side prepared statements, reused; results in text and binary.
        query = "select customer, amount, placed, tags, payload, meta from orders where id = %s"
        bcur = conn.cursor(binary=True)
        for i in range(1, 201, 3):
            for c in (cur, bcur):
                c.execute(query, (i,), prepare=True)
                check(c.fetchone() == as_stored(rows[i - 1])[1:], f"prepared row {i}")
        cur.execute("select count(*) from pg_prepared_statements where statement like 'select customer, amount%'")
        check(cur.fetchone()[0] >= 1, "no server-side prepared statement seen")
        conn.commit()

        # Binary COPY in, then out, compared.
        more = [make_row(i) for i in range(1001, 3001)]
        with cur.copy(f"copy orders ({COLUMNS}) from stdin (format binary)") as copy:
            copy.set_types(TYPES)
            for r in more:
                copy.write_row(for_insert(r))
        check(cur.rowcount == 2000, f"copy rowcount {cur.rowcount}")
        conn.commit()
        with cur.copy(f"copy (select {COLUMNS} from orders where id > 1000 and id < 5000 order by id)"
                      " to stdout (format binary)") as copy:
            copy.set_types(TYPES)
            got = list(copy.rows())
        check(len(got) == 2000, f"copy out rows {len(got)}")
        for r, g in zip(more, got):
            check(as_stored(r) == g, f"copy round trip differs for id {r[0]}: {g!r}")
        conn.commit()

        # A server-side cursor fetched in batches (DECLARE/FETCH).
        with conn.cursor(name="big_scan") as scur:
            scur.itersize = 250
            scur.execute("select id, amount from orders where id <= 3000 order by id")
            ids = [r[0] for r in scur]
        check(ids == list(range(1, 3001)), "server-side cursor rows")
        conn.commit()

        # Failing statements: the SQLSTATE and details come through intact.
        try:
            cur.execute("insert into orders (id, customer) values (1, 'dup')")
        except errors.UniqueViolation as e:
            check(e.sqlstate == "23505", f"sqlstate {e.sqlstate}")
            check(e.diag.constraint_name == "orders_pkey", f"constraint {e.diag.constraint_name}")
            check(e.diag.table_name == "orders", f"table {e.diag.table_name}")
        else:
            raise AssertionError("duplicate insert did not fail")
        check(conn.info.transaction_status == TransactionStatus.INERROR, "transaction should be aborted")
        try:
            cur.execute("select 1")
        except errors.InFailedSqlTransaction as e:
            check(e.sqlstate == "25P02", f"sqlstate {e.sqlstate}")
        else:
            raise AssertionError("query in aborted transaction did not fail")
        conn.rollback()
        for stmt, code in [("select * from no_such_table", "42P01"), ("selec 1", "42601"),
                           ("select 'x'::int", "22P02"), ("select 1/0", "22012")]:
            try:
                cur.execute(stmt)
            except psycopg.Error as e:
                check(e.sqlstate == code, f"{stmt}: sqlstate {e.sqlstate}, expected {code}")
            else:
                raise AssertionError(f"{stmt} did not fail")
            conn.rollback()

        # Pipeline mode: many statements in flight, results checked.
        with conn.pipeline():
            cur.execute("insert into orders (id, customer) values (%s, %s)", (7000, "piped"))
            cur.executemany("insert into orders (id, customer, amount) values (%s, %s, %s)",
                            [(7001 + i, f"piped {i}", Decimal(i)) for i in range(100)])
            c2 = conn.cursor()
            c2.execute("select count(*), sum(amount) from orders where id >= 7000")
            c3 = conn.cursor()
            c3.execute("select customer from orders where id = %s", (7050,), prepare=True)
            check(c2.fetchone() == (101, Decimal(4950)), "pipelined aggregate")
            check(c3.fetchone() == ("piped 49",), "pipelined select")
        conn.commit()

        # An error in the middle of a pipeline aborts the rest and the transaction.
        try:
            with conn.pipeline():
                cur.execute("insert into orders (id, customer) values (8000, 'before error')")
                cur.execute("select 1/0")
                cur.execute("insert into orders (id, customer) values (8001, 'after error')")
        except errors.DivisionByZero as e:
            check(e.sqlstate == "22012", f"sqlstate {e.sqlstate}")
        else:
            raise AssertionError("pipeline with 1/0 did not fail")
        conn.rollback()
        cur.execute("select count(*) from orders where id >= 8000")
        check(cur.fetchone()[0] == 0, "rows from the failed pipeline survived")
        conn.commit()

        # Autocommit mode for the last few statements.
        conn.autocommit = True
        cur.execute("insert into orders (id, customer) values (9000, 'autocommitted')")
        check(conn.info.transaction_status == TransactionStatus.IDLE, "autocommit left a transaction open")
        cur.execute("select count(*) from orders")
        total = cur.fetchone()[0]
        check(total == 3103, f"final count {total}")
        print(f"rows: {total}")
    print("psycopg: OK")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: psycopg_session.py CONNINFO")
    main(sys.argv[1])
