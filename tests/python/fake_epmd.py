"""A misbehaving epmd for tests: listens on 4369, answers NAMES properly (one node `app` at
port 9999) and PORT_PLEASE2_REQ with MODE: `garbage` (random bytes), `truncated` (a PORT2_RESP
cut short) or `silent-close`. Bounded: serves at most 200 connections."""
import os
import socket
import sys

mode = sys.argv[1]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 4369))
srv.listen(16)
for _ in range(200):
    conn, _ = srv.accept()
    req = conn.recv(4096)
    if req[2:3] == b"n":
        conn.sendall((4369).to_bytes(4, "big") + b"name app at port 9999\n")
    elif req[2:3] == b"z":
        if mode == "garbage":
            conn.sendall(os.urandom(37))
        elif mode == "truncated":
            conn.sendall(bytes([119, 0, 0x27]))  # PORT2_RESP, result 0, half a port number
    conn.close()
