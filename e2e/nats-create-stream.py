"""Creates a JetStream stream on a plain-TCP nats-server (no client library:
the NATS text protocol and the JetStream API's JSON), for the export
benchmark. Usage: nats-create-stream.py HOST:PORT STREAM SUBJECT"""

import json
import socket
import sys


def main() -> int:
    hostport, stream, subject = sys.argv[1:4]
    host, port = hostport.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    f = s.makefile("rb")
    f.readline()  # INFO
    body = json.dumps({"name": stream, "subjects": [subject], "storage": "file",
                       "duplicate_window": 120_000_000_000}).encode()
    s.sendall(b'CONNECT {"verbose":false,"headers":true}\r\n'
              b"SUB _bench.reply 1\r\n"
              + f"PUB $JS.API.STREAM.CREATE.{stream} _bench.reply {len(body)}\r\n".encode()
              + body + b"\r\nPING\r\n")
    while True:
        line = f.readline()
        if not line:
            print("nats-server closed the connection", file=sys.stderr)
            return 1
        if line.startswith(b"-ERR"):
            print(line.decode().strip(), file=sys.stderr)
            return 1
        if line.startswith(b"MSG"):
            n = int(line.split()[-1])
            reply = json.loads(f.read(n + 2)[:n])
            if "error" in reply:
                print(f"stream create: {reply['error']}", file=sys.stderr)
                return 1
            return 0


if __name__ == "__main__":
    sys.exit(main())
