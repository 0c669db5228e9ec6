#!/usr/bin/env python3
"""HTTP and TCP tools the policy and layer-7 netns tests run inside hosts.

serve PORT LOGDIR
    A recording HTTP/1.1 server (keep-alive) on [::]:PORT, dual-stack. Every byte it
    reads from any connection is appended to LOGDIR/raw-PORT.bin, and every request it
    parses becomes one JSON line in LOGDIR/requests-PORT.jsonl -- written and flushed
    before the response is sent, so a client holding a response knows the log has the
    request. The response body is JSON: method, path, body length and SHA-256.
    Prints "listening" once bound.
echo-serve PORT
    A TCP echo server on [::]:PORT; prints "listening" once bound.
session ADDR PORT TIMEOUT REQUEST...
    One TCP connection; sends each REQUEST ("METHOD PATH [HEADER: VALUE]...", fields
    separated by "|") in turn, waiting for its response before the next. Prints one
    JSON line per response ({"status":..,"body":..}), then {"end": "closed"|"reset"|
    "timeout"|"done"} when the connection ends or every request was answered.
raw ADDR PORT TIMEOUT HEX...
    Connects, sends the bytes, and prints what came back as one JSON line:
    {"received": <text>, "end": "closed"|"reset"|"timeout"}. Several HEX pieces go out
    as separate segments: each once the previous one was acknowledged.
reuse ADDR PORT TRIGGER
    GET /api/first on a new connection and prints "first <status>"; once the file
    TRIGGER exists, GET /api/second on the same connection and prints
    "second: <status>|closed|reset|timeout" (20 s limit).
trickle ADDR PORT PATH
    Sends a POST head announcing a 1 GB body, then 1 KiB of body every 100 ms;
    prints "connected" after the first KiB and "ended: <how>" once the connection is
    reset.
hold ADDR PORT
    Opens a TCP connection to an echo server, checks one echo, prints "connected",
    then sends a line every 200 ms and prints "ended: <how>" (and exits) once the
    connection is reset or closed.
"""

import fcntl
import hashlib
import json
import os
import socket
import struct
import sys
import termios
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


LOCK = threading.Lock()


class Tee:
    """A read-side wrapper that records every byte the handler reads."""

    def __init__(self, inner, raw):
        self.inner = inner
        self.raw = raw

    def _record(self, data):
        if data:
            with LOCK:
                self.raw.write(data)
                self.raw.flush()
        return data

    def readline(self, *a):
        return self._record(self.inner.readline(*a))

    def read(self, *a):
        return self._record(self.inner.read(*a))

    def read1(self, *a):
        return self._record(self.inner.read1(*a))

    def readinto(self, b):
        n = self.inner.readinto(b)
        if n:
            self._record(bytes(b[:n]))
        return n

    def __getattr__(self, name):
        return getattr(self.inner, name)


