"""Upload and download speed of a ~200 MB model artifact against a local S3 server (moto).

    nice -n 10 python benchmarks/bucket_io.py [--mb 200] [--repeats 2] [--link-mb-s 25]

Compares sqltune's path (registry.publish: parallel files and multipart parts, manifest last,
`latest` pointer; registry.fetch: parallel ranged GETs, sha256 check of every file, cache)
with a plain sequential copy through fsspec (put_file / get_file one file after another, s3fs
defaults). moto runs in its own process so client and server do not share an interpreter.

Two links: `direct` (client to moto over loopback: the server's CPU is the limit) and `capped`,
through a proxy process that paces every TCP connection to --link-mb-s, which is how a single
stream to a cloud bucket behaves across a real network (per-connection throughput is bounded by
latency and window size, while the store serves many connections at once). Writes
benchmarks/results/bucket_io.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqltune.artifacts import manifests, registry, storage  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def _proxy(port: int, upstream: int, rate: float) -> None:
    """Forward 127.0.0.1:port to 127.0.0.1:upstream, pacing each connection and direction to `rate` B/s."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        t0, sent = loop.time(), 0
        try:
            while data := await reader.read(64 << 10):
                now = loop.time()
                if now > t0 + sent / rate:  # idle keep-alive time earns no burst
                    t0, sent = now, 0
                writer.write(data)
                await writer.drain()
                sent += len(data)
                delay = t0 + sent / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_proxy(endpoint: str, mb_s: float) -> tuple[multiprocessing.Process, str]:
    port = free_port()
    proc = multiprocessing.Process(target=_proxy, args=(port, int(endpoint.rsplit(":", 1)[1]), mb_s * 1e6),
                                   daemon=True)
    proc.start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("proxy did not start")


def make_artifact(folder: Path, total_mb: int) -> int:
    """Two weight shards, a tokenizer and small JSON files: the shape of a merged 2B model, scaled."""
    folder.mkdir(parents=True)
    big = total_mb * 1_000_000
    sizes = {"model-00001-of-00002.safetensors": big * 50 // 100, "model-00002-of-00002.safetensors": big * 45 // 100,
             "tokenizer.json": big * 5 // 100}
    for name, size in sizes.items():
        with (folder / name).open("wb") as fh:
            left = size
            while left:
                n = min(left, 8 << 20)
                fh.write(os.urandom(n))
                left -= n
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "sqltune.json"):
        (folder / name).write_text(json.dumps({"name": name}))
    manifest = manifests.write_manifest(folder)
    return sum(f["size"] for f in manifest["files"].values())


def plain_upload(folder: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    for p in sorted(folder.iterdir()):
        if p.is_file():
            fs.put_file(str(p), f"{url.split('://', 1)[1]}/{p.name}")


def plain_download(url: str, dest: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    dest.mkdir(parents=True)
    for entry in fs.ls(url.split("://", 1)[1], detail=True):
        if entry["type"] == "file":
            fs.get_file(entry["name"], str(dest / entry["name"].rsplit("/", 1)[1]))


def timed(fn, *args) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run_link(work: Path, size: int, repeats: int, tag: str) -> dict[str, object]:
    """Best-of-`repeats` seconds for each path through the endpoint in AWS_ENDPOINT_URL."""
    storage.forget_filesystems()
    fs, _ = storage.filesystem("s3://bench")
    times: dict[str, list[float]] = {k: [] for k in ("plain_upload", "plain_download", "sqltune_upload",
                                                     "sqltune_download", "sqltune_cache_hit")}
    for i in range(repeats):
        plain_url = f"s3://bench/{tag}-plain-{i}"
        times["plain_upload"].append(timed(plain_upload, work / "model", plain_url))
        times["plain_download"].append(timed(plain_download, plain_url, work / f"plain-dl-{i}"))
        shutil.rmtree(work / f"plain-dl-{i}")
        fs.rm(f"bench/{tag}-plain-{i}", recursive=True)

        url = f"s3://bench/{tag}-sqltune-{i}"
        times["sqltune_upload"].append(timed(registry.publish, work / "model", url))
        t0 = time.perf_counter()
        got = registry.fetch(url, cache=work / f"cache-{i}")
        times["sqltune_download"].append(time.perf_counter() - t0)
        assert not got.cached and got.bytes_downloaded == size
        t0 = time.perf_counter()
        again = registry.fetch(url, cache=work / f"cache-{i}")
        times["sqltune_cache_hit"].append(time.perf_counter() - t0)
        assert again.cached and again.bytes_downloaded == 0
        shutil.rmtree(work / f"cache-{i}")
        fs.rm(f"bench/{tag}-sqltune-{i}", recursive=True)
    best = {k: min(v) for k, v in times.items()}
    mbps = {k: round(size / 1e6 / best[k], 1) for k in ("plain_upload", "plain_download", "sqltune_upload",
                                                         "sqltune_download")}
    return {"mb_per_s": mbps,
            "ratio_upload": round(mbps["sqltune_upload"] / mbps["plain_upload"], 2),
            "ratio_download": round(mbps["sqltune_download"] / mbps["plain_download"], 2),
            "cache_hit_s": round(best["sqltune_cache_hit"], 3),
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="artifact size in MB")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best is reported")
    parser.add_argument("--link-mb-s", type=float, default=25.0, help="per-connection cap of the `capped` link")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bucket_io.json"))
    args = parser.parse_args()

    server, endpoint = start_moto()
    proxy, capped = start_proxy(endpoint, args.link_mb_s)
    work = Path(tempfile.mkdtemp(prefix="bucket-io-"))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, SQLTUNE_CACHE=str(work / "cache"), SQLTUNE_NO_PROGRESS="1")
    try:
        size = make_artifact(work / "model", args.mb)
        fs, _ = storage.filesystem("s3://bench")
        fs.mkdir("bench")
        links = {}
        for tag, url in (("direct", endpoint), ("capped", capped)):
            os.environ["AWS_ENDPOINT_URL"] = url
            links[tag] = run_link(work, size, args.repeats, tag)
        result = {
            "artifact_mb": round(size / 1e6, 1),
            "files": len(manifests.read_manifest(work / "model")["files"]),
            "server": "moto_server (separate process) on 127.0.0.1",
            "links": {"direct": "loopback to moto", "capped": f"proxy pacing each TCP connection to {args.link_mb_s} MB/s"},
            "transfer_workers": storage.settings().workers,
            "chunk_mib": storage.CHUNK / 2**20,
            "plain": "fsspec/s3fs defaults, put_file/get_file one file after another",
            "sqltune_download_includes": "sha256 of every file, manifest check, atomic move into the cache",
            **links,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        proxy.kill()
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"artifact {result['artifact_mb']} MB in {result['files']} files, moto S3 server on 127.0.0.1")
    for tag in ("direct", "capped"):
        r = links[tag]
        print(f"[{tag}] {result['links'][tag]}")
        for what in ("upload", "download"):
            print(f"  {what:8s}  plain fsspec {r['mb_per_s']['plain_' + what]:7.1f} MB/s   "
                  f"sqltune {r['mb_per_s']['sqltune_' + what]:7.1f} MB/s   ratio {r['ratio_' + what]:.2f}x")
        print(f"  cache hit: {r['cache_hit_s']} s, 0 bytes downloaded")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
