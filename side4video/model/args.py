"""The arguments both model kinds share: which frozen backbone, and which side network.

`ModelArgs` (model/build.py, recognition) and `RetrievalArgs` (model/retrieval.py) each hold one
`BackboneArgs` and one `SideArgs`; engine/factory.py fills them from `model.backbone.*` (+
`data.size`) and `model.side.*`. Plain values only, as open_clip's `create_model` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

from side4video.model.side import SideNetwork
from side4video.model.spec import BackboneSpec, resolve_spec, resolve_taps, side_variant


@dataclass(frozen=True)
class BackboneArgs:
    """The frozen image backbone: its architecture, its weights, its input size."""

    name: str = "ViT-B-16"  # open_clip model name (or ViT-T-16 / ViT-T-8)
    weights: str = ""  # local checkpoint (retrieval: of both towers); empty: random init
    image_size: int = 224
    quick_gelu: bool = False
    convert_weights: bool = False  # allow fp16 <-> bf16 rounding of a half-precision checkpoint (counted)
    fp32_blocks: Tuple[int, ...] = ()  # blocks computed in fp32 from their half-precision weights
    arch_overrides: Dict[str, int] = field(default_factory=dict)  # width/layers/heads/patch_size, 0 = named value

    def spec(self) -> BackboneSpec:
        return resolve_spec(self.name, int(self.image_size), quick_gelu=self.quick_gelu, **self.arch_overrides)


@dataclass(frozen=True)
class SideArgs:
    """The side network (method side4video): width, tapped blocks, block variant, memory options."""

    dim: int = 320
    layers: Union[str, Sequence[int]] = "auto"  # auto | all | every_other | block indices
    variant: str = "auto"  # clip | eva | auto (from the backbone family)
    heads: int = 0  # 0: dim // 64
    checkpointing: bool = False
    drop_path: float = 0.0

    def resolved_variant(self, spec: BackboneSpec) -> str:
        return side_variant(self.variant, spec)

    def taps(self, spec: BackboneSpec) -> List[int]:
        """The backbone blocks feeding side blocks (0-based, sorted)."""
        return resolve_taps(self.layers, spec.layers, self.resolved_variant(spec))

    def network(self, spec: BackboneSpec, num_taps: int, retrieval: bool = False) -> SideNetwork:
        """The side network beside `spec`'s backbone, one side block per tap (fp32, initialised)."""
        return SideNetwork(
            spec.width,
            self.dim,
            num_taps,
            spec.patch_size,
            spec.num_patches,
            heads=self.heads,
            variant=self.resolved_variant(spec),
            retrieval=retrieval,
            checkpointing=self.checkpointing,
            drop_path=self.drop_path,
        )
