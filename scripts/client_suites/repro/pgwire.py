"""A few lines of the PostgreSQL wire protocol for the reproductions here."""
import socket
import struct


def msg(tag, body=b""):
    return tag + struct.pack("!I", len(body) + 4) + body


def recv_msg(s):
    """(tag, body), or (None, None) at EOF."""
    def exact(n):
        b = b""
        while len(b) < n:
            try:
                c = s.recv(n - len(b))
            except ConnectionResetError:
                return None
            if not c:
                return None
            b += c
        return b
    h = exact(5)
    if h is None:
        return None, None
    body = exact(struct.unpack("!I", h[1:5])[0] - 4)
    return (h[:1], body) if body is not None else (None, None)


def fields(body):
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}


def connect(port, db, user="postgres", host="127.0.0.1"):
    """A logged-in session: (socket, BackendKeyData body)."""
    s = socket.create_connection((host, port))
    params = b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
    s.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
    key = None
    while True:
        t, b = recv_msg(s)
        if t == b"K":
            key = b
        elif t == b"E":
            raise RuntimeError(fields(b))
        elif t == b"Z":
            return s, key


def answer(s):
    """What a request got, up to ReadyForQuery (or EOF), as short strings."""
    out = []
    while True:
        t, b = recv_msg(s)
        if t is None:
            out.append("EOF")
            return out
        if t == b"E":
            f = fields(b)
            out.append(f"{f.get('S')} {f.get('C')}")
        elif t == b"D":
            out.append("row")
        elif t == b"Z":
            out.append("Z")
            return out


def query(s, sql):
    s.sendall(msg(b"Q", sql.encode() + b"\0"))
    return answer(s)


def cancel(port, key, wait_for_close=True, host="127.0.0.1"):
    """A CancelRequest; like libpq, waits until the server closes it."""
    c = socket.create_connection((host, port))
    c.sendall(struct.pack("!II", 16, 80877102) + key)
    if wait_for_close:
        c.recv(1)
    c.close()
