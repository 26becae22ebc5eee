"""Running a network: the device, its precision and batched inference, in one place.

Every step that applies a network (validation while training, the test split of ``train``, ``train-npz`` and
``bench-models``, dense prediction, the evaluation windows) goes through :func:`forward` (one batch) or
:func:`predict_batches` / :func:`predict_proba` (many): no autograd, float16 autocast on CUDA only, outputs
as float32. On the CPU nothing is cast, so CPU results are those of the plain float32 network. Training
itself uses the same :func:`autocast` for its forward passes (with a gradient scaler on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from abc_pipeline.errors import InputError

Inputs = torch.Tensor | Sequence[torch.Tensor]


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(device)`` (:class:`InputError` for a
    device that is not a torch device or not present)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {device!r} is not a device ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: this torch build ({torch.__version__}) sees no CUDA GPU; use "
            "--device cpu or auto, or install a CUDA build of torch"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def autocast(device: torch.device) -> torch.autocast:
    """The precision of every forward pass: float16 autocast on CUDA, plain float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def model_inputs(x: Inputs, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch's model inputs on ``device`` as positional arguments: one tensor, or several (a dataset whose
    input is a tuple, e.g. ``(patch, expression)`` of the cell-context classifier)."""
    parts = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    return tuple(t.to(device, non_blocking=True) for t in parts)


@torch.no_grad()
def forward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], x: Inputs, device: torch.device
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(*x)`` for one batch ``x`` (a tensor or a tuple of tensors, moved to ``device``) without autograd,
    under :func:`autocast`; the output (or each of a tuple of outputs) as float32 on ``device``. ``fn``: a
    model or one of its methods (e.g. ``forward_dense``), already in eval mode on ``device``."""
    with autocast(device):
        out = fn(*model_inputs(x, device))
    return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _batches(x: torch.Tensor | Dataset, batch_size: int) -> Iterator[Inputs]:
    """The inputs of ``x`` ``batch_size`` samples at a time: slices of a tensor ``(N, ...)``, or the inputs of
    a dataset of ``(input, target)`` pairs (batched by the dataset's own ``collate`` when it has one)."""
    if isinstance(x, torch.Tensor):
        yield from x.split(batch_size)
        return
    for batch in DataLoader(x, batch_size=batch_size, collate_fn=getattr(x, "collate", None)):
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def predict_batches(
    fn: Callable[..., torch.Tensor], x: torch.Tensor | Dataset, device: torch.device, batch_size: int
) -> torch.Tensor:
    """``fn`` over the samples of ``x`` (a tensor ``(N, C, *spatial)`` or a dataset of pairs), ``batch_size``
    at a time, by :func:`forward`; its outputs concatenated, float32 on the CPU ``(N, ...)``."""
    return torch.cat([forward(fn, xb, device).cpu() for xb in _batches(x, batch_size)])


def predict_proba(
    model: nn.Module, x: torch.Tensor | Dataset, batch_size: int = 256, device: str | torch.device = "auto"
) -> torch.Tensor:
    """Softmax probabilities of ``model`` over inputs ``x`` ``(N, C, *spatial)`` (or a dataset of pairs).

    Returns float32 on the CPU: ``(N, K)`` for classifiers, ``(N, K, *spatial)`` for segmenters. Mixed
    precision on CUDA (:func:`autocast`). ``model`` is put in eval mode on the device.
    """
    device = pick_device(device)
    model.eval().to(device)
    return torch.cat([torch.softmax(forward(model, xb, device), dim=1).cpu() for xb in _batches(x, batch_size)])


__all__ = ["autocast", "forward", "model_inputs", "pick_device", "predict_batches", "predict_proba"]
