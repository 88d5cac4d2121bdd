"""A startup packet of an invalid length.

    python3 bad_startup_length.py PORT

node-postgres' `client.connect(); client.end()` can send a Terminate
('X', length 4) before its startup packet; the first four bytes then read as
a length of 0x58000000. Postgres reports "invalid length of startup
packet" as a COMMERROR, to its log only, and closes the connection: the
client reads nothing. pgshift answers with an ErrorResponse (FATAL 08P01),
which node-postgres raises as an unhandled 'error' event
(test/integration/client/quick-disconnect-tests.js exits 255).
src/session/startup.rs `impl From<StartupError> for Failure` makes
BadLength a failure the client is told of; src/session/mod.rs `reject`
sends it.
"""
import socket
import sys

s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"X\0\0\0\x04")
data = b""
while True:
    c = s.recv(4096)
    if not c:
        break
    data += c
print(repr(data) if data else "closed without a reply")
sys.exit(1 if data else 0)
