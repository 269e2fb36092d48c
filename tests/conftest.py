"""Fixtures are defined in tests/support/ and registered here, once for the whole suite."""

pytest_plugins = ["tests.support.data", "tests.support.engine", "tests.support.slurm", "tests.support.videos"]
