"""Demonstrations and buffers: the HDF5 format, collection, relabelling, chunk datasets, the self-BC buffer."""

from vlapt.data.format import DatasetError, DemoWriter, dataset_suite, env_args, read_episodes

__all__ = ["DatasetError", "DemoWriter", "dataset_suite", "env_args", "read_episodes"]
