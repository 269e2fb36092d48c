"""Shared pytest fixtures. Each area keeps its fixtures in its own module, imported here."""

from data_fixtures import *  # noqa: F401,F403 - generated videos/shards, HTTP and moto S3 servers
from engine_fixtures import *  # noqa: F401,F403 - tiny motion dataset, CLI runners for training
