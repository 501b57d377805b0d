#!/usr/bin/env python3
"""The disk's own durable-append latency, the floor under the bus's ack latency.

Two probes in a file under DIR (on the filesystem the bus writes to):

- fdatasync: append 8 KiB and fdatasync, SAMPLES times with a short pause.
- group commit: batches of 2 KiB (ten 200-byte events) arrive with
  exponential gaps at 1,000 a second, as the bus's 10,000 events/s latency
  run sends them; one thread appends whatever is waiting and fdatasyncs, the
  way the bus's writer does. A batch's latency is from its arrival until an
  fdatasync that started after it was written returns. This is what the
  disk alone leaves of the 2 ms ack budget, before TLS, HTTP/2 and RocksDB.

Prints one line:
  disk: fdatasync_8k_p50_ms=X p99_ms=X p999_ms=X group_commit_1k_p50_ms=X p99_ms=X

Usage: e2e/disk-fsync.py DIR [SAMPLES]   (default 3000)
"""
import os
import random
import sys
import tempfile
import threading
import time


def quantiles(lat: list[float]) -> dict[float, float]:
    lat = sorted(lat)
    return {p: lat[min(len(lat) - 1, round((len(lat) - 1) * p))] * 1e3 for p in (0.5, 0.99, 0.999)}


def single_syncs(fd: int, samples: int) -> list[float]:
    block = b"x" * 8192
    lat = []
    for _ in range(samples):
        os.write(fd, block)
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
        # About the bus's commit rate at 10,000 events/s.
        time.sleep(0.0005)
    return lat


def group_commit(fd: int, samples: int, rate: float = 1000.0) -> list[float]:
    block = b"x" * 2048
    cv = threading.Condition()
    waiting: list[float] = []  # arrival times not yet written
    lat: list[float] = []
    done = False

    def writer() -> None:
        while True:
            with cv:
                while not waiting and not done:
                    cv.wait()
                if not waiting:
                    return
                group = waiting[:]
                waiting.clear()
            os.write(fd, block * len(group))
            os.fdatasync(fd)
            t = time.perf_counter()
            lat.extend(t - a for a in group)

    thread = threading.Thread(target=writer)
    thread.start()
    arrival = time.perf_counter()
    for _ in range(samples):
        arrival += random.expovariate(rate)
        pause = arrival - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        with cv:
            waiting.append(arrival)
            cv.notify()
    with cv:
        done = True
        cv.notify()
    thread.join()
    return lat


def main() -> None:
    directory = sys.argv[1]
    samples = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        single = quantiles(single_syncs(f.fileno(), samples))
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        group = quantiles(group_commit(f.fileno(), samples * 2))
    print(
        f"disk: fdatasync_8k_p50_ms={single[0.5]:.3f} p99_ms={single[0.99]:.3f} p999_ms={single[0.999]:.3f}"
        f" group_commit_1k_p50_ms={group[0.5]:.3f} p99_ms={group[0.99]:.3f}"
    )


if __name__ == "__main__":
    main()
