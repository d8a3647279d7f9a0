"""Per-sample loss and gradient L2 norm of every row, batched, from hooks on the trainable linear layers.

For a linear layer the per-sample weight gradient is `G_i = Σ_t g_t a_tᵀ` (a: the layer's inputs, g: the gradients
at its outputs, t over sample i's positions). Its squared norm is computed either directly (materialise G_i with one
`bmm`: T·d_in·d_out work) or with the ghost identity `‖G_i‖² = Σ_t Σ_t' (a_t·a_t')(g_t·g_t')` (T²·(d_in+d_out)),
whichever is cheaper. One backward of `Σ_i L_i` per batch yields every sample's norm. Embedding layers and weights
shared between layers (tied embeddings) are handled exactly. The batch-size-1 `loop` is the reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gradsift.config import ScoringConfig
from gradsift.data import IGNORE_INDEX, TokenizedRow, collate, make_batches
from gradsift.errors import UserError
from gradsift.table import STATUS_NONFINITE, STATUS_OK, ScoreTable, row_status

logger = logging.getLogger(__name__)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each row's mean cross-entropy over its response tokens, and its response-token count.

    `logits` cover every position; only response positions are cast to float32, so no full-vocabulary copy of the
    batch is made.
    """
    return _loss_at(logits[:, :-1], labels[:, 1:])


