"""Generation in chunks that survive a kill: each finished chunk of answers is appended to a JSON-lines
log (flushed and fsynced) and a rerun generates only the prompts the log does not hold.

The paper's table needs seven evaluations of up to ~790k generated tokens each; without this a kill
an hour into one loses the hour. The log's first line holds the evaluation's fingerprint: a log of
another configuration is set aside, never reused. Progress (prompts done, tokens/s, ETA) is logged
after every chunk, also without a terminal.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Sequence

from booster_jax import files

log = logging.getLogger(__name__)


class GenerationLog:
    """``path``: the JSON-lines log; ``fingerprint``: what the answers depend on (model, prompts, settings)."""

    def __init__(self, path: str, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.done: dict[tuple[str, int], str] = {}
        self._read()

    def _read(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            aside = f"{self.path}.old-{int(time.time())}"
            os.replace(self.path, aside)
            log.warning("%s: generations of another configuration; set aside as %s", self.path, aside)
            return
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run: its chunk is generated again
            self.done[(row["kind"], int(row["i"]))] = row["answer"]

    def append(self, kind: str, start: int, answers: Sequence[str]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fresh = not os.path.exists(self.path)
        torn = not fresh and _ends_without_newline(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            if fresh:
                f.write(files.dumps({"fingerprint": self.fingerprint}) + "\n")
            if torn:
                f.write("\n")  # end the torn line of a killed write, so the next row stands alone
            for j, a in enumerate(answers):
                f.write(files.dumps({"kind": kind, "i": start + j, "answer": a}, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for j, a in enumerate(answers):
            self.done[(kind, start + j)] = a


def resumable_answers(kind: str, prompts: Sequence[str], generate: Callable[[list[str]], list[str]],
                      gen_log: GenerationLog, chunk: int, name: str = "", count_tokens=None) -> list[str]:
    """Answers to ``prompts`` in order; finished chunks come from ``gen_log``, the rest from ``generate``.

    ``count_tokens(answers) -> int`` (optional) gives the tokens/s in the progress line.
    """
    n = len(prompts)
    missing = [i for i in range(n) if (kind, i) not in gen_log.done]
    if n and len(missing) < n:
        log.info("evaluation %s: %s: %d of %d answers found in %s, generating the rest", name, kind,
                 n - len(missing), n, gen_log.path)
    t0, tokens, made = time.perf_counter(), 0, 0
    # contiguous runs of missing indices, cut into chunks: a chunk is the unit that is saved
    runs: list[list[int]] = []
    for i in missing:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < chunk:
            runs[-1].append(i)
        else:
            runs.append([i])
    for idx in runs:
        answers = generate([prompts[i] for i in idx])
        gen_log.append(kind, idx[0], answers)
        made += len(idx)
        tokens += count_tokens(answers) if count_tokens else 0
        elapsed = time.perf_counter() - t0
        left = len(missing) - made
        eta = elapsed / made * left
        rate = f", {tokens / elapsed:.0f} tok/s" if count_tokens and elapsed > 0 else ""
        log.info("evaluation %s: %s %d/%d prompts%s, ETA %s", name, kind, n - left, n, rate, _clock(eta))
    return [gen_log.done[(kind, i)] for i in range(n)]


def _ends_without_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
