"""A read routed to the target returns the target's type OIDs.

Run against a pgshift with [mirror] on and routing.read_percent = 100, in a
database that exists on both clusters (TARGET_PORT: the target cluster, only
read here to wait for the mirror):

    python3 type_oids_asyncpg.py PORT DB TARGET_PORT

A domain and a composite type made through pgshift reach the target through
the mirror, where they get OIDs of the target's own. asyncpg prepares a
named statement, whose Parse/Describe pgshift sends to the source (named
Parses are not routed): it learns the source's OIDs and introspects them.
The Bind/Execute is routed: the binary composite in the DataRow carries the
member type OID of the target, and asyncpg raises OutdatedSchemaCacheError
("unexpected data type of composite type attribute 0: <target oid>,
expected <source oid>"). Nothing in src/router/decide.rs or
src/router/responder.rs looks at the types of a routed answer (RowDescription
type OIDs, the element and member OIDs inside binary arrays and composites).
"""
import asyncio
import sys

import asyncpg


async def main(port, db, target_port):
    kw = dict(host="127.0.0.1", user="postgres", database=db)
    con = await asyncpg.connect(port=port, **kw)
    await con.execute("DROP TYPE IF EXISTS rec_t; DROP DOMAIN IF EXISTS my_dec_t")
    await con.execute("CREATE DOMAIN my_dec_t AS numeric; CREATE TYPE rec_t AS (a my_dec_t, b int)")
    await con.close()
    tgt = await asyncpg.connect(port=target_port, **kw)
    while not await tgt.fetchval("select to_regtype('rec_t') is not null"):
        await asyncio.sleep(0.1)
    await tgt.close()
    await asyncio.sleep(0.5)  # past read-your-writes
    bad = 0
    for _ in range(30):
        con = await asyncpg.connect(port=port, **kw)
        try:
            await con.fetchval("SELECT (1::my_dec_t, 2)::rec_t")
        except asyncpg.exceptions.OutdatedSchemaCacheError as e:
            bad += 1
            print(e)
        await con.close()
    print(f"OutdatedSchemaCacheError in {bad} of 30 sessions")
    return bad


sys.exit(1 if asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))) else 0)
