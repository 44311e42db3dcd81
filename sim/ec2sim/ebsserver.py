"""The lean EBS direct endpoint (AWS_ENDPOINT_URL_EBS): a minimal HTTP/1.1 server of its
own, a thread per connection, persistent connections, no moto and no WSGI in the hot path.
Each request goes to ebsdirect.Api.handle, which shares its state with moto's EC2 view
(same process). A 512 KiB PutSnapshotBlock body is received straight into a per-connection
buffer (recv_into), hashed and written from it; SHA-256, recv and pwrite release the GIL,
so requests on different connections overlap.

Accepts what the AWS SDKs send: Content-Length bodies, `Transfer-Encoding: chunked`,
`Content-Encoding: aws-chunked` (SigV4 streaming: "hex;chunk-signature=...\\r\\n" framed,
x-amz-decoded-content-length), `Expect: 100-continue`, HTTP/1.0 and `Connection: close`.
SigV4 is not verified (moto does not either)."""
import mmap
import socket
import sys
import threading
import traceback

MAX_HEAD = 64 << 10
MAX_BODY = 8 << 20  # the largest body any EBS direct request has is 512 KiB
IDLE_S = 600  # a connection idle this long is closed (the SDKs' pools drop theirs sooner)
REASONS = {100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request",
           402: "Payment Required", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
           500: "Internal Server Error", 503: "Service Unavailable"}


class BadRequest(Exception):
    pass


class Conn:
    """Buffered reads from one socket: the head, then the body into a reused buffer."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()  # bytes read past the last thing consumed
        # Reused for the common 512 KiB body; page-aligned (mmap), so ebsdirect can write
        # it to the snapshot file with O_DIRECT.
        self.body = mmap.mmap(-1, 524288)

    def _fill(self):
        # Small reads for the head: most of a body then goes straight into its buffer.
        b = self.sock.recv(16384)
        if not b:
            raise EOFError
        self.buf += b

    def head(self):
        """The request head, or None on a clean EOF between requests."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                head = bytes(self.buf[:i])
                del self.buf[:i + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise BadRequest("request head too large")
            try:
                self._fill()
            except EOFError:
                if self.buf.strip():
                    raise BadRequest("truncated request head")
                return None

    def line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                ln = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return ln
            if len(self.buf) > MAX_HEAD:
                raise BadRequest("line too long")
            self._fill()

    def exact(self, n):
        """n bytes, as a memoryview (of the reused buffer when n is a block)."""
        if n > MAX_BODY:
            raise BadRequest("body too large")
        out = self.body if n == len(self.body) else bytearray(n)
        mv = memoryview(out)
        k = min(n, len(self.buf))
        mv[:k] = self.buf[:k]
        del self.buf[:k]
        while k < n:
            got = self.sock.recv_into(mv[k:], n - k)
            if not got:
                raise EOFError
            k += got
        return mv

    def chunked(self):
        parts, total = [], 0
        while True:
            size = int(self.line().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.line():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise BadRequest("body too large")
            parts.append(bytes(self.exact(size)))
            if self.line():
                raise BadRequest("bad chunk framing")


def aws_chunked(data):
    """The payload of a SigV4 streaming (aws-chunked) body."""
    out, mv, i = [], memoryview(data), 0
    raw = bytes(data)
    while True:
        j = raw.index(b"\r\n", i)
        size = int(raw[i:j].split(b";")[0], 16)
        i = j + 2
        if size == 0:
            return b"".join(out)
        out.append(mv[i:i + size].tobytes())
        i += size + 2


def parse_head(head):
    lines = head.split(b"\r\n")
    try:
        method, target, version = lines[0].decode("latin-1").split(" ")
    except ValueError:
        raise BadRequest("bad request line")
    headers = {}
    for ln in lines[1:]:
        k, sep, v = ln.decode("latin-1").partition(":")
        if not sep:
            raise BadRequest("bad header line")
        k = k.strip().lower()
        v = v.strip()
        headers[k] = f"{headers[k]},{v}" if k in headers else v
    return method, target, version, headers


def send(sock, status, headers, body, close):
    hs = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    hs += [f"{k}: {v}" for k, v in headers]
    hs.append(f"Content-Length: {len(body)}")
    if close:
        hs.append("Connection: close")
    head = ("\r\n".join(hs) + "\r\n\r\n").encode("latin-1")
    if len(body) < 65536:
        sock.sendall(head + bytes(body))
    else:
        sock.sendall(head)
        sock.sendall(body)


def serve_conn(api, sock):
    c = Conn(sock)
    while True:
        head = c.head()
        if head is None:
            return
        method, target, version, h = parse_head(head)
        close = h.get("connection", "").lower() == "close" or (
            version == "HTTP/1.0" and h.get("connection", "").lower() != "keep-alive")
        if h.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in h.get("transfer-encoding", "").lower():
            body = c.chunked()
        elif "content-length" in h:
            try:
                n = int(h["content-length"])
            except ValueError:
                raise BadRequest("bad Content-Length")
            body = c.exact(n) if n else b""
        else:
            body = b""
        if "aws-chunked" in h.get("content-encoding", "").lower():
            body = aws_chunked(body)
        status, rh, rbody = api.handle(method, target, h, body)
        send(sock, status, rh, rbody, close)
        if close:
            return


class Server:
    def __init__(self, api, host, port):
        self.api = api
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]

    def start(self):
        threading.Thread(target=self._accept, daemon=True, name="ebs-accept").start()

    def _accept(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._conn, args=(s,), daemon=True).start()

    def _conn(self, s):
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(IDLE_S)
            serve_conn(self.api, s)
        except BadRequest as e:
            try:
                send(s, 400, [("Content-Type", "text/plain")], str(e).encode(), True)
            except OSError:
                pass
        except (EOFError, OSError):
            pass  # the client went (or idled out)
        except Exception:
            traceback.print_exc(file=sys.stderr)
        finally:
            s.close()

    def stop(self):
        try:
            self.sock.close()
        except OSError:
            pass
