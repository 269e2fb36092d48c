"""The loader the engine iterates: shards -> samples -> frame indices + augmentation -> batches.

    RankStream (stream.py: reader threads, compressed samples, deterministic order)
      -> probe (PyAV, no decoding: codec, frame count, size; garbage is caught here)
      -> frame indices (sampling.py) and view parameters (augment.py), seeded by integers
      -> ClipDecoder (decode.py: DALI, or PyAV for codecs the DALI backend lacks)
      -> batch dict, handed over through a bounded queue by a background thread

Shard readers, probing, PyAV decoding and the batch builder are threads of the training
process (DALI adds its own): Python delivers signals to the main thread only, so a preemption
signal reaches the engine's handler and never a data worker. The background thread builds
batches while the training step runs; `last_wait_s` is how long the consumer waited for the last
batch (0 when decoding kept up). Batches are handed over through a `Handoff` (threads.py), so the
consumer never waits blindly: a stop request (side4video/signals.py) ends the wait with
`StopRequested`, an exception in any loader or reader thread is raised in the consumer at its next
wait, and a producer that died silently is an error.

Determinism: the sample order is a pure function of (data.seed, epoch, rank, world size,
workers) and every random parameter of a sample a pure function of (data.seed, epoch, key,
pass, view). The state is (epoch, batches handed to the trainer, position in the rank's stream
after the last of them). Restoring it replays the epoch's compressed stream and skips the
consumed samples without probing or decoding them, then yields exactly the remaining batches.
Restored in another layout (world size, data.workers, seed, shuffle buffer), every rank's saved
position says which samples were consumed and the rest of the epoch is shared by the new ranks,
each sample once (data/remainder.py).

Train epochs have the same number of batches on every rank (collectives never hang): the
epoch length comes from the manifest's sample counts (or data.train.epoch_samples), and a rank
whose shards run out wraps around to another pass over them. Evaluation reads each sample
exactly once across ranks, with a smaller last batch, and has no fixed length.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from side4video.config import DataConfig
from side4video.data import augment as A
from side4video.data.captions import training_caption
from side4video.data.decode import ClipDecoder, ClipRequest
from side4video.data.remainder import Layer, Remainder, StreamLayout, remainder
from side4video.data.sample import Sample
from side4video.data.sampling import eval_indices, train_indices
from side4video.data.stream import BadLog, RankStream, ShardSet, resolve_shards, seeded_rng, stable_hash
from side4video.data.threads import END, Handoff
from side4video.data.video import VideoError, VideoInfo, probe
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)

MAX_BAD_KEYS_IN_STATE = 1000
CPU = torch.device("cpu")


class VideoLoader:
    """Batches of one split for one rank (see the module doc).

    `data` is the config's data section (shards, sampling, augmentation, decoding, streaming);
    the rest are plain arguments: clips per batch, views per clip (training: repeated augmented
    views; evaluation: spatial crops), temporal clips per video (evaluation), rank layout, the
    dtype clips are handed over in and the device decoding runs on (a GPU: DALI 'mixed').
    Training batches also carry each clip's caption for this epoch (`caption`, drawn from the
    sample's captions as a function of the seeds: data/captions.py); evaluation batches all of
    them (`captions`).
    """

    def __init__(
        self,
        data: DataConfig,
        split: str,
        *,
        batch_size: int,
        views: int = 1,
        clips: int = 1,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device = CPU,
        check_labels: bool = True,
        shards: Optional[ShardSet] = None,
    ):
        if split not in ("train", "val"):
            raise UserError(f"loader split {split!r}: allowed train, val")
        self.data, self.split = data, split
        self.train = split == "train"
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.dtype = dtype
        self.check_labels = check_labels  # recognition: a label outside 0..num_classes-1 is unusable
        self.batch_size = int(batch_size)
        self.frames = int(data.frames)
        self.views = int(views)
        self.clips = 1 if self.train else int(clips)
        self.shardset = (
            shards if shards is not None else resolve_shards(data[split].shards, data, what=f"data.{split}.shards")
        )
        self.class_names: List[str] = list(self.shardset.classes or [])
        if check_labels and self.class_names and len(self.class_names) != int(data.num_classes):
            log.warning(
                "data.%s: the manifest lists %d classes but data.num_classes is %d",
                split,
                len(self.class_names),
                data.num_classes,
            )
        self.flip_map = A.flip_label_map(data.flip_label_pairs)
        self._num_batches = self._epoch_batches() if self.train else None

        self.epoch = 0
        self.position = 0  # batches of this epoch handed to the consumer
        self._stream_pos = 0  # samples of the rank's stream behind those batches
        self._restored = False
        self._layers: List[Layer] = []  # this epoch's earlier layouts (data/remainder.py)
        self._remainder: Optional[Remainder] = None  # what this rank reads of the epoch after them
        self._bad = BadLog()
        self._unusable_in_row = 0  # unusable samples since the last usable one (producer thread)
        self.last_wait_s = 0.0
        self._decoder: Optional[ClipDecoder] = None
        # The GPU this rank trains on (DALI 'mixed' decodes there), given by the caller: the
        # current CUDA device is per thread, and decoding runs in the producer thread.
        self._gpu = device.type == "cuda"
        self._device_id = device.index if self._gpu else None
        self._probe_pool = ThreadPoolExecutor(max_workers=max(1, int(data.decode_threads)), thread_name_prefix="probe")
        self._out: Optional[Handoff] = None  # batches from the producer thread of the current pass
        self._stop = threading.Event()  # the producer's: ends its shard readers too

    # ------------------------------------------------------------------------- public surface
    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError("an evaluation loader has no fixed length (each sample once, ranks may differ)")
        return self._num_batches

    @property
    def bad_samples(self) -> List[str]:
        return list(self._bad.samples.keys())

    @property
    def bad_shards(self) -> Dict[str, str]:
        return dict(self._bad.shards)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless a restored state sits inside this very epoch."""
        epoch = int(epoch)
        if self._restored and epoch == self.epoch:
            return
        self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self._stream_pos, self._restored = epoch, 0, 0, False
        self._layers, self._remainder = [], None

    @property
    def layout(self) -> StreamLayout:
        return StreamLayout.of(self.data, self.world_size)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self.position,
            "stream_pos": self._stream_pos,
            "rank": self.rank,
            **asdict(self.layout),
            "layers": [layer.as_dict() for layer in self._layers],
            "bad_samples": self.bad_samples[-MAX_BAD_KEYS_IN_STATE:],
        }

    def load_state_dict(self, state: Dict[str, Any], every_rank: Optional[Sequence[Dict[str, Any]]] = None) -> None:
        """Continue behind `state` (this rank's). In another layout `every_rank` (all ranks' states,
        in rank order, as the checkpoint holds them) says exactly what was consumed; without it
        the epoch resumes approximately."""
        self._start_epoch(int(state["epoch"]))
        saved = StreamLayout.saved(state, self.layout)
        self._layers = [Layer.from_dict(d) for d in state.get("layers", [])]
        exact = every_rank is not None and len(every_rank) == saved.world_size and not self.data.resampled
        if saved == self.layout and "stream_pos" in state:
            self.position, self._stream_pos = int(state.get("batches", 0)), int(state["stream_pos"])
        elif exact and all(int(s["epoch"]) == self.epoch for s in every_rank):
            self._layers.append(Layer(saved, tuple(int(s.get("stream_pos", 0)) for s in every_rank)))
        else:
            # Only rank 0's position (an old checkpoint) or resampled shards: skip about as many
            # samples as were consumed so the epoch keeps its length.
            log.warning("data state from another layout; resuming epoch %d approximately", self.epoch)
            self._layers = []
            self.position = int(state.get("batches", 0))
            self._stream_pos = self.position * self.batch_size
        if self._layers:
            self._remainder = remainder(self.shardset, self.data, self.epoch, self._layers, self.layout, self.rank)
            if saved != self.layout:
                self._announce_new_layout(saved)
        for earlier in every_rank or [state]:
            for key in earlier.get("bad_samples", []):
                self._bad.sample(key, "seen before the resume")
        self._restored = True

    def _announce_new_layout(self, saved: StreamLayout) -> None:
        """The epoch's rest in this layout: as many batches as it fills (each sample once)."""
        left = self._remainder.left
        self.position = max(0, len(self) - math.ceil(left / (self.world_size * self.batch_size)))
        log.info(
            "data: epoch %d continues on %s (was %s): its %d unused samples in %d batches per rank, each once",
            self.epoch,
            self.layout.describe(),
            saved.describe(),
            left,
            len(self) - self.position,
        )

    def close(self) -> None:
        self._stop_producer()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._probe_pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        try:
            self._stop_producer()
        except Exception:
            pass

    # ------------------------------------------------------------------------------ iterating
    def __iter__(self):
        if self.train:
            if self.position >= len(self):
                if self._restored:  # restored at the very end of an epoch: nothing left of it
                    self._restored = False
                    return
                self._start_epoch(self.epoch + 1)
        else:
            self.position, self._stream_pos = 0, 0
        self._restored = False
        self._stop_producer()
        self._stop = stop = threading.Event()
        self._out = out = Handoff(int(self.data.prefetch), what="data")
        epoch, position, stream_pos = self.epoch, self.position, self._stream_pos
        out.start(
            lambda: self._produce(epoch, position, stream_pos, out, stop), name=f"loader-{self.split}-{self.rank}"
        )
        try:
            while True:
                t0 = time.perf_counter()
                item = out.get()
                wait = time.perf_counter() - t0
                if item is END:
                    return
                batch, batches_done, stream_pos = item
                self.position, self._stream_pos = batches_done, stream_pos
                self.last_wait_s = wait
                yield batch
        finally:
            self._stop_producer()

    def batches(self):
        """Endless, resumable: batch after batch, epoch after epoch (training). The loader's
        `state_dict()` after any batch resumes right behind it."""
        if not self.train:
            raise TypeError("an evaluation loader is read once per evaluation; batches() is for training")
        while True:
            yield from self

    def _stop_producer(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            self._stop.set()
            out.close(join_s=30)

    # -------------------------------------------------------------------------- the producer
    def _epoch_batches(self) -> int:
        epoch_samples = int(self.data.train.epoch_samples)
        total = epoch_samples or self.shardset.total_samples
        if not total:
            raise UserError(
                "data.train: epoch length unknown: use a manifest.json (make-shards writes one, "
                "with sample counts) or set data.train.epoch_samples"
            )
        return max(1, math.ceil(total / (self.world_size * self.batch_size)))

    def _make_stream(self, epoch: int, stop: threading.Event) -> RankStream:
        """The rank's stream for `epoch`; `stop` (the producer's) ends it and its readers."""
        d = self.data
        rest = self._remainder if self.train and epoch == self.epoch else None
        return RankStream(
            self.shardset,
            d,
            epoch=epoch,
            rank=self.rank,
            world=self.world_size,
            workers=int(d.workers),
            shuffle_shards=bool(d.shuffle_shards) and self.train,
            shuffle_buffer=int(d.shuffle_buffer) if self.train else 0,
            interleave=int(d.interleave) if self.train else 1,
            seed=int(d.seed),
            infinite=self.train,
            resampled=bool(d.resampled) and self.train,
            allow_sample_split=not self.train,
            bad=self._bad,
            stop=stop,
            plans=rest.plans if rest is not None else None,
            layer=rest.layer if rest is not None else 0,
        )

    def decoder(self) -> ClipDecoder:
        if self._decoder is None:
            ra = self.data.randaugment
            self._decoder = ClipDecoder(
                views=self.views,
                size=int(self.data.size),
                mean=list(self.data.mean),
                std=list(self.data.std),
                batch_size=self.batch_size,
                ra_steps=int(ra.num_ops) if (self.train and ra.enabled) else 0,
                fp16=self.dtype == torch.float16,
                threads=int(self.data.decode_threads),
                decoder=self.data.decoder,
                gpu=self._gpu,
                device_id=self._device_id,
                grayscale=self.train and float(self.data.grayscale) > 0,
            )
        return self._decoder

    def prepare(self, sample: Sample, epoch: int) -> Union[ClipRequest, str]:
        """Probe a sample and draw its frame indices and views; a string says why it is unusable."""
        if self.train and self.check_labels and not 0 <= sample.label < int(self.data.num_classes):
            return f"label {sample.label} outside 0..{int(self.data.num_classes) - 1}"
        try:
            info = probe(sample.video)
        except VideoError as e:
            return f"undecodable video ({e})"
        d = self.data
        if self.train:
            base = (int(d.seed), epoch, stable_hash(sample.key), sample.occurrence)
            indices = train_indices(info.frames, self.frames, d.sampling, int(d.dense_stride), seeded_rng(*base, 0))
            views = [A.train_view(seeded_rng(*base, 1 + v), info.height, info.width, d) for v in range(self.views)]
            return ClipRequest(sample.key, sample.video, info.codec, indices, views, info)
        return eval_request(sample.key, sample.video, info, d, crops=self.views, clips=self.clips)

    def _produce(self, epoch: int, batch_index: int, stream_pos: int, out: Handoff, stop: threading.Event) -> None:
        """The producer thread: batches of the epoch from `batch_index` on, put into `out` (which
        adds END after the last, or the exception this ends with)."""
        stream = None
        try:
            if self._gpu:
                torch.cuda.set_device(self._device_id)
            stream = self._make_stream(epoch, stop)
            samples = iter(stream)
            # Resume: replay the compressed stream up to where the trainer stopped; these
            # samples are read but neither probed nor decoded.
            for _ in range(stream_pos):
                if next(samples, None) is None:
                    break
            while not stop.is_set() and (self._num_batches is None or batch_index < self._num_batches):
                built = self._next_batch(samples, epoch, stop)
                if built is None:
                    break
                batch, stream_pos = built
                batch_index += 1
                if not out.put((batch, batch_index, stream_pos)):
                    return
            if self._decoder is not None:
                self._decoder.release_memory()  # the epoch is over: DALI's pools may shrink (GPU)
        finally:
            if stream is not None:
                stream.close()

    def _next_batch(self, samples, epoch: int, stop: threading.Event) -> Optional[Tuple[Dict[str, Any], int]]:
        """Take samples until batch_size of them decode (or the stream ends); None when empty."""
        good: List[Tuple[Sample, ClipRequest, torch.Tensor]] = []
        end_pos = None
        exhausted = False
        while len(good) < self.batch_size and not exhausted and not stop.is_set():
            taken: List[Sample] = []
            while len(taken) < self.batch_size - len(good):
                sample = next(samples, None)
                if sample is None:
                    exhausted = True
                    break
                taken.append(sample)
            if not taken:
                break
            end_pos = taken[-1].index + 1
            prepared = list(self._probe_pool.map(lambda s: self.prepare(s, epoch), taken))
            requests, reasons = [], {}
            for sample, req in zip(taken, prepared):
                if isinstance(req, str):
                    reasons[sample.key] = req
                else:
                    requests.append((sample, req))
            tensors, bad = self.decoder().decode([r for _, r in requests]) if requests else ([], [])
            reasons.update(bad)
            decoded = {s.key: (s, r, t) for (s, r), t in zip(requests, tensors) if t is not None}
            for sample in taken:  # in stream order, for the count of unusable samples in a row
                if sample.key in decoded:
                    good.append(decoded[sample.key])
                    self._unusable_in_row = 0
                else:
                    self._unusable(sample.key, reasons.get(sample.key, "not decoded"))
        if not good:
            return None
        return self._collate(good, epoch), end_pos

    def _unusable(self, key: str, reason: str) -> None:
        """Skip and count a sample; a long run of them is no bad luck but bad data or a decoder
        that refuses everything: end with one line instead of skipping forever."""
        self._bad.sample(key, reason)
        self._unusable_in_row += 1
        limit = int(self.data.max_bad_in_row)
        if limit and self._unusable_in_row >= limit:
            raise UserError(
                f"data.{self.split}: {self._unusable_in_row} samples in a row could not be used (the last, "
                f"{key}: {reason}); check the shards (side4video inspect --decode) and data.decoder, "
                f"or raise data.max_bad_in_row"
            )

    @property
    def decoder_fallbacks(self) -> int:
        """Samples DALI refused and PyAV decoded instead."""
        return len(self._decoder.fallbacks) if self._decoder is not None else 0

    def _collate(self, good: Sequence[Tuple[Sample, ClipRequest, torch.Tensor]], epoch: int) -> Dict[str, Any]:
        video = torch.stack([t for _, _, t in good])  # (B, V, F, 3, S, S)
        if self.train:
            video = video.flatten(0, 1)  # (B*R, T, 3, S, S): the R views of a clip are adjacent
            labels, keys, captions, drawn = [], [], [], []
            for sample, req, _ in good:
                caption = training_caption(sample.captions, int(self.data.seed), epoch, sample.key, sample.occurrence)
                for view in req.views:
                    label = sample.label
                    labels.append(self.flip_map.get(label, label) if view.flip else label)
                    keys.append(sample.key)
                    captions.append(sample.captions)
                    drawn.append(caption)
        else:
            video = eval_views_layout(video, self.clips, self.frames)
            labels = [s.label for s, _, _ in good]
            keys = [s.key for s, _, _ in good]
            captions = [s.captions for s, _, _ in good]
        if video.dtype != self.dtype:
            video = video.to(self.dtype)
        batch = {"video": video, "label": torch.tensor(labels, dtype=torch.long), "key": keys, "captions": captions}
        if self.train:
            batch["caption"] = drawn
        return batch


def eval_request(key: str, video: bytes, info: VideoInfo, data_cfg: DataConfig, crops: int, clips: int) -> ClipRequest:
    """The test views of one video: `clips` temporal clips (centre sampling) x `crops` crops."""
    indices = np.concatenate(
        eval_indices(info.frames, int(data_cfg.frames), data_cfg.sampling, int(data_cfg.dense_stride), clips)
    )
    return ClipRequest(key, video, info.codec, indices, A.eval_views(info.height, info.width, data_cfg, crops), info)


def eval_views_layout(decoded: torch.Tensor, clips: int, frames: int) -> torch.Tensor:
    """Decoded test views (B, crops, clips*T, 3, S, S) -> (B, crops*clips, T, 3, S, S)."""
    b, crops = decoded.shape[:2]
    return decoded.reshape(b, crops, clips, frames, *decoded.shape[3:]).flatten(1, 2)
