"""Download throughput from a loopback HTTP server: abc-pipeline's downloader vs ``curl -o`` on the same file.

Generates a random file (default 1 GB) in a work folder under /tmp, serves it from a separate process
(``ThreadingHTTPServer`` answering with ``socket.sendfile``, so the server is not the bottleneck and does not share
the client's GIL), then alternates, for a few repeats: ``curl -s -o``; ``curl -s -o`` followed by ``md5sum`` (the
shell equivalent of a verified download); and ``download_entries`` (the downloader's full per-file path: ``.part``
file, MD5, rename, ``_verified.json`` record). Prints median seconds, MB/s, the single-core MD5 rate (the ceiling of
any verifying downloader) and the ratios. ``--rate-mb`` paces the server to emulate a network link of that speed.
Nothing is written to the repository.

    python benchmarks/bench_download.py --size-mb 1000 --repeats 5
    python benchmarks/bench_download.py --size-mb 1000 --repeats 3 --rate-mb 200
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

FILE_NAME = "bench/20250101/big.bin"


class _SendfileHandler(http.server.BaseHTTPRequestHandler):
    """GET of files under the served root with ``Range: bytes=N-`` support, body sent with ``sendfile``."""

    protocol_version = "HTTP/1.1"
    root = Path(".")
    rate = 0.0  # bytes per second, 0 = unlimited

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = path.stat().st_size
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        self.wfile.flush()
        with open(path, "rb") as handle:
            if not self.rate:
                self.connection.sendfile(handle, start)
                return
            began, sent, total = time.monotonic(), 0, size - start
            while sent < total:  # paced: 4 MiB slices, sleeping to hold the average rate
                sent += self.connection.sendfile(handle, start + sent, min(4 << 20, total - sent))
                time.sleep(max(0.0, began + sent / self.rate - time.monotonic()))


def serve(root: Path, port: int, rate_mb: float) -> None:
    """Serve ``root`` on 127.0.0.1:``port`` (at most ``rate_mb`` MB/s per response if > 0) until killed."""
    _SendfileHandler.root = root
    _SendfileHandler.rate = rate_mb * 1e6
    http.server.ThreadingHTTPServer(("127.0.0.1", port), _SendfileHandler).serve_forever()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_file(path: Path, size_mb: int) -> str:
    """Write ``size_mb`` MB (10^6 bytes) of random data; returns its MD5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5()
    block = 8 * 10**6
    with open(path, "wb") as handle:
        for _ in range(size_mb * 10**6 // block):
            data = os.urandom(block)
            md5.update(data)
            handle.write(data)
        rest = os.urandom(size_mb * 10**6 % block)
        md5.update(rest)
        handle.write(rest)
    return md5.hexdigest()


def _md5_rate(mb: int = 256) -> float:
    """Single-core ``hashlib.md5`` throughput on in-memory data, MB/s."""
    block = os.urandom(1 << 20)
    md5 = hashlib.md5()
    t0 = time.perf_counter()
    for _ in range(mb):
        md5.update(block)
    return mb * len(block) / (time.perf_counter() - t0) / 1e6


def _cpu_seconds(who: int) -> float:
    """User + system CPU seconds used so far by this process (all threads) or its waited-for children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _wait_for(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"benchmark server on port {port} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1000, help="file size in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/abc_bench_download"))
    parser.add_argument("--chunk-size", type=int, default=1 << 20, help="downloader read/write size, bytes")
    parser.add_argument("--rate-mb", type=float, default=0.0, help="pace the server to this many MB/s (0: no limit)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.rate_mb)
        return

    from abc_pipeline.atlas.download import TransferOptions, download_entries, file_md5
    from abc_pipeline.atlas.manifest import FileEntry

    curl = shutil.which("curl")
    if curl is None:
        sys.exit("curl is not installed (apt-get install -y curl)")
    root = args.workdir / "bucket"
    source = root / FILE_NAME
    print(f"writing {args.size_mb} MB of random bytes to {source} ...", flush=True)
    md5 = _make_file(source, args.size_mb)
    size = source.stat().st_size
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(root), "--port", str(port), "--rate-mb", str(args.rate_mb)]
    )
    base_url = f"http://127.0.0.1:{port}/"
    entry = FileEntry(
        directory="bench", file_name="big", relative_path=FILE_NAME, url=base_url + FILE_NAME, size=size, md5=md5
    )
    opts = TransferOptions(retries=1, chunk_size=args.chunk_size)
    times: dict[str, list[float]] = {"curl": [], "curl+md5sum": [], "ours": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    md5_rates: list[float] = []
    try:
        _wait_for(port)
        for repeat in range(args.repeats):
            out = args.workdir / "curl.bin"
            t0, c0 = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
            subprocess.run([curl, "-s", "--fail", "-o", str(out), base_url + FILE_NAME], check=True)
            times["curl"].append(time.perf_counter() - t0)
            cpu["curl"].append(_cpu_seconds(resource.RUSAGE_CHILDREN) - c0)
            assert out.stat().st_size == size
            out.unlink()

            t0, c0 = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
            subprocess.run([curl, "-s", "--fail", "-o", str(out), base_url + FILE_NAME], check=True)
            digest = subprocess.run(["md5sum", str(out)], check=True, capture_output=True, text=True).stdout
            times["curl+md5sum"].append(time.perf_counter() - t0)
            cpu["curl+md5sum"].append(_cpu_seconds(resource.RUSAGE_CHILDREN) - c0)
            assert digest.split()[0] == md5
            out.unlink()

            cache = args.workdir / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            t0, c0 = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
            download_entries({"big": entry}, base_url=base_url, cache_dir=cache, jobs=1, opts=opts, progress=False)
            times["ours"].append(time.perf_counter() - t0)
            cpu["ours"].append(_cpu_seconds(resource.RUSAGE_SELF) - c0)
            if repeat == 0:
                assert file_md5(cache / FILE_NAME) == md5
            shutil.rmtree(cache)
            md5_rates.append(_md5_rate())
            print(
                f"repeat {repeat + 1}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
                + f", md5 {md5_rates[-1]:.0f} MB/s",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(args.workdir, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, curl "
        f"{subprocess.run([curl, '--version'], capture_output=True, text=True).stdout.split()[1]}"
    )
    print(
        f"file: {size / 1e6:.0f} MB, repeats: {args.repeats}, chunk: {args.chunk_size} B, "
        f"server pace: {args.rate_mb or 'unlimited'} MB/s"
    )
    for name, seconds in median.items():
        print(
            f"{name:<12} median {seconds:6.2f} s  {size / seconds / 1e6:6.0f} MB/s  "
            f"client CPU {statistics.median(cpu[name]) / (size / 1e9):.2f} s/GB"
        )
    print(f"md5 (1 core) median {statistics.median(md5_rates):.0f} MB/s")
    print(f"ratio ours/curl throughput: {median['curl'] / median['ours']:.2f} (target >= 0.8)")
    print(f"ratio ours/(curl+md5sum) throughput: {median['curl+md5sum'] / median['ours']:.2f}")


if __name__ == "__main__":
    main()
