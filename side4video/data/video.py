"""PyAV (FFmpeg) helpers: probe a video, decode chosen frames, encode frames, transcode.

DALI does the decoding in training; PyAV probes (codec, frame count, size: cheap, no decoding),
decodes the codecs DALI's CPU backend lacks (H.264, HEVC, ...), encodes the generated test
videos and transcodes at shard-making time.

Frames are converted to RGB the way DALI does it (BT.601 limited range, bilinear chroma
upsampling), so both decode paths feed the model the same pixels: FFmpeg's swscale fast path
(`to_ndarray(format="rgb24")`) upsamples chroma by repetition and lands about 2 levels off.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Optional, Sequence

import av
import numpy as np

# Codecs each DALI backend decodes (see docs/environment.md and fn.decoders.video's documentation).
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})
# NVDEC's smallest frame side per codec (NVIDIA's Video Codec SDK support matrix): smaller videos
# are refused by the GPU decoder ('mixed'), so they go through PyAV instead.
NVDEC_MIN_SIDE = {"vp9": 128, "av1": 128, "hevc": 144, "h264": 48, "vp8": 48, "mpeg4": 48, "mjpeg": 64}
# NVDEC decodes 8-bit 4:2:0 only for these inputs (H.264 High10, 4:2:2 and 4:4:4 are refused).
NVDEC_PIXEL_FORMATS = frozenset({"yuv420p", "yuvj420p", "nv12"})


def dali_decodes(codec: str, width: int, height: int, pix_fmt: str, gpu: bool) -> bool:
    """Whether the DALI backend in use ('mixed' on a GPU, 'cpu' otherwise) takes this video.
    Some GPUs lack AV1 altogether: that shows only when decoding, and the decoder then falls back
    to PyAV sample by sample (data/decode.py)."""
    if not gpu:
        return codec in DALI_CPU_CODECS
    if codec not in DALI_GPU_CODECS or min(width, height) < NVDEC_MIN_SIDE.get(codec, 0):
        return False
    return not pix_fmt or pix_fmt in NVDEC_PIXEL_FORMATS


class VideoError(Exception):
    """The bytes are not a decodable video."""


@dataclass
class VideoInfo:
    codec: str
    frames: int
    width: int
    height: int
    fps: float
    duration_s: float
    pix_fmt: str = ""  # e.g. yuv420p; yuv420p10le is 10-bit


def _open(data: bytes):
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise VideoError(f"cannot open container: {e}") from None


def probe(data: bytes) -> VideoInfo:
    """Codec, size, fps, and the frame count from demuxing every packet (no decoding: WebM
    containers do not store a frame count)."""
    with _open(data) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        except (av.FFmpegError, ValueError, OSError) as e:
            raise VideoError(f"cannot demux: {e}") from None
        if frames == 0:
            raise VideoError("no video frames")
        if not ctx.width or not ctx.height:
            raise VideoError("no frame size")
        rate = stream.average_rate or stream.guessed_rate or 0
        fps = float(rate) if rate else 0.0
        return VideoInfo(
            codec=ctx.name,
            frames=frames,
            width=int(ctx.width),
            height=int(ctx.height),
            fps=fps,
            duration_s=frames / fps if fps else 0.0,
            pix_fmt=ctx.format.name if ctx.format else "",
        )


def _plane(plane, rows: int, cols: int) -> np.ndarray:
    arr = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(-1, plane.line_size)
    return arr[:rows, :cols]


def _upsample2(c: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear 2x upsampling with centred samples (align_corners=False), edge-clamped."""

    def axis_weights(n_out: int, n_in: int):
        x = (np.arange(n_out) + 0.5) / 2.0 - 0.5
        x0 = np.floor(x).astype(np.int64)
        w = (x - x0).astype(np.float32)
        return np.clip(x0, 0, n_in - 1), np.clip(x0 + 1, 0, n_in - 1), w

    r0, r1, wr = axis_weights(rows, c.shape[0])
    c0, c1, wc = axis_weights(cols, c.shape[1])
    c = c.astype(np.float32)
    top = c[r0][:, c0] * (1 - wc) + c[r0][:, c1] * wc
    bottom = c[r1][:, c0] * (1 - wc) + c[r1][:, c1] * wc
    return top * (1 - wr[:, None]) + bottom * wr[:, None]


