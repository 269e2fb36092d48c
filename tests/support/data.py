"""Data fixtures: generated videos and shards, a local HTTP server and a SeaweedFS S3 server.

Everything is generated under pytest tmp dirs: tiny VP9 WebM clips (and one H.264 MP4), shards
written by our own writer, servers bound to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest

from side4video.bench.servers import SeaweedS3

BUCKET = "side4video-test"


def noise_frames(seed: int, frames: int = 12, height: int = 32, width: int = 48) -> List[np.ndarray]:
    """A moving smooth pattern with some noise: decodable, and different frame to frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    out = []
    for t in range(frames):
        phase = t * 0.6 + seed
        img = np.stack(
            [base[c] * 0.5 + 60 * np.sin((xx + 3 * t) / (4 + c) + phase) + 40 * np.cos(yy / 5 + c) for c in range(3)],
            axis=-1,
        )
        img += rng.normal(0, 6, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def encode(seed: int, codec: str = "vp9", frames: int = 12, height: int = 32, width: int = 48) -> bytes:
    from side4video.data.video import encode_frames

    return encode_frames(noise_frames(seed, frames, height, width), codec=codec, fps=8.0, keyframe_interval=6)


def video_folder(root: Path, n: int = 6, h264: int = 1) -> List[str]:
    """n videos under root/videos/{a,b}/clipK.{webm|mp4}; the last `h264` ones are H.264."""
    rels = []
    for i in range(n):
        codec = "h264" if i >= n - h264 else "vp9"
        rel = f"{'ab'[i % 2]}/clip{i}.{'mp4' if codec == 'h264' else 'webm'}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(i, codec))
        rels.append(rel)
    return rels


def load_cfg(*overrides: str):
    from side4video.config import load_config

    return load_config(None, list(overrides))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Dict[str, object]:
    """make-synthetic: 24 train clips (4 shards of 6) and 8 val clips (2 shards), 4 classes,
    8 frames at 32 px."""
    from side4video.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    counts = make_synthetic(str(out), videos=24, classes=4, val_videos=8, frames=8, size=32, shard_samples=6)
    return {"root": out, "train": out / "train", "val": out / "val", "counts": counts}


def data_cfg_for(train_spec, val_spec=None, *overrides: str):
    """A small config reading the given specs (32 px, 4 frames, batch 4)."""
    spec = lambda s: f"'{s}'" if isinstance(s, str) else str(list(s))  # noqa: E731
    args = [
        f"data.train.shards={spec(train_spec)}",
        "data.num_classes=4",
        "data.frames=4",
        "data.size=32",
        "data.resize=[36]",
        "data.crop_area=[0.5,1.0]",
        "train.batch_size=4",
        "data.decode_threads=2",
        "data.shuffle_buffer=4",
        "data.retry_backoff=0.05",
    ]
    if val_spec is not None:
        args.append(f"data.val.shards={spec(val_spec)}")
    return load_cfg(*args, *overrides)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - http.server API
        pass


@pytest.fixture
def http_server():
    """start(directory) -> base URL of a real HTTP server (python's http.server) on 127.0.0.1."""
    servers = []

    def start(directory) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session (its data and log under a
    tmp dir: weed.log). Tests use their own key prefixes in BUCKET; one that stops the server
    starts it again before it ends."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), log_requests=True)
    server.start()
    try:
        server.ensure_bucket(BUCKET)
        yield server
    finally:
        server.stop()


class FaultyProxy:
    """A real HTTP proxy on `host` (127.0.0.1) in front of an upstream server (the S3 server, or an
    HTTP file server) that answers some requests itself, the way real servers fail:

    - `burst_every` / `burst`: of the GET requests for each `.tar` object, `burst` consecutive ones
      every `burst_every` get a 503 (S3's SlowDown / a load balancer under pressure);
    - `stall_after`: after that many `.tar` GETs every further one hangs until `release()`.
    Everything else is forwarded unchanged (method, path, headers, body): the Host header too,
    since S3 requests are signed over it. With no faults set it is a plain proxy (the SLURM test
    uses one so that nodes in network namespaces reach the S3 server)."""

    def __init__(
        self, upstream: str, burst_every: int = 0, burst: int = 0, stall_after: int = -1, host: str = "127.0.0.1"
    ):
        import http.client
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.burst_every, self.burst, self.stall_after = burst_every, burst, stall_after
        self.tar_gets = 0
        self.gets_of = {}  # path -> GETs so far
        self.failed = 0
        self.released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                if self.command == "GET" and ".tar" in self.path:
                    path = self.path.split("?")[0]
                    with proxy._lock:
                        proxy.tar_gets += 1
                        n = proxy.tar_gets
                        proxy.gets_of[path] = k = proxy.gets_of.get(path, 0) + 1
                    if 0 <= proxy.stall_after < n:
                        proxy.released.wait(600)
                    if proxy.burst_every and (k - 1) % proxy.burst_every < proxy.burst:
                        proxy.failed += 1
                        body = b"<Error><Code>SlowDown</Code></Error>"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():  # HEAD keeps the object's length; bodies get their own
                    if k.lower() not in ("transfer-encoding", "connection") and not (
                        k.lower() == "content-length" and self.command != "HEAD"
                    ):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815 - http.server API

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{host}:{self.server.server_address[1]}"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
