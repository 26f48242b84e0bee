"""A plain PyTorch transcription of the official training steps, to test ours against.

``TorchReference.booster_step`` follows ``BoosterAlignmentTrainer.training_step`` of the official
code (git-disl/Booster, trainer.py) and what the Hugging Face Trainer does around it: three
forward/backward passes on a transformers model with a PEFT LoRA, the weights perturbed in place
and put back by adding the same amount back (as the official code does), the gradients summed
into ``.grad``, then ``clip_grad_norm_`` and ``torch.optim.AdamW``. ``sft_step`` is one ordinary
Trainer step. The loss is the model's own causal-LM loss with ``labels`` (-100 = ignored), a
token mean over the batch's targets.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def synthetic_batch(vocab: int, lengths, prompt_lengths, width: int | None = None, seed: int = 0) -> dict:
    """A right-padded token batch in the project's format: prompt tokens and padding carry no loss."""
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    ids = np.zeros((len(lengths), width), np.int32)  # pad id 0
    mask = np.zeros_like(ids)
    loss_mask = np.zeros((len(lengths), width), np.float32)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :n] = rng.integers(3, vocab, n)
        mask[i, :n] = 1
        loss_mask[i, p:n] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def to_torch(batch: dict) -> dict:
    """The project's batch as the Trainer's inputs: targets kept in ``labels``, the rest -100."""
    ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
    labels = ids.masked_fill(torch.as_tensor(np.asarray(batch["loss_mask"])) == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": torch.as_tensor(np.asarray(batch["attention_mask"]),
                                                                dtype=torch.long), "labels": labels}


def lora_tree_from_peft(model, num_layers: int) -> dict:
    """PEFT's ``lora_A/lora_B`` weights as our tree: ``{"layers": {block: {proj: {"a": [L,in,r], "b": [L,r,out]}}}}``.

    (PEFT stores ``[out, in]``; ours is ``[in, out]`` with the layer axis leading, as ``models.lora``.)
    """
    found: dict = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        parts = name.split(".")
        i = int(parts[parts.index("layers") + 1])
        kind = next(k for k in parts if k.startswith("lora_"))
        block, proj = parts[parts.index(kind) - 2], parts[parts.index(kind) - 1]
        key = "a" if kind == "lora_A" else "b"
        found.setdefault(block, {}).setdefault(proj, {}).setdefault(key, {})[i] = p.detach().numpy().T.copy()
    return {"layers": {block: {proj: {k: np.stack([m[i] for i in range(num_layers)]) for k, m in ab.items()}
                               for proj, ab in projs.items()} for block, projs in found.items()}}


class TorchReference:
    """The official step on a PEFT model: AdamW over the trainable (LoRA) parameters, clipping 1.0."""

    def __init__(self, model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float | None = 1.0, lam: float = 5.0, alpha: float = 0.1,
                 perturbed_term: bool = True):
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([p for _, p in self.named], lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.lam, self.alpha, self.perturbed_term = lam, alpha, perturbed_term

    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).loss

    @staticmethod
    def _norm(grads: dict) -> torch.Tensor:
        """The official ``_grad_norm``: the L2 norm of the per-tensor L2 norms (one global norm)."""
        return torch.norm(torch.stack([g.norm(p=2) for g in grads.values()]), p=2)

    def booster_backward(self, align: dict, harmful: dict) -> dict:
        """The three passes of the official ``training_step``; leaves g in ``.grad``, returns the metrics."""
        self.model.train()
        loss = self.loss(harmful)  # pass 1: h at w
        loss.backward()
        stored = {n: p.grad.detach().clone() for n, p in self.named}
        self.model.zero_grad()
        with torch.no_grad():
            harmful_grad_norm = self._norm(stored)
            norm = harmful_grad_norm + 1e-7
            for n, p in self.named:  # perturb: w' = w - alpha * g1 / (||g1|| + 1e-7)
                p.data -= self.alpha * stored[n] / norm
        loss2 = self.loss(harmful)  # pass 2: h at w', same batch
        loss2.backward()
        perturb = {n: p.grad.detach().clone() for n, p in self.named}
        self.model.zero_grad()
        with torch.no_grad():
            for n, p in self.named:  # recover w the way the official code does
                p.data += self.alpha * stored[n] / norm
        loss3 = self.loss(align)  # pass 3: f at w
        loss3.backward()
        for n, p in self.named:
            if self.perturbed_term:
                p.grad.data = p.grad.data + self.lam * stored[n] - self.lam * perturb[n]
            else:
                p.grad.data = p.grad.data + self.lam * stored[n]
        return {"loss": loss3.item(), "harmful_loss": loss.item(), "harmful_loss_perturbed": loss2.item(),
                "harmful_grad_norm": harmful_grad_norm.item()}

    def _optimizer_step(self) -> float:
        params = [p for _, p in self.named]
        if self.max_grad_norm:
            total = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            total = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        self.optimizer.step()
        self.model.zero_grad()
        return float(total)

    def booster_step(self, align: dict, harmful: dict) -> dict:
        metrics = self.booster_backward(align, harmful)
        metrics["grad_norm"] = self._optimizer_step()
        return metrics

    def sft_step(self, batch: dict) -> dict:
        self.model.train()
        loss = self.loss(batch)
        loss.backward()
        return {"loss": loss.item(), "grad_norm": self._optimizer_step()}