def frame_to_rgb(frame: "av.VideoFrame") -> np.ndarray:
    """(H, W, 3) uint8 RGB, converted as DALI converts (see module doc)."""
    if frame.format.name != "yuv420p":
        return frame.to_ndarray(format="rgb24")
    h, w = frame.height, frame.width
    y = _plane(frame.planes[0], h, w).astype(np.float32)
    u = _upsample2(_plane(frame.planes[1], (h + 1) // 2, (w + 1) // 2), h, w)
    v = _upsample2(_plane(frame.planes[2], (h + 1) // 2, (w + 1) // 2), h, w)
    yy = (y - 16.0) * (255.0 / 219.0)
    uu = (u - 128.0) * (255.0 / 224.0)
    vv = (v - 128.0) * (255.0 / 224.0)
    kr, kb = 0.299, 0.114
    r = yy + 2 * (1 - kr) * vv
    b = yy + 2 * (1 - kb) * uu
    g = (yy - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def decode_frames(data: bytes, indices: Sequence[int]) -> np.ndarray:
    """Frames at `indices` (any order, repeats allowed) as (len(indices), H, W, 3) uint8.

    Decodes sequentially up to the largest index; an index past the last decodable frame gets
    the last frame (a probe may count packets that do not decode)."""
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("no frame indices")
    last = wanted[-1]
    got = {}
    latest = None
    try:
        with _open(data) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in got or i in wanted:
                    latest = frame_to_rgb(frame)
                    got[i] = latest
                if i >= last:
                    break
    except (av.FFmpegError, ValueError, OSError, IndexError) as e:
        raise VideoError(f"cannot decode: {e}") from None
    if not got:
        raise VideoError("no frame decoded")
    fallback = got[max(got)]
    return np.stack([got.get(int(i), fallback) for i in indices])


def decode_all(data: bytes) -> int:
    """Decode every frame once (validation); returns the number of frames decoded."""
    n = 0
    try:
        with _open(data) as container:
            for _ in container.decode(video=0):
                n += 1
    except (av.FFmpegError, ValueError, OSError, IndexError) as e:
        raise VideoError(f"cannot decode frame {n}: {e}") from None
    if n == 0:
        raise VideoError("no frame decoded")
    return n


# ------------------------------------------------------------------------------------ encoding
CODECS = {
    # name: (encoder, container, file extension, encoder options)
    "vp9": (
        "libvpx-vp9",
        "webm",
        "webm",
        {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "row-mt": "1", "crf": "32", "b": "0"},
    ),
    "h264": ("libx264", "mp4", "mp4", {"preset": "veryfast", "crf": "23", "tune": "fastdecode"}),
}


def encode_frames(
    frames: Iterable[np.ndarray],
    codec: str = "vp9",
    fps: float = 8.0,
    keyframe_interval: int = 16,
    crf: Optional[int] = None,
) -> bytes:
    """Encode RGB uint8 frames (H, W, 3), even H and W, into a VP9 WebM or H.264 MP4 file."""
    encoder, fmt, _, options = CODECS[codec]
    options = dict(options)
    if crf is not None:
        options["crf"] = str(crf)
    buf = io.BytesIO()
    # bitexact: no random track/segment UIDs, so the same frames give the same file (reproducible shards)
    with av.open(buf, mode="w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
                stream.height, stream.width = int(rgb.shape[0]), int(rgb.shape[1])
                stream.pix_fmt = "yuv420p"
                stream.gop_size = max(1, int(keyframe_interval))
                stream.options = options
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to encode")
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def transcode(data: bytes, codec: str = "vp9", short_side: int = 0, keyframe_interval: int = 16) -> bytes:
    """Re-encode a video (VP9 WebM or H.264 MP4), optionally with its short side resized."""
    info = probe(data)
    w, h = info.width, info.height
    if short_side and min(w, h) != short_side:
        scale = short_side / min(w, h)
        w, h = _even(w * scale), _even(h * scale)
    else:
        w, h = _even(w), _even(h)

    def frames():
        with _open(data) as container:
            for frame in container.decode(video=0):
                yield frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()

    try:
        return encode_frames(frames(), codec=codec, fps=info.fps or 25.0, keyframe_interval=keyframe_interval)
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"cannot transcode: {e}") from None


def guess_extension(info: VideoInfo, filename: str) -> str:
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return ext if ext in ("webm", "mp4", "mkv", "avi", "mov") else ("webm" if info.codec in ("vp8", "vp9") else "mp4")
