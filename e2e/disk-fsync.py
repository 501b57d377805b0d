#!/usr/bin/env python3
"""The disk's own durable-append latency, the floor under the bus's ack latency.

Appends 8 KiB and fdatasyncs, SAMPLES times with a short pause between, in a
file under DIR (on the filesystem the bus writes to), and prints one line:
  disk: fdatasync_8k_p50_ms=X p99_ms=X p999_ms=X

Usage: e2e/disk-fsync.py DIR [SAMPLES]   (default 3000)
"""
import os
import sys
import tempfile
import time


def main() -> None:
    directory = sys.argv[1]
    samples = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    block = b"x" * 8192
    lat = []
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        fd = f.fileno()
        for _ in range(samples):
            os.write(fd, block)
            t = time.perf_counter()
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
            # About the bus's commit rate at 10,000 events/s.
            time.sleep(0.0005)
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, round((len(lat) - 1) * p))] * 1e3

    print(f"disk: fdatasync_8k_p50_ms={q(0.5):.3f} p99_ms={q(0.99):.3f} p999_ms={q(0.999):.3f}")


if __name__ == "__main__":
    main()
