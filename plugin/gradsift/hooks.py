"""Per-sample gradient norms of a model's trainable linear and embedding weights, from hooks on those layers.

For a linear layer the per-sample weight gradient is `G_i = Σ_t g_t a_tᵀ` (a: the layer's inputs, g: the gradients
at its outputs, t over sample i's positions). Its squared norm is computed either directly (materialise G_i with one
`bmm`: T·d_in·d_out work) or with the ghost identity `‖G_i‖² = Σ_t Σ_t' (a_t·a_t')(g_t·g_t')` (T²·(d_in+d_out)),
whichever is cheaper. One backward of `Σ_i L_i` per batch yields every sample's norm. Embedding layers and weights
shared between layers (tied embeddings) are handled exactly. With an anchor gradient ḡ_A, the same hooks also yield
each sample's ⟨g_i, ḡ_A⟩.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import nn

from gradsift.errors import UserError


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
