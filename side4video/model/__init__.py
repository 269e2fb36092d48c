"""side4video.model: frozen backbones, the Side4Video side network, heads, baselines.

Stable API: `from_official(state_dict, config)` (reference checkpoint -> our fp32 eval model),
`build_model(cfg)`, `build_model_on_meta(cfg)`, `VideoModel`.
"""

from side4video.model.build import VideoModel, build_model, build_model_on_meta
from side4video.model.convert import from_official

__all__ = ["VideoModel", "build_model", "build_model_on_meta", "from_official"]
