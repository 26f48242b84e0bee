"""PyTorch transcriptions of the official Vaccine, Booster + Vaccine, RepNoise and Lisa steps, to test ours against.

Written from git-disl/Booster (trainer.py: ``BaseTrainer``, ``BoosterAlignmentTrainer`` with
``perturb_aware``, ``RepNoiseTrainer``, ``ADMMTrainer``; loss_func/repnoise_loss.py) on a
transformers model with a PEFT LoRA, around the Hugging Face Trainer's step (``TorchReference``:
``clip_grad_norm_`` then ``torch.optim.AdamW``). Vaccine uses the official mechanism itself: an
old-style module backward hook on every ``LlamaAttention`` records ``grad_output[0]``, and a forward
hook rewrites ``output[0].data``. RepNoise takes its Gaussian draw as an argument (the official code
calls ``torch.randn_like``) so both sides use the same numbers; its ``.to(torch.bfloat16)`` of the
hidden states is left out (a no-op in the official bf16 runs; these tests run float32), while the
bfloat16 mask, which rounds the harmful targets, is kept.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.torch_reference import TorchReference


def attention_modules(model) -> list:
    """The official ``get_leaf_modules_with_grad``: every attention module, in layer order."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    return [m for _, m in model.named_modules() if isinstance(m, LlamaAttention)]


class MethodsReference(TorchReference):
    """The official steps; each leaves the update in ``.grad`` and then steps the optimizer like the Trainer."""

    def __init__(self, model, rho: float = 2.0, **kw):
        super().__init__(model, **kw)
        self.rho = rho

    # ------------------------------------------------------------------ Vaccine (BaseTrainer hooks)

    def _pre_first_step(self, state):
        def track(module, grad_input, grad_output):
            state["gradient"][module] = grad_output[0].detach().clone()  # / gradient_accumulation_steps (1)

        for layer in attention_modules(self.model):
            state["gradient"][layer] = 0
            state["hooks"].append(layer.register_backward_hook(track))

    def _after_first_step(self, state):
        for h in state["hooks"]:
            h.remove()
        state["hooks"] = []
        norm = self._norm(state["gradient"])
        for module in state["gradient"]:
            state["gradient"][module] = (state["gradient"][module] * (self.rho / (norm + 1e-7))).detach().clone()
        return norm

    def _pre_second_step(self, state):
        def perturb(module, inputs, output):
            output[0].data = output[0] + state["gradient"][module]
            return output

        for layer in attention_modules(self.model):
            state["hooks"].append(layer.register_forward_hook(perturb))

    def _after_second_step(self, state):
        for h in state["hooks"]:
            h.remove()
        state["hooks"] = []

    def vaccine_backward(self, batch: dict) -> dict:
        """``BaseTrainer.training_step``: two passes on the same batch; the second's gradient stays in ``.grad``."""
        self.model.train()
        state = {"hooks": [], "gradient": {}}
        self._pre_first_step(state)
        loss1 = self.loss(batch)
        loss1.backward()
        attn_norm = self._after_first_step(state)
        self.model.zero_grad()
        self._pre_second_step(state)
        loss2 = self.loss(batch)
        loss2.backward()
        self._after_second_step(state)
        return {"loss": loss2.item(), "loss_unperturbed": loss1.item(), "attn_grad_norm": float(attn_norm)}

    def vaccine_step(self, batch: dict) -> dict:
        metrics = self.vaccine_backward(batch)
        metrics["grad_norm"] = self._optimizer_step()
        return metrics

    # ---------------------------------------------- Booster + Vaccine (perturb_aware == "True")

    def booster_vaccine_step(self, align: dict, harmful: dict) -> dict:
        self.model.train()
        loss = self.loss(harmful)
        loss.backward()
        stored = {n: p.grad.detach().clone() for n, p in self.named}
        self.model.zero_grad()
        with torch.no_grad():
            harmful_grad_norm = self._norm(stored)
            norm = harmful_grad_norm + 1e-7
            for n, p in self.named:
                p.data -= self.alpha * stored[n] / norm
        loss2 = self.loss(harmful)
        loss2.backward()
        perturb = {n: p.grad.clone() for n, p in self.named}
        self.model.zero_grad()
        with torch.no_grad():
            for n, p in self.named:
                p.data += self.alpha * stored[n] / norm
        state = {"hooks": [], "gradient": {}}
        self._pre_first_step(state)
        loss4 = self.loss(align)
        loss4.backward()
        attn_norm = self._after_first_step(state)
        self.model.zero_grad()
        self._pre_second_step(state)
        loss3 = self.loss(align)
        loss3.backward()
        self._after_second_step(state)
        for n, p in self.named:
            p.grad.data = p.grad.data + self.lam * stored[n] - self.lam * perturb[n]
        metrics = {"loss": loss3.item(), "loss_unperturbed": loss4.item(), "attn_grad_norm": float(attn_norm),
                   "harmful_loss": loss.item(), "harmful_loss_perturbed": loss2.item(),
                   "harmful_grad_norm": harmful_grad_norm.item()}
        metrics["grad_norm"] = self._optimizer_step()
        return metrics

    # ------------------------------------------------------------------------------- RepNoise

    def repnoise_step(self, harmful: dict, harmless: dict, noise: list, alpha: float, beta: float) -> dict:
        """``RepNoiseTrainer.training_step``: one backward of ``rep_noise_loss(model, harmful, harmless, beta, alpha)``."""
        self.model.train()
        loss, parts = rep_noise_loss(self.model, harmful, harmless, noise, beta=beta, alpha=alpha)
        loss.backward()
        metrics = {"loss": loss.item(), **parts}
        metrics["grad_norm"] = self._optimizer_step()
        return metrics


