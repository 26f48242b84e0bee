"""A stand-in ``python`` for the tests of the study's bash scripts: they call ``python``, and the stub records
the calls instead of running a model."""

import stat


def install_python_stub(tmp_path, text: str):
    """Write ``text`` as an executable ``python`` in ``tmp_path/bin``; returns that directory (put it first on
    PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(text)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return bin_dir
