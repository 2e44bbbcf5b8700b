"""Physical compaction: slice inactive units out into a plain dense model with smaller layers.

The result is a copy of the model whose Linear / Conv2d / BatchNorm layers are
replaced by smaller ones (same forward code), with no mask buffers: it runs on
ordinary dense kernels, so fewer units is less time, not only fewer counted
parameters. Which units go, per unit group (`gnp.units.unit_layout`):

- a model with unit masks (CGaP): the dormant units;
- a model with connection masks only (ours): a unit with no active outgoing
  connection (it affects nothing), and a unit with no active incoming
  connection whose constant output can be folded exactly into its consumers'
  biases (a Linear consumer, or a Conv2d consumer without padding; the constant is
  leaky_relu(bias), or leaky_relu(BN(0)) in eval mode). Other input-less units stay,
  and so do those of a tied group (a residual stream: its channels are sums).

A tied group's channel goes from every writer (rows and BN channels) and every
reader (input columns) at once.

A group always keeps at least one unit. Connections left dormant inside the kept
layers stay as zeros in the dense weights. Outputs equal the masked model's (eval
mode) to float tolerance.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from gnp.masks import MASK
from gnp.models.init import LEAKY_SLOPE
from gnp.units import UNIT_MASK, unit_layout

__all__ = ["compact_model", "save_dense", "load_dense", "kept_units", "count_macs"]


def _conn_mask(m: nn.Module) -> torch.Tensor:
    mask = getattr(m, MASK, None)
    return mask if isinstance(mask, torch.Tensor) else torch.ones_like(m.weight, dtype=torch.bool)


def _constant_output(prod: nn.Module, norm: nn.Module | None) -> torch.Tensor:
    """The activation of each unit when its incoming weights are all zero (eval mode)."""
    c = prod.bias.detach() if getattr(prod, "bias", None) is not None else \
        torch.zeros(prod.weight.shape[0], device=prod.weight.device)
    if norm is not None:
        c = (c - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    return F.leaky_relu(c.detach(), LEAKY_SLOPE)


def _foldable(m: nn.Module) -> bool:
    if getattr(m, "bias", None) is None:
        return False
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.padding in (0, (0, 0)))


def kept_units(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per unit group (producer name): bool mask of the units the compact model keeps."""
    mods = dict(model.named_modules())
    keep = {}
    for prod, norm, cons, tied in unit_layout(model):
        p = mods[prod]
        n = p.weight.shape[0]
        if isinstance(getattr(p, UNIT_MASK, None), torch.Tensor):
            k = getattr(p, UNIT_MASK).clone()
        else:
            has_in = _conn_mask(p).flatten(1).any(1)
            has_out = torch.zeros(n, dtype=torch.bool, device=p.weight.device)
            for c in cons:
                cm = _conn_mask(mods[c])
                has_out |= cm.transpose(0, 1).reshape(n, -1).any(1)
            fold = not tied and all(_foldable(mods[c]) for c in cons)
            k = has_out & (has_in | (not fold))
        if not k.any():
            k[0] = True
        keep[prod] = k
    return keep


def _fold(model_mods: dict[str, nn.Module], prod: str, norm: str | None, cons: list[str],
          drop: torch.Tensor) -> None:
    """Add the constant output of the dropped input-less units into the consumers' biases
    (a consumer without a bias only ever loses units it does not read: nothing to add)."""
    p = model_mods[prod]
    const = _constant_output(p, model_mods[norm] if norm else None) * drop
    if not bool(const.any()):
        return
    for c in cons:
        m = model_mods[c]
        if m.bias is None:
            continue
        w = (m.weight.detach() * _conn_mask(m)).reshape(m.weight.shape[0], len(const), -1)
        with torch.no_grad():
            m.bias += torch.einsum("u,ouz->o", const, w)  # (O, units, columns per unit)


