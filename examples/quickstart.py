"""Quickstart: download 500 files from a local server with `fetcher get`, then re-run it.

Runs anywhere, no internet: it generates files in a temporary directory, serves them
on 127.0.0.1 with a small HTTP/1.1 server, writes a URL list and calls the real CLI.
The second run shows that complete files are skipped without a single request.

    python examples/quickstart.py [--files 500] [--size 20000] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Quiet(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--size", type=int, default=20_000, help="bytes per file")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "site"
        (root / "data").mkdir(parents=True)
        for i in range(args.files):
            (root / "data" / f"file{i:05d}.bin").write_bytes(os.urandom(args.size))
        handler = functools.partial(_Quiet, directory=str(root))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"

        urls = Path(tmp) / "urls.txt"
        urls.write_text("".join(f"{base}/data/file{i:05d}.bin\n" for i in range(args.files)))
        out = args.out or Path(tmp) / "out"
        cmd = [sys.executable, "-m", "fetcher", "get", str(urls), "-o", str(out),
               "--threads", "16", "--json"]
        print(f"$ fetcher get urls.txt -o {out} --threads 16   # {args.files} files")
        first = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        print("first run: ", first.stdout.strip())
        print("$ (the same command again)")
        second = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        print("second run:", second.stdout.strip())
        manifest = out / ".fetcher" / "manifest.jsonl"
        print(f"\nfirst manifest record ({manifest}):")
        print(json.dumps(json.loads(manifest.read_text().splitlines()[0]), indent=2))
        server.shutdown()
        ok = json.loads(first.stdout)["ok"] == args.files and \
            json.loads(second.stdout)["skipped"] == args.files
        return 0 if first.returncode == 0 and second.returncode == 0 and ok else 1


if __name__ == "__main__":
    sys.exit(main())