class GradNormHooks:
    """Hooks that measure each sample's gradient norm over a model's trainable linear and embedding weights.

    Use `with GradNormHooks(model) as hooks:`, then for each batch `hooks.start(attention_mask)`, run the forward,
    `hooks.stop_recording()`, run one backward of the summed per-sample losses, and read `hooks.finish()`.
    """

    def __init__(
        self,
        model: nn.Module,
        norm_method: str = "auto",
        keep_grads: bool = False,
        anchor: dict[int, torch.Tensor] | None = None,
    ):
        self.model = model
        # ḡ_A per trainable parameter (keyed by `id(param)`): with it, `finish` also yields each row's ⟨g_i, ḡ_A⟩.
        self.anchor = anchor
        self.norm_method = norm_method
        self.keep_grads = keep_grads
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError(
                "The model has no trainable parameters, so there is no gradient to measure. Pass a PeftModel with a "
                "trainable adapter (`is_trainable=True`), a plain model (scored under a fresh LoRA), or set "
                "`scoring.param_scope: all`."
            )
        self.modules: list[nn.Module] = []
        owners: dict[int, int] = defaultdict(int)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and any(
                p.requires_grad for p in module.parameters(False)
            ):
                self.modules.append(module)
                for param in module.parameters(recurse=False):
                    owners[id(param)] += 1
        names = {id(p): name for name, p in model.named_parameters()}
        self.embedding_scales = {
            id(m): _embedding_scale(model, m) for m in self.modules if isinstance(m, nn.Embedding)
        }
        self.checked_embeddings: set[int] = set()
        uncovered = [names.get(id(p), "?") for p in self.params if id(p) not in owners]
        if uncovered:
            raise UserError(
                "Per-sample gradients are measured on linear and embedding layers, but these trainable parameters "
                f"are elsewhere: {', '.join(uncovered[:8])}{' …' if len(uncovered) > 8 else ''}. Use a plain LoRA "
                "(no modules_to_save, DoRA or embedding LoRA), `scoring.param_scope: all`, or `scoring.method: loop`."
            )
        self.shared = {key for key, count in owners.items() if count > 1}
        if anchor is not None and any(id(p) not in anchor for p in self.params):
            raise RuntimeError("The anchor gradient was taken on other trainable parameters than this model's.")
        if keep_grads:
            embeddings = [m for m in self.modules if isinstance(m, nn.Embedding)]
            kept_out = [names.get(id(p), "?") for p in self.params if id(p) in self.shared]
            kept_out += [names.get(id(p), "?") for m in embeddings for p in m.parameters(False) if p.requires_grad]
            if kept_out:
                raise UserError(
                    "Per-sample gradients are kept only for linear weights used once per forward, but these "
                    f"trainable parameters are shared or embeddings: {', '.join(kept_out[:8])}. Use "
                    "`online.update: recompute`."
                )
        self.grads: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.recording = False
        # Padding positions get exactly zero output gradients (no loss reads them, and with right padding no real
        # position attends to them), so their terms vanish unmasked. Masking costs two copies per layer; it is
        # switched on only to re-score a batch whose norms came out non-finite (a NaN or inf in padding).
        self.masked = False

    def __enter__(self) -> GradNormHooks:
        for module in self.modules:
            self.handles.append(module.register_forward_hook(self._on_forward))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.recording = False

    def start(self, attention_mask: torch.Tensor, logit_positions: torch.Tensor | None = None) -> None:
        """Begin a batch: positions where `attention_mask` is 0 (padding) contribute nothing.

        `logit_positions` are the positions the LM head is applied to when the forward keeps only some logits.
        """
        self.mask = attention_mask.bool()
        self.logit_positions = logit_positions
        self.sq_norms = torch.zeros(self.mask.shape[0], dtype=torch.float64, device=self.mask.device)
        self.dots = torch.zeros_like(self.sq_norms)
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.called: set[int] = set()
        self.grads = {}
        self.recording = True

    def stop_recording(self) -> None:
        """End the forward pass; forwards re-run by gradient checkpointing during the backward are not recorded."""
        self.recording = False

    def finish(self) -> torch.Tensor:
        """Return the batch's per-sample gradient norms (float64), once the backward has run.

        With an anchor, `self.dots` then holds each row's ⟨g_i, ḡ_A⟩ (float64).
        """
        with torch.no_grad(), torch.autocast(device_type=self.sq_norms.device.type, enabled=False):
            self._finish_shared()
        self.pending = defaultdict(list)
        return self.sq_norms.sqrt()

    def _finish_shared(self) -> None:
        for key, contributions in self.pending.items():
            total = torch.zeros_like(self.sq_norms)
            for u1, v1 in contributions:
                for u2, v2 in contributions:
                    total += (_gram(u1, u2) * _gram(v1, v2)).sum(dim=(1, 2)).double()
            self.sq_norms += total
            anchor = self._anchor_of(key)
            if anchor is not None:  # the inner product is linear: each use of the weight adds its own term
                for u, v in contributions:
                    self.dots += _factor_dot(u, v, anchor)

    def _anchor_of(self, key: int) -> torch.Tensor | None:
        return None if self.anchor is None else self.anchor.get(key)

    def take_grads(self) -> dict[int, torch.Tensor]:
        """Return the last batch's per-sample gradients (float32, `[batch, *param.shape]`, keyed by `id(param)`) of
        the per-sample losses, and forget them. Needs `keep_grads=True`."""
        grads, self.grads = self.grads, {}
        return grads

    def _on_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self.recording or not output.requires_grad:
            return
        if id(module) in self.called:
            # Two calls add two terms to one per-sample gradient; their cross term would be lost.
            raise UserError(
                f"{type(module).__name__} is called more than once per forward pass, which batched per-sample "
                "norms do not support. Use `scoring.method: loop`."
            )
        self.called.add(id(module))
        if isinstance(module, nn.Embedding) and id(module) not in self.checked_embeddings:
            self._check_embedding_output(module, args[0], output)
        handler = self._on_linear_grad if isinstance(module, nn.Linear) else self._on_embedding_grad
        output.register_hook(partial(_without_autocast, handler, module, args[0]))

    def _check_embedding_output(self, module: nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> None:
        """Once per layer: its output must be its looked-up rows times its scale, as `_on_embedding_grad` assumes."""
        with torch.no_grad():
            rows = nn.functional.embedding(ids, module.weight, module.padding_idx)
            expected = (rows.float() * self.embedding_scales[id(module)]).to(output.dtype)
        rtol = 2 * torch.finfo(output.dtype).eps  # one rounding apart at most
        if expected.shape != output.shape or not torch.allclose(expected, output, rtol=rtol, atol=0):
            raise UserError(_unsupported_embedding(self.model, module))
        self.checked_embeddings.add(id(module))

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The padding mask matching a layer's input: all positions, or only the kept logit positions."""
        batch, width = self.mask.shape
        positions = self.logit_positions
        if x.dim() == 3 and x.shape[1] != width and positions is not None and x.shape[1] == positions.numel():
            return self.mask[:, positions]
        return self.mask

    def _batched(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.shape[:2] != mask.shape:
            x = x.reshape(*mask.shape, x.shape[-1])
        return x

    def _on_linear_grad(self, module: nn.Linear, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        row_mask = self._mask_for(inputs)
        a, g = self._batched(inputs.detach(), row_mask), self._batched(grad, row_mask)
        if self.masked:
            # torch.where, not a product: a NaN or inf at a padding position must not reach the sample's sum.
            mask = row_mask[..., None]
            a, g = torch.where(mask, a, 0), torch.where(mask, g, 0)
        if a.dtype != g.dtype or a.dtype == torch.float16:  # float16 products could overflow
            a, g = a.float(), g.float()
        # Under bf16 autocast a and g are bf16 values already: their products run in bf16 with float32 accumulation
        # (as the training step's own weight gradient does), and only the small results are cast to float32.
        if module.weight.requires_grad:
            anchor = self._anchor_of(id(module.weight))
            if id(module.weight) in self.shared:
                self.pending[id(module.weight)].append((g.float(), a.float()))
            elif self.keep_grads:  # materialise G_i: the direct computation, kept for the update
                per_sample = torch.bmm(g.transpose(1, 2), a).float()
                self.sq_norms += per_sample.pow(2).sum(dim=(1, 2)).double()
                self.grads[id(module.weight)] = per_sample
                if anchor is not None:
                    self.dots += (per_sample * anchor).sum(dim=(1, 2)).double()
            else:
                self.sq_norms += self._outer_sq_norm(g, a)
                if anchor is not None:  # ⟨Σ_t g_t a_tᵀ, Ḡ⟩ = Σ_t g_t·(Ḡ a_t): one matmul, whichever norm path ran
                    self.dots += _factor_dot(g, a, anchor)
        if module.bias is not None and module.bias.requires_grad:
            per_sample = g.float().sum(dim=1)
            self.sq_norms += per_sample.pow(2).sum(dim=1).double()
            if self.keep_grads:
                self.grads[id(module.bias)] = per_sample
            anchor = self._anchor_of(id(module.bias))
            if anchor is not None:
                self.dots += (per_sample @ anchor).double()

    def _on_embedding_grad(self, module: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor) -> None:
        mask = self.mask
        if module.padding_idx is not None:  # PyTorch never updates the padding row
            mask = mask & (ids != module.padding_idx)
        # The gradient of the looked-up rows: the output's gradient times the layer's scale (Gemma's √hidden).
        g = torch.where(mask[..., None], grad, 0).float() * self.embedding_scales[id(module)]
        if id(module.weight) in self.shared:
            self.pending[id(module.weight)].append((ids, g))
            return
        # Each sample's gradient row for token v is the sum of g over its positions holding v.
        batch, width = ids.shape
        keys = (torch.arange(batch, device=ids.device)[:, None] * module.num_embeddings + ids).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(len(unique), g.shape[-1], dtype=g.dtype, device=g.device)
        rows.index_add_(0, inverse, g.reshape(batch * width, -1))
        sample = torch.div(unique, module.num_embeddings, rounding_mode="floor")
        self.sq_norms.index_add_(0, sample, rows.pow(2).sum(dim=1).double())
        anchor = self._anchor_of(id(module.weight))
        if anchor is not None:
            token = unique - sample * module.num_embeddings
            self.dots.index_add_(0, sample, (rows * anchor[token]).sum(dim=1).double())

    def _outer_sq_norm(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """‖Σ_t g_t a_tᵀ‖² per sample, by the cheaper of the direct and the ghost computation."""
        width, d_out, d_in = g.shape[1], g.shape[2], a.shape[2]
        ghost = self.norm_method == "ghost" or (self.norm_method == "auto" and width * (d_in + d_out) < d_in * d_out)
        if ghost:
            products = torch.bmm(a, a.transpose(1, 2)).float() * torch.bmm(g, g.transpose(1, 2)).float()
            return products.sum(dim=(1, 2)).double()
        return torch.bmm(g.transpose(1, 2), a).float().pow(2).sum(dim=(1, 2)).double()


def _embedding_scale(model: nn.Module, module: nn.Embedding) -> Any:
    """The factor between an embedding layer's output and its looked-up rows: 1, or Gemma's `embed_scale` (√hidden)."""
    if type(module).forward is nn.Embedding.forward:
        return torch.ones((), device=module.weight.device)
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        raise UserError(_unsupported_embedding(model, module))
    # In the weight's dtype first, as Gemma's forward multiplies (√3072 rounds to 55.5 in bfloat16).
    return torch.as_tensor(scale).detach().to(module.weight.dtype).float().to(module.weight.device)


def _unsupported_embedding(model: nn.Module, module: nn.Module) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        f"{type(inner).__name__}'s embedding layer {type(module).__name__} transforms its looked-up rows, so batched "
        "per-sample norms cannot measure its weight. Use `scoring.param_scope: lora` or `scoring.method: loop`."
    )


def _without_autocast(handler: Any, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> None:
    """Run a gradient hook in float32 even when the backward runs under a trainer's autocast."""
    with torch.autocast(device_type=grad.device.type, enabled=False):
        handler(module, inputs, grad)


def _factor_dot(u: torch.Tensor, v: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Per-sample ⟨Σ_t u_t v_tᵀ, Ḡ⟩ = Σ_t u_t·(Ḡ v_t) (float64), u dense [B, T, d_out] or token ids [B, T]."""
    if u.dim() == 2:  # an embedding: u_t is one-hot, so u_tᵀ Ḡ is Ḡ's row for the token
        return (anchor[u] * v.float()).sum(dim=(1, 2)).double()
    if anchor.shape[0] > anchor.shape[1]:  # project the narrower side: the same products, a smaller temporary
        return (torch.matmul(u.float(), anchor) * v.float()).sum(dim=(1, 2)).double()
    projected = torch.matmul(v.float(), anchor.t())  # [B, T, d_out]; the anchor is kept in float32
    return (projected * u.float()).sum(dim=(1, 2)).double()


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample Gram matrix [B, T, S] of two factors, each dense [B, T, d] or token ids [B, T] (one-hot rows)."""
    x_ids, y_ids = x.dim() == 2, y.dim() == 2
    if x_ids and y_ids:
        return (x[:, :, None] == y[:, None, :]).float()
    if x_ids:
        return _gram(y, x).transpose(1, 2)
    if y_ids:
        return x.gather(2, y[:, None, :].expand(-1, x.shape[1], -1))
    return torch.bmm(x, y.transpose(1, 2))


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Run with every dropout off, yet keep gradient checkpointing where the model has it; restore every flag after.

    A user's model may carry dropout (a PeftModel's `lora_dropout`, attention dropout), and transformers checkpoints a
    layer only when it is in train mode (`GradientCheckpointingLayer`: `gradient_checkpointing and training`). So the
    whole model goes to eval mode, and only the checkpointed layers are flagged as training, for their `__call__` to
    choose checkpointing; their forward, and its recomputation in the backward, run with `training` off again.
    """
    flags = {module: module.training for module in model.modules()}
    model.eval()
    for module in model.modules():
        if _is_bnb_4bit(module):
            # In eval mode on a CPU, bitsandbytes repacks 4-bit weights for a bfloat16 inference kernel, which computes
            # other numbers than training does and fails on biased layers; its flag changes nothing else.
            module.training = True
    layers = _checkpointed_layers(model)
    if not layers and getattr(model, "is_gradient_checkpointing", False):
        logger.warning(
            "gradsift: this model checkpoints outside transformers' GradientCheckpointingLayer (old-style or remote "
            "code); scoring runs it in eval mode, without gradient checkpointing, so that dropout is off."
        )
    checkpoints = {layer: layer._gradient_checkpointing_func for layer in layers}
    for layer, checkpoint in checkpoints.items():
        layer.training = True
        layer._gradient_checkpointing_func = partial(_checkpoint_in_eval, layer, checkpoint)
    try:
        yield
    finally:
        for layer, checkpoint in checkpoints.items():
            layer._gradient_checkpointing_func = checkpoint
        _restore_training_flags(flags)


def _is_bnb_4bit(module: nn.Module) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # a transformers without per-layer checkpointing
        return []
    return [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer)
        and module.gradient_checkpointing
        and "_gradient_checkpointing_func" in vars(module)
    ]


def _checkpoint_in_eval(layer: nn.Module, checkpoint: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Checkpoint `function` (the layer's forward) with the layer's own `training` flag off whenever it runs."""
    return checkpoint(partial(_run_in_eval, layer, function), *args, **kwargs)


def _run_in_eval(layer: nn.Module, function: Any, *args: Any, **kwargs: Any) -> Any:
    # Some layers apply dropout in their own forward (`dropout(x, p, training=self.training)`, as Falcon's does).
    was_training = layer.training
    layer.training = False
    try:
        return function(*args, **kwargs)
    finally:
        layer.training = was_training


def _restore_training_flags(flags: dict[nn.Module, bool]) -> None:
    for module, training in flags.items():
        module.training = training


def compute_autocast(config: ScoringConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when `scoring.dtype` resolves to bfloat16 (the default on a CUDA GPU), else nothing.

    A QLoRA model keeps its norms, embeddings and head in float32 (`prepare_model_for_kbit_training`), and trainers
    run it under autocast (`bf16: true`); scoring does the same, so its numerics and speed are the training step's.
    Per-sample norms are still computed in float32 by the hooks.
    """
    from gradsift.models import resolve_dtype

    if resolve_dtype(config, device.type) is not torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def score_batch(
    model: nn.Module, hooks: GradNormHooks, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-sample losses and gradient norms of one padded batch, with one forward and one backward.

    The LM head is applied only where a row has a response token to predict. When it is frozen (LoRA), the decoder's
    hidden states at exactly those tokens go through a fused head-and-cross-entropy in chunks (`FrozenHeadLoss`): no
    full-vocabulary logits are kept, and the head costs two matmuls over response tokens, as TRL's `chunked_nll`.
    Otherwise the model is asked for logits at the union of response positions (`logits_to_keep`).
    """
    losses, total, finite = _batch_losses(model, batch, hooks)
    if total.requires_grad and bool(finite.any()):
        torch.autograd.grad(total, hooks.params, allow_unused=True)
    norms = hooks.finish()
    if not hooks.masked and bool((finite & ~torch.isfinite(norms)).any()):
        # A finite loss with a non-finite norm: a NaN or inf sits in some row's padding. Redo with padding masked.
        hooks.masked = True
        try:
            return score_batch(model, hooks, batch)
        finally:
            hooks.masked = False
    return losses.detach(), norms


def _batch_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], hooks: GradNormHooks | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward: per-row mean response-token losses, their sum over the finite rows (what the backward takes) and
    the mask of those rows. With `hooks`, they record the forward."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    head = _frozen_head(model, batch)
    positions = None if head is not None else (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if hooks is not None:
        hooks.start(batch["attention_mask"], logit_positions=positions)
    try:
        if head is not None:
            losses, counts = _frozen_head_losses(head, batch, targets)
        else:
            logits = _forward_logits(model, batch, positions)
    finally:
        if hooks is not None:
            hooks.stop_recording()
    if head is None:
        if logits.shape[1] == positions.numel():
            losses, counts = _loss_at(logits, targets[:, positions])
        else:  # the model ignored logits_to_keep and returned every position
            losses, counts = per_sample_loss(logits, labels)
    finite = torch.isfinite(losses) & (counts > 0)
    # Non-finite rows are left out of the sum, so their NaN cannot reach the other rows' gradients.
    total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
    return losses, total, finite


class FrozenHeadLoss(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T (+ bias)` for a frozen head, in chunks of tokens.

    The forward computes each chunk's logits once, its loss and `∂loss/∂hidden = (softmax − onehot) @ weight`, and
    keeps only that `[tokens, hidden]` gradient: peak memory is one chunk of logits, and the backward is a scaling.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):  # type: ignore[override]
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            logits = nn.functional.linear(hidden[start:end], weight, bias).float()
            log_z = torch.logsumexp(logits, dim=-1)
            target = targets[start:end]
            losses[start:end] = log_z - logits.gather(1, target[:, None]).squeeze(1)
            if grad_hidden is not None:
                probs = logits.sub_(log_z[:, None]).exp_()
                probs[torch.arange(len(target), device=probs.device), target] -= 1
                grad_hidden[start:end] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None


# Tokens per chunk of `FrozenHeadLoss`: about 256 MiB of float32 logits whatever the vocabulary.
HEAD_CHUNK_ELEMENTS = 2**26


def _frozen_head(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder and a frozen plain linear head whose output is the model's logits, or None.

    Checked once per model: a model whose config post-processes its logits (Gemma's softcapping, Cohere's and Granite's
    scaling) keeps the `logits_to_keep` path, and so does any other whose logits differ from the head's on a few tokens
    of a real batch, in eval mode (a cap barely moves small logits, so the config is read first).
    """
    cached = getattr(model, "_gradsift_frozen_head", None)
    if cached is not None:
        return cached or None
    found: tuple[nn.Module, nn.Linear] | tuple = ()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    backbone = getattr(inner, "base_model", inner)
    if (
        type(head) is nn.Linear
        and backbone is not inner
        and not any(p.requires_grad for p in head.parameters())
        and not _logits_post_processed(getattr(inner, "config", None))
        and _head_matches(model, backbone, head, batch)
    ):
        found = (backbone, head)
    model._gradsift_frozen_head = found
    return found or None


def _logits_post_processed(config: Any) -> bool:
    """Whether a model config caps or scales the head's output (Gemma 2/3, Cohere, Granite)."""
    if getattr(config, "final_logit_softcapping", None) is not None:
        return True
    return any(getattr(config, key, None) not in (None, 1, 1.0) for key in ("logit_scale", "logits_scaling"))


def _head_matches(model: nn.Module, backbone: nn.Module, head: nn.Linear, batch: dict[str, torch.Tensor]) -> bool:
    width = int(min(8, batch["attention_mask"][0].sum()))
    inputs = {"input_ids": batch["input_ids"][:1, :width], "use_cache": False}
    try:
        with scoring_mode(model), torch.no_grad():
            logits = model(**inputs).logits[0].float()
            ours = head(backbone(**inputs).last_hidden_state[0]).float()
    except Exception as error:  # noqa: BLE001 - any failure means: use the model's own forward
        logger.debug("gradsift: the decoder-and-head path is not usable (%s)", error)
        return False
    # The same matmul on the same hidden states: equal up to rounding, whatever post-processing hides in small logits.
    return logits.shape == ours.shape and bool((logits - ours).abs().max() <= 1e-5 * (1 + logits.abs().max()))


def _frozen_head_losses(
    head: tuple[nn.Module, nn.Linear], batch: dict[str, torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    backbone, linear = head
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    selected = targets != IGNORE_INDEX
    rows, columns = selected.nonzero(as_tuple=True)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // linear.out_features)
    token_loss = FrozenHeadLoss.apply(
        hidden[:, :-1][rows, columns], linear.weight, linear.bias, targets[rows, columns], chunk
    )
    counts = selected.sum(dim=1)
    sums = torch.zeros(targets.shape[0], dtype=token_loss.dtype, device=targets.device).index_add(0, rows, token_loss)
    return sums / counts, counts


def _forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if getattr(model, "_gradsift_no_logits_to_keep", False):
        return model(**inputs).logits
    try:
        return model(**inputs, logits_to_keep=positions).logits
    except TypeError as error:  # an architecture without `logits_to_keep`
        if "logits_to_keep" not in str(error):
            raise
        model._gradsift_no_logits_to_keep = True
        return model(**inputs).logits


def _loss_at(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean cross-entropy of `logits` [B, K, V] against aligned `targets` [B, K] (-100: no loss)."""
    selected = targets != IGNORE_INDEX
    rows, columns = selected.nonzero(as_tuple=True)
    token_loss = nn.functional.cross_entropy(logits[rows, columns].float(), targets[rows, columns], reduction="none")
    counts = selected.sum(dim=1)
    sums = torch.zeros(targets.shape[0], dtype=token_loss.dtype, device=targets.device).index_add(0, rows, token_loss)
    return sums / counts, counts


def anchor_gradient(
    model: nn.Module, rows: Sequence[TokenizedRow], config: ScoringConfig, pad_token_id: int, *, progress: bool = False
) -> dict[int, torch.Tensor]:
    """ḡ_A: the mean over the anchor rows of each row's gradient g_a (of its mean response-token loss), per trainable
    parameter (float32, keyed by `id(param)`), computed the way the rows are scored (`batched` or `loop`).

    Rows without response tokens, or whose loss or gradient is not finite, are left out of the mean. A batch whose
    summed gradient is not finite (a NaN or inf from padding, or from one row) is taken again row by row.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params}
    todo = [row for row in rows if row.num_response_tokens > 0]
    count = 0
    device = _device_of(model)

    def add(grads: Sequence[torch.Tensor | None]) -> None:
        for param, grad in zip(params, grads):
            if grad is not None:
                total[id(param)] += grad.float()

    def add_rows(members: Sequence[TokenizedRow]) -> int:
        added = 0
        for row in members:
            _, grads = _row_gradient(model, row, pad_token_id)
            if grads is not None and all(g is None or bool(torch.isfinite(g).all()) for g in grads):
                add(grads)
                added += 1
        return added

    with scoring_mode(model), compute_autocast(config, device):
        if config.method == "loop":
            count = add_rows(tqdm(todo, desc="anchor gradient (loop)", unit="row", disable=not progress))
        else:
            # Only Σ_a g_a is needed, not per-row norms: one plain backward per batch, no hooks.
            lengths = [len(row.input_ids) for row in todo]
            batches = make_batches(lengths, config.max_tokens_per_batch, config.max_batch_size)
            for positions in tqdm(batches, desc="anchor gradient", unit="batch", disable=not progress):
                members = [todo[i] for i in positions]
                _, total_loss, finite = _batch_losses(model, collate(members, pad_token_id, device))
                if bool(finite.all()):
                    grads = (
                        torch.autograd.grad(total_loss, params, allow_unused=True) if total_loss.requires_grad else ()
                    )
                    if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
                        add(grads)
                        count += len(members)
                        continue
                # A row without a finite loss, or a NaN from padding: take the batch again row by row.
                count += add_rows(members)
    if count == 0:
        raise UserError(
            f"The anchor set has no row to take a gradient of ({len(rows)} rows, none with response tokens and a "
            "finite loss and gradient). Pass anchor rows with answers (e.g. harmful requests with refusals)."
        )
    return {key: grad / count for key, grad in total.items()}


def score_rows(
    model: nn.Module,
    rows: Sequence[TokenizedRow],
    config: ScoringConfig,
    pad_token_id: int,
    *,
    index: Sequence[int] | None = None,
    progress: bool = True,
    bar: Any = None,
    anchor: dict[int, torch.Tensor] | None = None,
) -> ScoreTable:
    """Score `rows` with `config.method` (`batched` hooks, or the batch-size-1 `loop` reference).

    `bar` is an outer progress bar to advance instead of opening one. With `anchor` (ḡ_A from `anchor_gradient`),
    each row's `anchor_dot` = ⟨g_i, ḡ_A⟩ and `anchor_cos` are filled in, from the same forward and backward.
    """
    table = ScoreTable.empty(rows, range(len(rows)) if index is None else index)
    todo = np.flatnonzero(table.num_response_tokens > 0)
    device = _device_of(model)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(todo), desc=f"scoring ({config.method})", unit="row", disable=not progress)
    with scoring_mode(model), compute_autocast(config, device):
        if config.method == "loop":
            for i in todo:
                scores = score_one(model, rows[i], pad_token_id, anchor)
                table.loss[i], table.grad_norm[i], table.anchor_dot[i] = scores
                bar.update(1)
        else:
            lengths = [len(rows[i].input_ids) for i in todo]
            with GradNormHooks(model, config.norm_method, anchor=anchor) as hooks:
                for batch_positions in make_batches(lengths, config.max_tokens_per_batch, config.max_batch_size):
                    members = todo[batch_positions]
                    batch = collate([rows[i] for i in members], pad_token_id, device)
                    losses, norms = score_batch(model, hooks, batch)
                    table.loss[members] = losses.double().cpu().numpy()
                    table.grad_norm[members] = norms.cpu().numpy()
                    if anchor is not None:
                        table.anchor_dot[members] = hooks.dots.cpu().numpy()
                    bar.update(len(members))
    if own_bar:
        bar.close()
    table.status = row_status(table.num_response_tokens, table.loss, table.grad_norm)
    bad = table.status == STATUS_NONFINITE
    if anchor is not None:
        table.anchor_dot, table.anchor_cos = anchor_scores(table.anchor_dot, table.grad_norm, table.status, anchor)
    if bad.any():
        logger.warning(
            "%d row(s) have a non-finite loss or gradient norm; they are marked `nonfinite`.", int(bad.sum())
        )
    return table


def anchor_scores(
    dots: np.ndarray, norms: np.ndarray, status: np.ndarray, anchor: dict[int, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """The anchor columns: `anchor_dot` = ⟨g_i, ḡ_A⟩ and `anchor_cos` = anchor_dot / (‖g_i‖·‖ḡ_A‖), both NaN for a
    row whose status is not `ok` (it has no score a rule may read)."""
    anchor_norm = math.sqrt(sum(float(grad.double().pow(2).sum()) for grad in anchor.values()))
    dots = np.where(status == STATUS_OK, dots, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return dots, dots / (norms * anchor_norm)


def _row_gradient(
    model: nn.Module, row: TokenizedRow, pad_token_id: int
) -> tuple[float, tuple[torch.Tensor | None, ...] | None]:
    """One row alone (no padding): its mean response-token loss and `torch.autograd.grad` of it over every trainable
    parameter (None if the loss is not finite)."""
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate([row], pad_token_id, _device_of(model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss = per_sample_loss(logits, batch["labels"])[0][0]
    if not torch.isfinite(loss):
        return float("nan"), None
    return float(loss.detach()), torch.autograd.grad(loss, params, allow_unused=True)


def score_one(
    model: nn.Module, row: TokenizedRow, pad_token_id: int, anchor: dict[int, torch.Tensor] | None = None
) -> tuple[float, float, float]:
    """The reference: one row alone, its loss, gradient norm and (with `anchor`) ⟨g_i, ḡ_A⟩, from autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss, grads = _row_gradient(model, row, pad_token_id)
    if grads is None:
        return loss, float("nan"), float("nan")
    sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    dot = float("nan")
    if anchor is not None:
        dot = sum(float((g.double() * anchor[id(p)].double()).sum()) for p, g in zip(params, grads) if g is not None)
    return loss, math.sqrt(sq), dot