def serve(port, logdir):
    raw = open(os.path.join(logdir, f"raw-{port}.bin"), "ab")
    log = open(os.path.join(logdir, f"requests-{port}.jsonl"), "a")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            self.rfile = Tee(self.rfile, raw)

        def log_message(self, fmt, *args):
            sys.stderr.write("%s %s\n" % (self.client_address[0], fmt % args))

        def handle_any(self):
            n = int(self.headers.get("Content-Length") or 0)
            h = hashlib.sha256()
            left = n
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            rec = {
                "method": self.command,
                "path": self.path,
                "client_port": self.client_address[1],
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body_len": n - left,
                "sha256": h.hexdigest(),
            }
            line = json.dumps(rec)
            with LOCK:
                log.write(line + "\n")
                log.flush()
            body = (line + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any

    srv = DualStackServer(("::", port), Handler)
    print("listening", flush=True)
    srv.serve_forever()


def echo_serve(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(16)
    print("listening", flush=True)

    def echo(c):
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()


def connect(addr, port, timeout):
    return socket.create_connection((addr, port), timeout=timeout)


def read_response(f):
    """Reads one HTTP/1.1 response from the buffered file `f`; None at EOF."""
    line = f.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    length = 0
    close = False
    while True:
        h = f.readline()
        if not h or h in (b"\r\n", b"\n"):
            break
        name, _, value = h.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        if name == "connection" and value.strip().lower() == "close":
            close = True
    body = f.read(length) if length else b""
    return {"status": status, "body": body.decode("utf-8", "replace"), "close": close}


def session(addr, port, timeout, requests):
    s = connect(addr, port, timeout)
    f = s.makefile("rb")
    end = "done"
    try:
        for req in requests:
            fields = req.split("|")
            method, path = fields[0].split(" ", 1)
            head = f"{method} {path} HTTP/1.1\r\nHost: {addr}:{port}\r\n"
            for h in fields[1:]:
                head += h + "\r\n"
            head += "Content-Length: 0\r\n\r\n"
            s.sendall(head.encode("latin-1"))
            r = read_response(f)
            if r is None:
                end = "closed"
                break
            print(json.dumps(r), flush=True)
            if r["close"]:
                # The peer said it closes; see whether it really does.
                end = "closed" if f.read(1) == b"" else "open"
                break
    except ConnectionResetError:
        end = "reset"
    except socket.timeout:
        end = "timeout"
    print(json.dumps({"end": end}), flush=True)


def acked(s, limit):
    """Waits until the socket's send queue is empty (all sent bytes acknowledged)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        queued = struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if queued == 0:
            return
        time.sleep(0.005)


def raw(addr, port, timeout, pieces):
    s = connect(addr, port, timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    got = b""
    end = "closed"
    try:
        for i, data in enumerate(pieces):
            if i > 0:
                acked(s, timeout)
            s.sendall(data)
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
    except ConnectionResetError:
        end = "reset"
    except socket.timeout:
        end = "timeout"
    print(json.dumps({"received": got.decode("latin-1"), "end": end}), flush=True)


def hold(addr, port):
    s = connect(addr, port, 5)
    s.sendall(b"hello\n")
    if s.recv(64) != b"hello\n":
        print("ended: no echo", flush=True)
        return
    print("connected", flush=True)
    s.settimeout(0.2)
    while True:
        try:
            s.sendall(b"ping\n")
            d = s.recv(64)
            if not d:
                print("ended: closed", flush=True)
                return
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError) as e:
            print(f"ended: reset ({e.__class__.__name__})", flush=True)
            return
        except OSError as e:
            print(f"ended: {e}", flush=True)
            return
        time.sleep(0.2)


def trickle(addr, port, path):
    s = connect(addr, port, 5)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1000000000\r\n\r\n".encode()
    )
    chunk = b"t" * 1024
    sent = 0
    try:
        while True:
            s.sendall(chunk)
            sent += 1
            if sent == 1:
                print("connected", flush=True)
            time.sleep(0.1)
    except (ConnectionResetError, BrokenPipeError) as e:
        print(f"ended: reset ({e.__class__.__name__}) after {sent} KiB", flush=True)
    except OSError as e:
        print(f"ended: {e} after {sent} KiB", flush=True)


def reuse(addr, port, trigger):
    s = connect(addr, port, 10)
    f = s.makefile("rb")
    s.sendall(f"GET /api/first HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
    r = read_response(f)
    print(f"first {r['status'] if r else 'closed'}", flush=True)
    while not os.path.exists(trigger):
        time.sleep(0.05)
    s.settimeout(20)
    try:
        s.sendall(f"GET /api/second HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
        r = read_response(f)
        print(f"second: {r['status'] if r else 'closed'}", flush=True)
    except (ConnectionResetError, BrokenPipeError):
        print("second: reset", flush=True)
    except socket.timeout:
        print("second: timeout", flush=True)


def main(argv):
    cmd = argv[1]
    if cmd == "serve":
        serve(int(argv[2]), argv[3])
    elif cmd == "echo-serve":
        echo_serve(int(argv[2]))
    elif cmd == "session":
        session(argv[2], int(argv[3]), float(argv[4]), argv[5:])
    elif cmd == "raw":
        raw(argv[2], int(argv[3]), float(argv[4]), [bytes.fromhex(h) for h in argv[5:]])
    elif cmd == "hold":
        hold(argv[2], int(argv[3]))
    elif cmd == "reuse":
        reuse(argv[2], int(argv[3]), argv[4])
    elif cmd == "trickle":
        trickle(argv[2], int(argv[3]), argv[4])
    else:
        sys.exit("usage: httptool.py serve|echo-serve|session|raw|hold ...")


if __name__ == "__main__":
    main(sys.argv)
