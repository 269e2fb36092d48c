"""side4video.model: frozen backbones, the Side4Video side network, heads, baselines, retrieval.

Stable API: `from_official(state_dict, config)` (reference checkpoint -> our fp32 eval model),
`retrieval_from_official(state_dict, config)` (the reference retrieval model, likewise),
`build_model(ModelArgs(...))`, `build_model_on_meta(ModelArgs(...))`, `VideoModel`.
"""

from side4video.model.build import VideoModel, build_model, build_model_on_meta
from side4video.model.convert import from_official
from side4video.model.retrieval import retrieval_from_official

__all__ = ["VideoModel", "build_model", "build_model_on_meta", "from_official", "retrieval_from_official"]
