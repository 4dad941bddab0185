"""The dense part of a small CTR model, and saving it with TorchScript.

`CtrDense` takes the dense features and the sum-pooled embeddings of every sparse feature
(see `inference.spec` for how the features map to embedding tables) and returns a
click probability per sample. TorchServe's stock `BaseHandler` loads TorchScript only from a
file ending in `.pt`, so `save_torchscript` insists on that suffix.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from persia_inc.inference.spec import ModelSpec


class CtrDense(nn.Module):
    """MLP over [dense, flattened pooled embeddings] -> sigmoid.

    forward(dense: float32[B, dense_dim], sparse: float32[B, F, dim] or float32[B, sum(dims)])
    -> float32[B]; sparse_width: F * dim, or sum(dims).
    """

    def __init__(self, dense_dim: int = 13, sparse_width: int = 26 * 16,
                 hidden: tuple[int, ...] = (128, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dense_dim + sparse_width
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([dense, sparse.flatten(1)], dim=1)
        return torch.sigmoid(self.mlp(x)).squeeze(-1)


class DenseHead(nn.Module):
    """The dense part of a trained model, for serving: `mlp` over [dense, flattened pooled
    embeddings] (the order a model like the demo's CTRModel concatenates them in), then
    sigmoid if `sigmoid` (a model trained on logits) -> float32[B].

    forward(dense: float32[B, dense_dim], sparse: float32[B, F, dim] or [B, sum(dims)])."""

    def __init__(self, mlp: nn.Module, sigmoid: bool = True) -> None:
        super().__init__()
        self.mlp = mlp
        self.sigmoid = sigmoid

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        out = self.mlp(torch.cat([dense, sparse.flatten(1)], dim=1)).reshape(-1)
        return torch.sigmoid(out) if self.sigmoid else out


def build_model(spec: ModelSpec, seed: int = 0) -> CtrDense:
    """A `CtrDense` shaped for `spec`, with weights from `seed` (deterministic)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CtrDense(spec.dense_dim, sum(spec.dims))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def save_torchscript(model: nn.Module, path: str | Path) -> Path:
    """`torch.jit.script(model).save(path)`; `path` must end in `.pt` (TorchServe's loader
    picks TorchScript by that suffix). Returns the path."""
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"{path}: a TorchScript file for TorchServe must end in .pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = script(model)
    with _torchscript_without_deprecation():
        scripted.save(str(path))
    return path


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """`torch.jit.script(model)` in eval mode.

    torch 2.13 marks TorchScript deprecated (DeprecationWarning), but TorchServe 0.12's stock
    loader and the seed document use it, so those warnings are silenced here, by message.
    """
    with _torchscript_without_deprecation():
        return torch.jit.script(model.eval())


@contextlib.contextmanager
def _torchscript_without_deprecation() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                                category=DeprecationWarning)
        yield


def load_torchscript(path: str | Path, map_location: str | torch.device | None = "cpu"
                     ) -> torch.jit.ScriptModule:
    """Load a TorchScript file in eval mode (TorchScript, not pickle)."""
    with _torchscript_without_deprecation():
        module = torch.jit.load(str(path), map_location=map_location)
    module.eval()
    return module


__all__ = ["CtrDense", "DenseHead", "build_model", "load_torchscript", "save_torchscript", "script"]
