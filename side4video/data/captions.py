"""Captions of retrieval samples: which caption a training clip gets, and their tokens.

- Training draws one caption per clip per epoch. The choice is a pure function of
  (data.seed, epoch, sample key, pass), like every other random parameter of a sample
  (augment.py), so a resumed epoch draws the same captions.
- Evaluation uses every caption of every video.
- Tokens: open_clip's CLIP tokenizer (its BPE vocabulary ships inside open_clip: nothing is
  downloaded): SOT, the words, EOT, then padding with id 0, cut to `max_words` tokens with EOT
  kept last, as the reference's loaders do. The mask is 1 from SOT to EOT inclusive; it cannot be
  `ids != 0`, because 0 is also the id of the token "!".
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch

from side4video.data.stream import seeded_rng, stable_hash

CAPTION_STREAM = 0xCA7  # keeps the caption draw apart from the frame (0) and view (1 + v) draws


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's CLIP BPE tokenizer (built once per process)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(captions: Sequence[str], max_words: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids, text_mask), both (N, max_words) int64."""
    tokenizer = clip_tokenizer()
    ids = tokenizer([str(c) for c in captions], context_length=int(max_words))
    eot = (ids == tokenizer.eot_token_id).int().argmax(dim=1)  # one EOT per row, the last kept token
    mask = (torch.arange(ids.shape[1])[None, :] <= eot[:, None]).long()
    return ids, mask


def training_caption(captions: Sequence[str], seed: int, epoch: int, key: str, occurrence: int = 0) -> str:
    """The caption a training clip is paired with in this epoch ("" for a clip without captions).

    `occurrence`: the pass over the rank's shards the sample came from (a clip met twice in an
    epoch gets two independent draws)."""
    if not captions:
        return ""
    rng = seeded_rng(int(seed), int(epoch), stable_hash(key), int(occurrence), CAPTION_STREAM)
    return str(captions[int(rng.integers(len(captions)))])


def training_captions(
    batch_captions: Sequence[Sequence[str]], keys: Sequence[str], occurrences: Sequence[int], seed: int, epoch: int
) -> List[str]:
    """One drawn caption per clip of a batch (the batch's per-clip caption lists, keys and passes)."""
    return [training_caption(caps, seed, epoch, key, occ) for caps, key, occ in zip(batch_captions, keys, occurrences)]


def evaluation_captions(batch_captions: Sequence[Sequence[str]], keys: Sequence[str]) -> List[Tuple[str, int, str]]:
    """Every caption of every video of a batch: (key, caption index, caption), in batch order."""
    return [(key, i, str(c)) for caps, key in zip(batch_captions, keys) for i, c in enumerate(caps)]