def _slice_layer(m: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    """A new Linear/Conv2d/BatchNorm2d holding the kept rows (outputs) and columns (inputs)."""
    w = (m.weight.detach() * _conn_mask(m)) if hasattr(m, MASK) else m.weight.detach()
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = type(m)(int(rows.sum()), eps=m.eps, momentum=m.momentum)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).data.copy_(getattr(m, name).detach()[rows])
        new.num_batches_tracked.copy_(m.num_batches_tracked)
        return new
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    bias = getattr(m, "bias", None)
    if isinstance(m, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    elif isinstance(m, nn.Conv2d):
        new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                        m.groups, bias is not None, m.padding_mode)
    else:
        raise TypeError(f"cannot compact a {type(m).__name__}")
    new = new.to(w.device, w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias.detach()[rows] if rows is not None else bias.detach())
    return new


@torch.no_grad()
def compact_model(model: nn.Module) -> nn.Module:
    """A plain dense copy of `model` (eval mode) without its inactive units and masks."""
    work = copy.deepcopy(model).eval()
    mods = dict(work.named_modules())
    layout = unit_layout(work)
    keep = kept_units(work)
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for prod, norm, cons, tied in layout:
        k = keep[prod]
        if not tied and not isinstance(getattr(mods[prod], UNIT_MASK, None), torch.Tensor):
            _fold(mods, prod, norm, cons, ~k)
        for writer, wnorm in [(prod, norm), *tied]:
            rows[writer] = k
            if wnorm:
                rows[wnorm] = k
        for c in cons:
            cols[c] = k.repeat_interleave(mods[c].weight.shape[1] // k.numel())
    for name in set(rows) | set(cols):
        work.set_submodule(name, _slice_layer(mods[name], rows.get(name), cols.get(name)))
    for m in work.modules():  # masks of layers that were not sliced
        for buf in (MASK, UNIT_MASK):
            if buf in m._buffers:
                if buf == MASK:
                    m.weight.mul_(m._buffers[buf])
                del m._buffers[buf]
    work.compact = True
    return work.eval()


def save_dense(model: nn.Module, path: str | os.PathLike) -> int:
    """Write a model's state (a compact model: plain dense tensors) as safetensors; bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(tmp), metadata={"format": "gnp.dense/1"})
    os.replace(tmp, path)
    return path.stat().st_size


def load_dense(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a compact model saved by `save_dense` into `model` (built at full width by
    `build_model` from the same spec): layers are resized to the file's shapes, masks dropped."""
    state = safetensors.torch.load_file(str(path))
    mods = dict(model.named_modules())
    for name, m in list(mods.items()):
        w = state.get(f"{name}.weight" if name else "weight")
        if w is None or not isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d)):
            continue
        if w.shape != m.weight.shape:
            rows = torch.zeros(m.weight.shape[0], dtype=torch.bool)
            rows[: w.shape[0]] = True
            cols = None
            if w.dim() > 1:
                cols = torch.zeros(m.weight.shape[1], dtype=torch.bool)
                cols[: w.shape[1]] = True
            model.set_submodule(name, _slice_layer(m, rows, cols))
    for m in model.modules():
        for buf in (MASK, UNIT_MASK):
            m._buffers.pop(buf, None)
    model.load_state_dict(state, strict=True)
    model.compact = True
    return model.eval()


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample through the Linear/Conv layers, counting only
    active weights (a masked weight costs nothing on sparse hardware; a compact model has
    no masks, so this is its dense cost): active weights x output positions per layer."""
    total, hooks = [0], []

    def hook(m, _, out):
        mask = getattr(m, MASK, None)
        active = int(mask.sum()) if isinstance(mask, torch.Tensor) else m.weight.numel()
        total[0] += active * (out[0, 0].numel() if out.dim() > 2 else 1)

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    p = next(model.parameters())
    model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    model.train(was)
    for h in hooks:
        h.remove()
    return total[0]
