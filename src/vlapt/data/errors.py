"""The error every dataset reader and writer raises (`vlapt.data.format` for HDF5, `vlapt.data.lerobot`)."""


class DatasetError(ValueError):
    """A dataset path that cannot be written or read; the message says what to do."""
