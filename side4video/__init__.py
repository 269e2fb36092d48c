"""side4video: Side4Video side networks beside frozen image ViTs, trained with DeepSpeed on
streamed video shards."""

__version__ = "0.1.0"
