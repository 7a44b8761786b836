"""`PackedLinear`: an nn.Linear whose inference on a CPU runs through oneDNN on a prepacked weight.

A decode step multiplies a few rows (2 at batch 1 with guidance, up to a few dozen with windows or a batch)
by every weight matrix of the model, so on a CPU it is bound by how fast the weights stream from memory.
MKL's GEMM behind F.linear streams a GPT-B weight at about 7 GB/s on one core for such shapes; oneDNN's
inner-product on a weight reordered once into its blocked layout streams it at 11-13 GB/s (measured on
2 to 64 rows of a 2304 x 768 matrix: 1.6-1.9x faster), with the same fp32 arithmetic. That is the largest
cost of a CPU decode step after the head-once-per-batch fix (generators/heads.py), so every linear layer
of the GPT, its head and the EAGLE drafter use this class.

When it applies: no autograd (torch.no_grad / inference), a float32 CPU input, a weight of at least
`PACK_MIN_ELEMENTS` entries (small, cache-resident weights are faster through F.linear: oneDNN's call has
a higher fixed cost), not while torch.compile traces (Inductor makes its own kernel choice). The packed
weight lives outside the state dict and is rebuilt when the weight changes (its version counter or
storage: an optimiser step, an EMA update, `.to()`), so training and exports are untouched. Everything
else is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_MIN_ELEMENTS = 1 << 18  # 1 MB of fp32: smaller weights stay in cache, where F.linear is faster
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedWeight:
    """The oneDNN copy of a weight and the (storage, version) it was made from. Copies of a module start
    without one (an opaque oneDNN tensor cannot be deep-copied or pickled)."""

    def __init__(self):
        self.key, self.tensor = None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        if self.key != key:
            self.tensor, self.key = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None), key
        return self.tensor

    def __deepcopy__(self, memo) -> PackedWeight:
        return PackedWeight()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()


class PackedLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_packed(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed.get(self.weight), self.bias, "none", [], "")

    def _use_packed(self, x: torch.Tensor) -> bool:
        return (
            _ONEDNN
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and self.weight.numel() >= PACK_MIN_ELEMENTS
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        )
