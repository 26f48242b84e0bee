"""One error type for bad user input, so the CLI can print it without a traceback."""


class BoosterInputError(ValueError):
    """Bad config, data, checkpoint or model files; the message names the culprit."""
