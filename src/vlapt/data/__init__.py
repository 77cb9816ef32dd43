"""Demonstrations: the HDF5 format, scripted-expert collection, torch datasets, the demo buffer."""

from vlapt.data.format import DatasetError, DemoWriter, EpisodeData, env_args, read_episodes

__all__ = ["DatasetError", "DemoWriter", "EpisodeData", "env_args", "read_episodes"]
