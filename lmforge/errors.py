"""User-facing errors: the CLI prints their message without a traceback."""


class LmforgeError(Exception):
    """A problem with the user's input, files or configuration, stated in one clear message."""


class ConfigError(LmforgeError):
    """An invalid configuration value, unknown key or unsupported model family."""


class CorpusError(LmforgeError):
    """A missing, empty, undecodable or malformed corpus."""


class CheckpointError(LmforgeError):
    """A missing, truncated, corrupt or foreign checkpoint or tokenizer file."""
