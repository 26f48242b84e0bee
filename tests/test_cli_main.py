"""The analysis commands' entry guard: bad input is one ``error:`` line, anything else keeps its traceback."""

import subprocess
import sys

import pytest

from booster_jax.errors import BoosterInputError, cli_main


def test_exit_code_passes_through():
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: 3)
    assert e.value.code == 3


@pytest.mark.parametrize("exc", [BoosterInputError("runs/x: no summary.json"), FileNotFoundError("labels.jsonl")])
def test_bad_input_is_one_line(exc):
    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        cli_main(main)
    assert e.value.code == f"error: {exc}"


def test_a_bug_keeps_its_traceback():
    def main():
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        cli_main(main)


def test_studies_command_on_a_missing_directory(tmp_path):
    missing = tmp_path / "no-such-study"
    r = subprocess.run([sys.executable, "-m", "booster_jax.eval.studies", str(missing)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-study" in lines[0], r.stderr
