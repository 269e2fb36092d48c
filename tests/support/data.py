"""Data fixtures: generated videos and shards, a local HTTP server and a moto S3 server.

Everything is generated under pytest tmp dirs: tiny VP9 WebM clips (and one H.264 MP4), shards
written by our own writer, servers bound to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest

from side4video.distributed import free_port

BUCKET = "side4video-test"
S3_KEYS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}



def noise_frames(seed: int, frames: int = 12, height: int = 32, width: int = 48) -> List[np.ndarray]:
    """A moving smooth pattern with some noise: decodable, and different frame to frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    out = []
    for t in range(frames):
        phase = t * 0.6 + seed
        img = np.stack([base[c] * 0.5 + 60 * np.sin((xx + 3 * t) / (4 + c) + phase) + 40 * np.cos(yy / 5 + c)
                        for c in range(3)], axis=-1)
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
    args = [f"data.train.shards={spec(train_spec)}", "data.num_classes=4", "data.frames=4", "data.size=32",
            "data.resize=[36]", "data.crop_area=[0.5,1.0]", "train.batch_size=4", "data.decode_threads=2",
            "data.shuffle_buffer=4", "data.retry_backoff=0.05"]
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


class MotoS3:
    """A moto S3 server (real HTTP API) on 127.0.0.1 that can be stopped and restarted."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # release the port: clients get "connection refused"
            self.server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEYS["access_key_id"],
                            aws_secret_access_key=S3_KEYS["secret_access_key"], region_name=S3_KEYS["region"])

    def upload_folder(self, folder: Path, prefix: str) -> str:
        client = self.client()
        existing = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        if BUCKET not in existing:
            client.create_bucket(Bucket=BUCKET)
        for name in sorted(os.listdir(folder)):
            client.upload_file(str(folder / name), BUCKET, f"{prefix}/{name}")
        return f"s3://{BUCKET}/{prefix}"

    def overrides(self) -> List[str]:
        return [f"data.s3.endpoint_url={self.endpoint}", f"data.s3.access_key_id={S3_KEYS['access_key_id']}",
                f"data.s3.secret_access_key={S3_KEYS['secret_access_key']}", f"data.s3.region={S3_KEYS['region']}"]


@pytest.fixture
def moto_s3() -> Iterator[MotoS3]:
    s3 = MotoS3()
    s3.start()
    yield s3
    s3.stop()
