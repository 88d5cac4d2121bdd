"""A routed read answered after the source's FATAL.

Run against a pgshift with routing.read_percent = 100, in a database that
exists on both clusters:

    python3 answer_after_fatal.py PORT DB [N]

The session's source backend is terminated (pg_terminate_backend from a
second session through the same pgshift); as soon as the client has read the
FATAL 57P01, it sends `select 1`. Postgres never sends anything after a
FATAL: straight against it the client reads EOF. Through pgshift the read
is routed to the target and its answer (row, ReadyForQuery) reaches the
client after the FATAL, before the connection closes: libpq then keeps the
connection as good (psycopg2's `closed` stays 0 in its
test_external_close_async). The backend pump forwards a FATAL
ErrorResponse and goes on until the source closes the socket
(src/session/policies.rs ServerPolicies), while src/router/decide.rs still
routes and src/router/responder.rs still writes to the client.
"""
import sys

from pgwire import answer, connect, fields, msg, query, recv_msg

port, db = int(sys.argv[1]), sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10
control, _ = connect(port, db)
bad = 0
for i in range(n):
    victim, _ = connect(port, db)
    pid = None
    victim.sendall(msg(b"Q", b"select pg_backend_pid()\0"))
    while True:
        t, b = recv_msg(victim)
        if t == b"D":
            pid = int(b[6:].decode())
        if t == b"Z":
            break
    query(control, f"select pg_terminate_backend({pid})")
    t, b = recv_msg(victim)  # the FATAL
    assert t == b"E" and fields(b).get("S") == "FATAL", (t, b)
    try:
        victim.sendall(msg(b"Q", b"select 1\0"))
    except BrokenPipeError:
        pass
    after = answer(victim)
    if after != ["EOF"]:
        bad += 1
    print(i, "after the FATAL:", after)
print(f"answers after a FATAL in {bad} of {n} sessions")
sys.exit(1 if bad else 0)
