#!/usr/bin/env python3
"""Alertmanager's API v2 alert endpoint, as far as a benchmark needs it:
accepts POST /api/v2/alerts and appends, per alert, the arrival time (ns),
its startsAt (ns) and its dedup_key to OUTFILE, one line each.

Usage: alert-receiver.py PORT OUTFILE
"""
import calendar
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, OUT = int(sys.argv[1]), sys.argv[2]
STAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")


def ns(s):
    m = STAMP.fullmatch(s)
    if not m:
        return 0
    y, mo, d, h, mi, se, frac = m.groups()
    secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(se)))
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        arrived = time.time_ns()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/api/v2/alerts":
            self.send_response(404)
            self.end_headers()
            return
        lines = []
        for a in json.loads(body):
            key = a.get("labels", {}).get("dedup_key", "")
            lines.append(f"{arrived} {ns(a.get('startsAt', ''))} {key}\n")
        with open(OUT, "a") as f:
            f.writelines(lines)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
