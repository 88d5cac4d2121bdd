"""A cancelled routed read: the cancel also cancels the session's next
statement.

Run against a pgshift with routing.read_percent = 100 (any session is
routed; mirroring and shadow reads do not matter), in a database that exists
on both clusters. Straight against Postgres every `next` is a row.

    python3 cancel_leaks_to_next_statement.py PORT DB [N]

Per try: `select pg_sleep(10)` (routed to the target), a CancelRequest after
0.2 s (waiting, as libpq and asyncpg do, until the server closes the cancel
connection: Postgres closes it once the backend has been signalled), the
cancelled answer, `select 1`, then `select pg_sleep(0.3)`. Through pgshift
the last one is often cancelled at once (57014), hit by a SIGINT that was
meant for the first: pgshift (src/cancel.rs `send_cancel`) writes the
request to the target's postmaster and closes the client's cancel
connection without waiting for the postmaster to close its own, so the
client goes on while Postgres is still signalling (its postmaster child
sends SIGINT to the backend and then to its process group: the second
signal can land on the next statement).
"""
import sys
import time

from pgwire import cancel, connect, msg, answer, query

port, db = int(sys.argv[1]), sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 20
s, key = connect(port, db)
hit = 0
for i in range(n):
    s.sendall(msg(b"Q", b"select pg_sleep(10)\0"))
    time.sleep(0.2)
    cancel(port, key)
    first = answer(s)
    query(s, "select 1")
    t0 = time.time()
    nxt = query(s, "select pg_sleep(0.3)")
    if "ERROR 57014" in nxt:
        hit += 1
    print(i, "cancelled:", first, "next:", nxt, f"{time.time() - t0:.3f}s")
print(f"the next statement was cancelled in {hit} of {n} tries")
sys.exit(1 if hit else 0)
