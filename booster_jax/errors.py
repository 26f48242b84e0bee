"""One error type for bad user input, so the CLI can print it without a traceback."""


class BoosterInputError(ValueError):
    """Bad config, data, checkpoint or model files; the message names the culprit."""


def cli_main(main) -> None:
    """Run a module's ``main()`` as a command: its exit code, or bad input (a ``ValueError`` such as
    :class:`BoosterInputError`, or a missing file) as one ``error:`` line without a traceback."""
    try:
        raise SystemExit(main())
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