# ------------------------------------------------------------------------------ repnoise_loss.py

class MMDLoss(nn.Module):
    """The official ``MMD_loss`` (kernel_mul 2, kernel_num 5, bandwidth from the data, no gradient)."""

    def __init__(self, kernel_mul=2.0, kernel_num=5):
        super().__init__()
        self.kernel_mul, self.kernel_num = kernel_mul, kernel_num

    def kernel(self, source, target):
        n = int(source.size(0)) + int(target.size(0))
        total = torch.cat([source, target], dim=0)
        total0 = total.unsqueeze(0).expand(n, n, total.size(1))
        total1 = total.unsqueeze(1).expand(n, n, total.size(1))
        l2 = ((total0 - total1) ** 2).sum(2)
        bandwidth = torch.sum(l2.data) / (n ** 2 - n)
        bandwidth /= self.kernel_mul ** (self.kernel_num // 2)
        return sum(torch.exp(-l2 / (bandwidth * self.kernel_mul ** i)) for i in range(self.kernel_num))

    def forward(self, source, target):
        b = int(source.size(0))
        k = self.kernel(source, target)
        return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def masked_token_ce_loss(logits, labels, mask):
    """The official function, line for line (its ``DEVICE`` moves dropped)."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    shift_logit_mask = mask[..., :-1].contiguous()
    expanded_mask = shift_logit_mask.unsqueeze(-1).expand(-1, -1, shift_logits.size(-1))
    shift_label_mask = mask[..., 1:].contiguous()
    shift_logits = shift_logits * expanded_mask
    shift_labels = shift_labels * shift_label_mask
    shift_labels[shift_labels == 0] = -100
    shift_labels = shift_labels.type(torch.LongTensor)
    return torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


def adapt_dimension_b2a(a, b):
    """The official zero-pad / truncate of b to a's shape."""
    import torch.nn.functional as F

    b = b.clone()
    if b.shape[0] < a.shape[0]:
        b = F.pad(b, (0, 0, 0, a.shape[0] - b.shape[0]), mode="constant", value=0)
    elif b.shape[0] > a.shape[0]:
        b = b[:a.shape[0], :]
    if b.shape[1] < a.shape[1]:
        b = F.pad(b, (0, a.shape[1] - b.shape[1]), mode="constant", value=0)
    elif b.shape[1] > a.shape[1]:
        b = b[:, :a.shape[1]]
    return b


def rep_noise_loss(model, harmful_batch, harmless_batch, noise, beta=0.001, alpha=1.0):
    """The official ``rep_noise_loss`` with ``torch.randn_like`` replaced by ``noise[i]`` -> (loss, parts)."""
    mmd_loss = MMDLoss()
    layers = model.base_model.model.model.layers
    activations, hooks = {}, []
    for i, layer in enumerate(layers):  # the official hook reads `layers.{i}.mlp` outputs
        hooks.append(layer.mlp.register_forward_hook(lambda m, _, out, i=i: activations.__setitem__(i, out)))
    harmful_outputs = model(harmful_batch["input_ids"], attention_mask=harmful_batch["attention_mask"],
                            output_hidden_states=True)
    harmful_activations = [activations[i] for i in range(len(layers))]
    harmless_adapted = adapt_dimension_b2a(harmful_batch["input_ids"], harmless_batch["input_ids"])
    mask = ~torch.eq(harmful_batch["input_ids"], harmless_adapted)
    noise_loss = 0
    for i, hidden in enumerate(harmful_activations):
        hiddens_mask = mask.unsqueeze(-1).expand(hidden.size())
        hiddens = hidden * hiddens_mask
        gaussian = noise[i] * hiddens_mask
        noise_loss += mmd_loss(hiddens.view(hiddens.size(0), -1), gaussian.view(gaussian.size(0), -1))
    noise_loss /= len(harmful_activations)
    mask = mask.to(torch.bfloat16)
    harmful_outputs_loss = masked_token_ce_loss(harmful_outputs.logits, harmful_batch["input_ids"], mask)
    for h in hooks:
        h.remove()
    output_embeddings = model.get_output_embeddings()
    norm = model.base_model.model.model.norm
    harmful_losses = harmful_outputs_loss
    harmful_ce = harmful_outputs_loss.item()
    for h in harmful_outputs.hidden_states:
        out = output_embeddings(norm(h))
        harmful_losses = harmful_losses + masked_token_ce_loss(out, harmful_batch["input_ids"], mask)
    harmful_losses = harmful_losses / len(harmful_outputs.hidden_states) + 1
    harmful_adapted = adapt_dimension_b2a(harmless_batch["input_ids"], harmful_batch["input_ids"])
    mask = ~torch.eq(harmless_batch["input_ids"], harmful_adapted)
    harmless_outputs = model(harmless_batch["input_ids"], attention_mask=harmless_batch["attention_mask"])
    harmless_losses = masked_token_ce_loss(harmless_outputs.logits, harmless_batch["input_ids"], mask)
    loss = harmless_losses + beta * noise_loss - alpha * torch.log(harmful_losses)
    return loss, {"align_loss": harmless_losses.item(), "harmful_loss": harmful_ce,
                  "harmful_losses": harmful_losses.item(), "noise_loss": noise_loss.item()}


def official_batch(batch: dict, pad_id: int) -> dict:
    """Our bucketed batch as the official collator makes it: padded to the longest row, no filler rows."""
    att = np.asarray(batch["attention_mask"])
    rows = att.any(axis=1)
    width = int(att.sum(axis=1).max())
    ids = torch.as_tensor(np.asarray(batch["input_ids"])[rows, :width], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": ids.ne(pad_id)}


# ---------------------------------------------------------------------------------------- Lisa

class LisaReference(TorchReference):
    """``ADMMTrainer``: ``init``, ``check_mode``, ``switch_model``, ``training_step``. The user batch is
    ``inputs``; ``alignment_batch(steps)`` stands for ``sample_from_alignment()`` (which batch comes
    next is the data order, not the method)."""

    def __init__(self, model, rho: float, alignment_step: int, finetune_step: int, total_steps: int,
                 alignment_batch, **kw):
        super().__init__(model, **kw)
        self.rho, self.alignment_step, self.finetune_step = rho, alignment_step, finetune_step
        self.total_steps = total_steps  # len(get_train_dataloader()) * num_train_epochs
        self.status = "alignment" if alignment_step != 0 else "finetune"  # guide_data_num > 0
        self.alignment_weights = {n: p.data.detach().clone() for n, p in self.named}
        self.finetune_weights = {n: p.data.detach().clone() for n, p in self.named}
        self.clock = self.steps = 0
        self.alignment_batch = alignment_batch

    def switch_model(self):
        store = self.finetune_weights if self.status == "alignment" else self.alignment_weights
        for n, p in self.named:
            store[n] = p.data.detach().clone()

    def check_mode(self, inputs):
        if self.status == "alignment":
            if self.clock % self.alignment_step == 0 and self.steps != 0 and self.finetune_step != 0:
                self.status = "finetune"
                self.switch_model()
                self.clock = 0
            else:
                inputs = self.alignment_batch(self.steps)
        else:
            if self.clock % self.finetune_step == 0 and self.steps != 0 and self.alignment_step != 0:
                self.status = "alignment"
                self.switch_model()
                inputs = self.alignment_batch(self.steps)
                self.clock = 0
        return inputs

    def lisa_step(self, inputs: dict) -> dict:
        inputs = self.check_mode(inputs)
        self.model.train()
        loss = self.loss(inputs)
        lm = loss.item()
        if self.steps > 0.1 * self.total_steps and self.rho > 0:
            anchor = self.finetune_weights if self.status == "alignment" else self.alignment_weights
            for n, p in self.named:
                loss = loss + self.rho / 2 * torch.norm(p - anchor[n]) ** 2
        loss.backward()
        self.steps += 1
        self.clock += 1
        return {"loss": loss.item(), "lm_loss": lm, "phase": float(self.status == "alignment"),
                "grad_norm": self._optimizer_step()}
