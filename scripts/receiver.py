#!/usr/bin/env python3
"""A stand-in vector store for the demo: prints each batch the outbox worker posts."""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        events = ", ".join(f"{e['type']} {json.dumps(e['payload'].get('key'))}" for e in batch)
        print(f"POST {self.path}  Idempotency-Key: {self.headers['Idempotency-Key']}  [{events}]", flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    print(server.server_address[1], flush=True)
    server.serve_forever()
