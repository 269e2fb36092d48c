"""Decoding and augmenting clips with DALI; PyAV for codecs DALI's CPU backend lacks.

One DALI pipeline per input kind:
- "bytes":  external_source(encoded video) + external_source(frame indices)
            -> fn.decoders.video(frames=indices), device 'mixed' on a GPU host, else 'cpu'
- "frames": external_source(frames decoded by PyAV at the same indices)
then, identical for both, per view: fn.resize with the view's ROI to size x size (resize and crop
in one step) -> RandAugment steps (DALI conditionals; op, magnitude and affine matrix fed per
sample) -> grayscale (a conditional on a fed per-sample flag; only in graphs built with
`grayscale=True`) -> fn.crop_mirror_normalize (flip, mean/std, FCHW, fp16/fp32). Every fed
parameter is per sample, so every frame of a clip gets the same op, magnitude, flip and grey.

Without DALI (not installed, e.g. the portable GPU kit): one log line says so, every clip is
decoded by PyAV and the same transforms run in torch (`torch_views`; RandAugment and
`data.decoder=dali` are refused in one line).

Every random parameter arrives through external_source (drawn in augment.py from seeded
Generators), never from DALI's RNG: a pipeline rebuilt after a resume or an error gives the same
tensors. A DALI pipeline does not survive an operator error ("Current pipeline object is no
longer valid"), so on an error the pipeline is rebuilt and the batch decoded sample by sample to
find the undecodable ones; those are dropped and reported with their keys.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from side4video.data import augment as A
from side4video.data.video import VideoError, VideoInfo, dali_decodes, decode_frames
from side4video.errors import UserError, first_line
from side4video.logs import get_logger

log = get_logger(__name__)

SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0  # PIL's SMOOTH filter
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2 luma, as PIL's convert("L")


@dataclass
class ClipRequest:
    """One sample to decode: its frames (indices into the video) and its augmented views."""

    key: str
    video: bytes
    codec: str
    indices: np.ndarray
    views: List[A.ViewParams]
    info: Optional[VideoInfo] = None  # size and pixel format: the GPU decoder refuses some videos


def gpu_available() -> bool:
    return torch.cuda.is_available()


_DALI: Optional[str] = None  # "" when NVIDIA DALI imports, else why it does not


def dali_missing() -> str:
    """Why NVIDIA DALI cannot be imported here ("" when it can); said once, in one log line, when
    it cannot: every clip is then decoded by PyAV and transformed in torch (no RandAugment)."""
    global _DALI
    if _DALI is None:
        try:
            import nvidia.dali  # noqa: F401

            _DALI = ""
        except ImportError as e:
            _DALI = first_line(e)
            log.warning("NVIDIA DALI is not available (%s): decoding every clip with PyAV instead", _DALI)
    return _DALI


def torch_views(frames: np.ndarray, views: Sequence[A.ViewParams], size: int, mean, std, dtype) -> torch.Tensor:
    """Without DALI: the graph's transforms in torch on PyAV's frames (F, H, W, 3) uint8 -> (V, F, 3,
    size, size): the view's relative ROI cropped and resized (bilinear, antialiased, rounded to uint8
    as DALI's resize gives it), grayscale, flip, normalisation. RandAugment has no torch path."""
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # F, 3, H, W
    height, width = clip.shape[-2:]
    m = torch.tensor([255.0 * v for v in mean]).view(1, 3, 1, 1)
    s = torch.tensor([255.0 * v for v in std]).view(1, 3, 1, 1)
    out = []
    for view in views:
        if view.ra:
            raise ValueError("RandAugment needs NVIDIA DALI")
        (y0, x0), (y1, x1) = view.roi_start, view.roi_end
        top, left = round(float(y0) * height), round(float(x0) * width)
        bottom = max(top + 1, round(float(y1) * height))  # at least one row and column
        right = max(left + 1, round(float(x1) * width))
        crop = clip[:, :, max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
        v = torch.nn.functional.interpolate(
            crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        v = v.round().clamp(0, 255)
        if view.grayscale:
            v = (v * torch.from_numpy(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        if view.flip:
            v = v.flip(-1)
        out.append(((v - m) / s).to(dtype))
    return torch.stack(out)


# --------------------------------------------------------------------------------- the graph
def _luma(clip):
    """Luma of a float FHWC clip, channel axis kept: (F, H, W, 1)."""
    from nvidia.dali import fn, types

    return fn.reductions.sum(clip * types.Constant(LUMA), axes=[3], keep_dims=True)


def _grayscale(clip, view: int, float_clip: bool):
    """torchvision's Grayscale(3) when the view's fed flag is set: every channel = the luma."""
    from nvidia.dali import fn, types

    grey = fn.external_source(name=f"grey_{view}", dtype=types.INT32, ndim=0)
    if grey:
        luma = _luma(clip if float_clip else fn.cast(clip, dtype=types.FLOAT))
        rgb = luma * types.Constant(np.ones(3, dtype=np.float32))  # broadcast to 3 channels
        # both branches must agree on the type: back to uint8 (rounded, as PIL) when the clip is
        clip = rgb if float_clip else fn.cast(rgb, dtype=types.UINT8)
    return clip


def _randaugment_step(clip, view: int, step: int, gpu: bool):
    """One RandAugment step: the op chosen per sample by a fed integer (DALI conditionals)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    kind = fn.external_source(name=f"ra_kind_{view}_{step}", dtype=types.INT32, ndim=0)
    param = fn.external_source(name=f"ra_arg_{view}_{step}", dtype=types.FLOAT, ndim=0)
    matrix = fn.external_source(name=f"ra_matrix_{view}_{step}", dtype=types.FLOAT, ndim=2)
    # Named arguments (saturation=, matrix=) take the CPU node; arithmetic with GPU frames wants
    # its operands on the GPU too.
    arg = param.gpu() if gpu else param
    if kind == A.RA_AFFINE:
        clip = fn.warp_affine(clip, matrix=matrix, fill_value=128.0, inverse_map=False)
    elif kind == A.RA_POSTERIZE:
        clip = fn.cast(fn.cast(clip, dtype=types.UINT8) & fn.cast(arg, dtype=types.UINT8), dtype=types.FLOAT)
    elif kind == A.RA_SOLARIZE:
        clip = clip + fn.cast(clip >= arg, dtype=types.FLOAT) * (255.0 - 2.0 * clip)
    elif kind == A.RA_SOLARIZE_ADD:
        clip = dmath.min(clip + fn.cast(clip < 128.0, dtype=types.FLOAT) * arg, 255.0)
    elif kind == A.RA_COLOR:
        clip = dmath.clamp(fn.color_twist(clip, saturation=param), 0.0, 255.0)
    elif kind == A.RA_CONTRAST:  # PIL: blend with the frame's mean luma
        mean = _luma(fn.reductions.mean(clip, axes=[1, 2], keep_dims=True))  # (F, 1, 1, 1)
        clip = dmath.clamp(mean + arg * (clip - mean), 0.0, 255.0)
    elif kind == A.RA_BRIGHTNESS:
        clip = dmath.clamp(clip * arg, 0.0, 255.0)
    elif kind == A.RA_SHARPNESS:
        blur = fn.filter(clip, SMOOTH, border="clamp")
        clip = dmath.clamp(blur + arg * (clip - blur), 0.0, 255.0)
    elif kind == A.RA_AUTOCONTRAST:  # PIL: per frame and channel; a flat channel stays as it is
        lo = fn.reductions.min(clip, axes=[1, 2], keep_dims=True)
        hi = fn.reductions.max(clip, axes=[1, 2], keep_dims=True)
        flat = fn.cast(hi - lo < 1.0, dtype=types.FLOAT)
        scale = flat + (1.0 - flat) * (255.0 / dmath.max(hi - lo, 1.0))
        clip = (clip - (1.0 - flat) * lo) * scale
    elif kind == A.RA_EQUALIZE:
        clip = fn.cast(fn.equalize(fn.cast(clip, dtype=types.UINT8)), dtype=types.FLOAT)
    elif kind == A.RA_INVERT:
        clip = 255.0 - clip
    return clip


def _clip_graph(
    source: str,
    views: int,
    ra_steps: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    fp16: bool,
    gpu: bool,
    grayscale: bool = False,
):
    from nvidia.dali import fn, types

    if source == "bytes":
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
        # affine=False: the mixed decoder would pin its threads to fixed cores, possibly outside
        # the job's CPU set or onto the same cores for every rank of a node
        gpu_args = {"affine": False} if gpu else {}
        video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=indices, **gpu_args)
    else:
        video = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC")
        if gpu:
            video = video.gpu()
    outputs = []
    for v in range(views):
        roi_start = fn.external_source(name=f"roi_start_{v}", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name=f"roi_end_{v}", dtype=types.FLOAT, ndim=1)
        flip = fn.external_source(name=f"flip_{v}", dtype=types.INT32, ndim=0)
        # uint8 out of the resize unless RandAugment follows (its arithmetic needs float)
        clip = fn.resize(
            video,
            size=[size, size],
            roi_start=roi_start,
            roi_end=roi_end,
            roi_relative=True,
            dtype=types.FLOAT if ra_steps else types.UINT8,
            antialias=True,
        )
        for step in range(ra_steps):
            clip = _randaugment_step(clip, v, step, gpu)
        if grayscale:
            clip = _grayscale(clip, v, float_clip=ra_steps > 0)
        outputs.append(
            fn.crop_mirror_normalize(
                clip,
                mirror=flip,
                mean=[255.0 * m for m in mean],
                std=[255.0 * s for s in std],
                output_layout="FCHW",
                dtype=types.FLOAT16 if fp16 else types.FLOAT,
            )
        )
    return tuple(outputs)


def define_pipeline(
    source: str,
    *,
    batch_size: int,
    views: int,
    ra_steps: int,
    size: int,
    mean,
    std,
    fp16: bool,
    threads: int,
    gpu: bool,
    device_id: Optional[int],
    grayscale: bool = False,
):
    """The DALI pipeline of one input kind (see the module doc), defined but not built. Defining
    it needs no device, so the GPU layout ('mixed' decoder, GPU operators) can be checked on any
    host; building it needs CUDA for that layout."""
    from nvidia.dali import pipeline_def

    @pipeline_def(enable_conditionals=ra_steps > 0 or grayscale)
    def graph():
        return _clip_graph(source, views, ra_steps, size, mean, std, fp16, gpu, grayscale)

    # Synchronous execution: we feed a batch, run, read the outputs; overlap with training comes
    # from the loader's prefetch thread, and DALI's own threads decode the samples in parallel.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pipe = graph(
            batch_size=batch_size,
            num_threads=max(1, threads),
            device_id=device_id if gpu else None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
            seed=0,
        )
    return pipe


def build_pipeline(source: str, **kwargs):
    """`define_pipeline(source, **kwargs)`, built: ready to be fed and run."""
    pipe = define_pipeline(source, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pipe.build()
    return pipe


# ------------------------------------------------------------------------------------ decoder
class ClipDecoder:
    """Decode + augment batches of ClipRequests into tensors (views, frames, 3, size, size).

    `decoder`: 'auto' sends each sample to DALI when the DALI backend in use can decode its
    codec and to PyAV otherwise; 'dali' and 'pyav' force one path. `ra_steps` and `grayscale`
    shape the graph: RandAugment steps per view, and whether views may turn grey (training with
    `data.grayscale` > 0).
    """

    def __init__(
        self,
        *,
        views: int,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        ra_steps: int = 0,
        fp16: bool = False,
        threads: int = 2,
        decoder: str = "auto",
        gpu: Optional[bool] = None,
        device_id: Optional[int] = None,
        grayscale: bool = False,
    ):
        self.views, self.size, self.mean, self.std = int(views), int(size), list(mean), list(std)
        self.grayscale = bool(grayscale)
        self.batch_size, self.ra_steps, self.fp16, self.threads = (
            int(batch_size),
            int(ra_steps),
            fp16,
            max(1, int(threads)),
        )
        self.decoder = decoder
        self.gpu = gpu_available() if gpu is None else gpu
        self.device_id = (torch.cuda.current_device() if self.gpu else None) if device_id is None else device_id
        self._pipes: Dict[str, object] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="pyav-decode")
        self.fallbacks: List[Tuple[str, str]] = []  # (key, DALI's reason) of samples PyAV decoded instead
        self.dali = not dali_missing()
        if not self.dali and (self.ra_steps or decoder == "dali"):
            self.close()
            wanted = "data.decoder=dali" if decoder == "dali" else "RandAugment (data.randaugment.enabled)"
            raise UserError(f"{wanted} needs NVIDIA DALI, which is not available here: {dali_missing()}")

    # -- routing --------------------------------------------------------------------------------
    def route(self, request: ClipRequest) -> str:
        """'dali' when the DALI backend in use takes this video (codec; on a GPU also its size and
        pixel format, which NVDEC limits), else 'pyav'."""
        if self.decoder in ("dali", "pyav"):
            return self.decoder
        if not self.dali:
            return "pyav"
        info = request.info
        width, height, pix_fmt = (info.width, info.height, info.pix_fmt) if info is not None else (1 << 16, 1 << 16, "")
        return "dali" if dali_decodes(request.codec, width, height, pix_fmt, self.gpu) else "pyav"

    def _pipe(self, source: str):
        if source not in self._pipes:
            self._pipes[source] = build_pipeline(
                source,
                batch_size=self.batch_size,
                views=self.views,
                ra_steps=self.ra_steps,
                size=self.size,
                mean=self.mean,
                std=self.std,
                fp16=self.fp16,
                threads=self.threads,
                gpu=self.gpu,
                device_id=self.device_id,
                grayscale=self.grayscale,
            )
        return self._pipes[source]

    def _drop_pipe(self, source: str) -> None:
        pipe = self._pipes.pop(source, None)
        del pipe

    # -- running ----------------------------------------------------------------------------------
    def _feed(self, pipe, source: str, requests: Sequence[ClipRequest], frames: Optional[List[np.ndarray]]) -> None:
        if source == "bytes":
            pipe.feed_input("encoded", [np.frombuffer(r.video, dtype=np.uint8) for r in requests])
            pipe.feed_input("indices", [np.asarray(r.indices, dtype=np.int32) for r in requests])
        else:
            pipe.feed_input("frames", frames, layout="FHWC")
        for v in range(self.views):
            params = [r.views[v] for r in requests]
            pipe.feed_input(f"roi_start_{v}", [p.roi_start for p in params])
            pipe.feed_input(f"roi_end_{v}", [p.roi_end for p in params])
            pipe.feed_input(f"flip_{v}", [np.array(int(p.flip), dtype=np.int32) for p in params])
            if self.grayscale:
                pipe.feed_input(f"grey_{v}", [np.array(int(p.grayscale), dtype=np.int32) for p in params])
            for s in range(self.ra_steps):
                steps = [p.ra[s] if s < len(p.ra) else A.RAStep() for p in params]
                pipe.feed_input(f"ra_kind_{v}_{s}", [np.array(st.kind, dtype=np.int32) for st in steps])
                pipe.feed_input(f"ra_arg_{v}_{s}", [np.array(st.arg, dtype=np.float32) for st in steps])
                pipe.feed_input(f"ra_matrix_{v}_{s}", [st.matrix for st in steps])

    def _to_torch(self, tensor_list) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dtype = torch.float16 if self.fp16 else torch.float32
            out = torch.empty(dense.shape(), dtype=dtype, device=torch.device("cuda", self.device_id))
            stream = torch.cuda.current_stream(self.device_id)
            feed_ndarray(dense, out, cuda_stream=stream)
            # DALI's outputs stay valid only until its next run(), which writes them on its own
            # stream: the copy must be complete before this thread asks for the next batch.
            stream.synchronize()
            return out
        return torch.from_numpy(np.array(dense))  # a copy: DALI reuses its output buffers

    def _run(self, source: str, requests: Sequence[ClipRequest], frames=None) -> List[torch.Tensor]:
        pipe = self._pipe(source)
        self._feed(pipe, source, requests, frames)
        outputs = pipe.run()
        per_view = [self._to_torch(out) for out in outputs]  # each (n, F, 3, S, S)
        stacked = torch.stack(per_view, dim=1)  # (n, V, F, 3, S, S)
        return list(stacked.unbind(0))

    def _run_guarded(self, source: str, requests: Sequence[ClipRequest], frames=None):
        """(results aligned with requests, None where undecodable; [(key, reason)])."""
        try:
            return self._run(source, requests, frames), []
        except Exception as e:  # DALI raises RuntimeError for any operator failure
            self._drop_pipe(source)
            if len(requests) == 1:
                return [None], [(requests[0].key, f"DALI could not decode it: {_dali_reason(e)}")]
        results, bad = [], []
        for i, r in enumerate(requests):
            res, b = self._run_guarded(source, [r], [frames[i]] if frames is not None else None)
            results.extend(res)
            bad.extend(b)
        return results, bad

    def decode(self, requests: Sequence[ClipRequest]) -> Tuple[List[Optional[torch.Tensor]], List[Tuple[str, str]]]:
        """Decode up to batch_size requests. Returns per-request tensors (None when the sample
        was undecodable) and the (key, reason) of those."""
        if len(requests) > self.batch_size:
            raise ValueError(f"{len(requests)} requests for a pipeline of batch size {self.batch_size}")
        if not self.grayscale and any(v.grayscale for r in requests for v in r.views):
            # never drop an augmentation silently: the graph has no grayscale node
            raise ValueError("a view asks for grayscale but this ClipDecoder was built with grayscale=False")
        results: List[Optional[torch.Tensor]] = [None] * len(requests)
        bad: List[Tuple[str, str]] = []
        dali_idx = [i for i, r in enumerate(requests) if self.route(r) == "dali"]
        pyav_idx = [i for i, r in enumerate(requests) if self.route(r) == "pyav"]
        if dali_idx:
            out, refused = self._run_guarded("bytes", [requests[i] for i in dali_idx])
            refused_keys = dict(refused)
            for i, t in zip(dali_idx, out):
                results[i] = t
                if t is None and self.decoder == "auto":  # a second chance through PyAV
                    self.fallbacks.append((requests[i].key, refused_keys[requests[i].key]))
                    pyav_idx.append(i)
            if self.decoder != "auto":
                bad.extend(refused)
        if pyav_idx:
            decoded = list(self._pool.map(_pyav_frames, [requests[i] for i in pyav_idx]))
            ok = []
            for i, frames in zip(pyav_idx, decoded):
                if isinstance(frames, str):
                    bad.append((requests[i].key, frames))
                else:
                    ok.append((i, frames))
            if ok and not self.dali:  # the transforms in torch
                dtype = torch.float16 if self.fp16 else torch.float32
                device = torch.device("cuda", self.device_id) if self.gpu else torch.device("cpu")
                for i, frames in ok:
                    clip = torch_views(frames, requests[i].views, self.size, self.mean, self.std, dtype)
                    results[i] = clip.to(device)
            elif ok:
                out, b = self._run_guarded("frames", [requests[i] for i, _ in ok], [f for _, f in ok])
                for (i, _), t in zip(ok, out):
                    results[i] = t
                bad.extend(b)
        return results, bad

    def release_memory(self) -> None:
        """Give DALI's unused device and pinned buffers back (GPU hosts). DALI's pools grow to the
        largest video seen (8 x 16 full-HD frames is ~0.8 GB) and never shrink on their own,
        outside torch's allocator; an epoch boundary is a good moment (make-shards --short-side
        bounds them for good)."""
        if self.gpu and self.dali:
            from nvidia.dali import backend

            backend.ReleaseUnusedMemory()

    def close(self) -> None:
        self._pipes.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _pyav_frames(request: ClipRequest):
    try:
        return decode_frames(request.video, request.indices)
    except (VideoError, ValueError) as e:
        return f"PyAV could not decode it: {e}"


def _dali_reason(e: BaseException) -> str:
    """The line of a DALI error that says what went wrong. Its first line is a generic header
    ("Critical error in pipeline:"), followed by the graph's traceback; the cause comes last
    ('Assert on "...IsValid()" failed: Failed to create video decoder ...'). Other errors: their
    first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Error" in ln or "error" in ln or "not supported" in ln or "Assert" in ln]
    return (useful[-1] if useful else first_line(e))[:200]
