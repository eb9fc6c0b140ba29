"""Linear layers whose weights are prepacked once for oneDNN, for generation on a CPU.

Decoding reads every weight of the model for each new token (batch 1) or each few tokens (a speculative
verification), so on a CPU it is the matrix products over few rows that set the speed. There torch's default
`F.linear` is far from the memory bandwidth: on a 2-core AVX512 EPYC, a forward pass of SmolLM2-135M over 1 new
token after 32 cached ones took 41 ms with it, and 22 ms with the weights reordered once into oneDNN's blocked
layout (over 5 tokens: 64 ms and 24 ms); the logits agree to 1e-4 (`bench/packed_linear.py`). The reordered
layout and the product are the two ops torch's own compiler emits for CPU linear layers when it freezes weights
(`torch.ops.mkldnn._reorder_linear_weight`, `torch.ops.mkldnn._linear_pointwise`); using them directly gives the
speed without compiling. They are private torch ops, so `prepack_linears` checks that they exist and agree with
`F.linear` before it swaps anything, and otherwise leaves the model as it is.

Inference only: a packed layer has no gradient. Its `weight` and its state-dict entry are a dense copy, so a packed
model still saves correctly, but it cannot load weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 8
"""The row count oneDNN's layout is chosen for. Measured on the 135M teacher: 1 gave 30 ms per 1-token pass, 4 to 64
gave 21-24 ms, with passes over up to 8 tokens within 1.3x of one token."""


class PackedLinear(nn.Module):
    """`nn.Linear` for inference with its weight reordered once into oneDNN's layout.

    Args:
        linear: the layer to replace; its weight [out, in] (fp32 or bf16) and bias [out] are copied, not kept.
        batch_hint: rows per call the layout is tuned for (any row count works).
    Input [..., in] of any dtype (cast to the weight's), output [..., out] in the weight's dtype.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] a dense copy of the weight (for code that inspects it; the product never uses it)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a PackedLinear is for inference only and cannot load weights; load them into the model "
                           "before hybridft.packed_linear.prepack_linears")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, oneDNN-packed"


def packing_available(dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """(whether linear layers of `dtype` can be prepacked on this CPU, why). bf16 only where the CPU computes it
    natively (AVX512-BF16 or AMX): elsewhere oneDNN would emulate it. The ops are tried on a small layer and must
    match `F.linear`."""
    from hybridft.precision import cpu_flags

    if dtype not in (torch.float32, torch.bfloat16):
        return False, f"no packed kernels for {dtype}"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch is built without oneDNN"
    if dtype == torch.bfloat16 and not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return False, "this CPU has no native bf16"
    try:
        g = torch.Generator().manual_seed(0)
        probe = nn.Linear(64, 48).to(dtype)
        x = torch.randn(3, 64, generator=g).to(dtype)
        got = PackedLinear(probe)(x)
        want = F.linear(x, probe.weight, probe.bias)
    except (RuntimeError, AttributeError) as e:  # an op missing or refusing this build
        return False, f"oneDNN packed linear unavailable ({type(e).__name__})"
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
        return False, "oneDNN packed linear disagrees with F.linear on this build"
    return True, "oneDNN packed weights"


def _swap(model: nn.Module, device: Optional[torch.device], batch_hint: int) -> list[tuple[nn.Module, str, nn.Linear]]:
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    if device.type != "cpu":
        return []
    usable: dict[torch.dtype, bool] = {}
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # exactly: not a quantized or already packed layer
                continue
            dtype = child.weight.dtype
            if dtype not in usable:
                usable[dtype] = packing_available(dtype)[0]
            if usable[dtype]:
                setattr(parent, name, PackedLinear(child, batch_hint))
                swapped.append((parent, name, child))
    return swapped


def _restore(swapped: list[tuple[nn.Module, str, nn.Linear]]) -> None:
    for parent, name, original in swapped:
        setattr(parent, name, original)


def prepack_linears(model: nn.Module, device: Optional[torch.device] = None, batch_hint: int = BATCH_HINT) -> int:
    """Replace, in place and for good, every `nn.Linear` of `model` (fp32, or bf16 where native) by a `PackedLinear`
    on a CPU where the packed kernels work; elsewhere (a GPU, a missing op) leave it unchanged. For a model that
    only generates from now on: the replaced weights are freed (a weight tied to the input embedding stays
    there). Layers already packed and int8 (dynamically quantized) layers are left alone. Returns the number of
    layers replaced. The outputs change only by rounding (1e-4 on the logits of a 135M model)."""
    return len(_swap(model, device, batch_hint))


@contextmanager
def packed_for_inference(model: nn.Module, device: Optional[torch.device] = None,
                         batch_hint: int = BATCH_HINT) -> Iterator[int]:
    """`prepack_linears` for the duration of a `with` block, yielding the number of layers replaced; the original
    layers come back on exit, so the model can train, be cut or be saved as before. Inside, the packed weights
    are held beside the originals (twice the linear weights' memory)."""
    swapped = _swap(model, device, batch_hint)
    try:
        yield len(swapped)
    finally:
        _restore(swapped)


PACK_GAIN = 0.9
"""`prepack_if_faster` keeps the packed layers only when a pass costs less than this share of the plain one."""


def decoding_pass_ms(model: nn.Module, widths: tuple[int, ...] = (1, 5), repeats: int = 3) -> float:
    """The median milliseconds of a causal LM's forward passes over `widths` new tokens after 16 cached ones,
    summed over the widths: a decoding step and a short speculative verification."""
    from hybridft.speculative import teacher_pass_ms

    costs = teacher_pass_ms(model, max(widths), context=16, repeats=repeats)
    return sum(costs[w - 1] for w in widths)


def median_ms(run: Callable[[], Any], repeats: int = 3) -> float:
    """The median milliseconds of `repeats` calls of `run` (of the middle two for an even count), after one untimed
    warm-up call."""
    import statistics
    import time

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def encoder_pass_ms(model: nn.Module, repeats: int = 3) -> float:
    """The median milliseconds of a classifier's forward pass over a batch of 32 x 64 random token ids plus one of
    1 x 24 (throughput and latency), summed."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1000)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for shape in ((32, 64), (1, 24)):
            ids = torch.randint(min(vocab, 1000), shape, generator=g).to(device)
            total += median_ms(lambda: model(input_ids=ids), repeats)
    return total


def prepack_if_faster(model: nn.Module, device: Optional[torch.device] = None,
                      timer: Optional[Callable[[nn.Module], float]] = None) -> dict[str, Any]:
    """`prepack_linears`, kept only where it pays: `timer(model)` (milliseconds; default `decoding_pass_ms` for a
    causal LM, `encoder_pass_ms` suits a classifier) is timed with the plain and the packed layers, and the plain
    ones come back unless packed costs under PACK_GAIN of plain.
    Small models lose (a 2-layer, 64-wide Llama ran 0.6x packed: the per-call cost of the oneDNN op outweighs
    reading its few weights), SmolLM2-135M wins (1.9x at batch 1). Timing takes about 0.5 s for a 135M model.

    Returns:
        {"packed": whether any layer of the model is now packed, "layers": layers packed by this call,
        "plain_ms", "packed_ms": the timed costs (absent when nothing could be packed), "reason": one line}.
    """
    return _decide(model, device, timer)[0]


def _decide(model: nn.Module, device: Optional[torch.device],
            timer: Optional[Callable[[nn.Module], float]] = None) -> tuple[dict[str, Any], list]:
    timer = timer or (lambda m: decoding_pass_ms(m))  # looked up at call time, so that tests can replace it
    swapped = _swap(model, device, BATCH_HINT)
    if not swapped:
        already = is_packed(model)
        return {"packed": already, "layers": 0,
                "reason": "already prepacked" if already else "no linear layer that can be packed here"}, []
    packed = [getattr(parent, name) for parent, name, _ in swapped]
    try:
        packed_ms = timer(model)
    except (RuntimeError, TypeError, ValueError) as e:  # a model the timer cannot drive: keep it as it was
        packed_ms = None
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _restore(swapped)
    if packed_ms is None:
        return {"packed": is_packed(model), "layers": 0, "reason": f"not timed ({why}); left plain"}, []
    plain_ms = timer(model)
    timed = {"plain_ms": round(plain_ms, 2), "packed_ms": round(packed_ms, 2)}
    if packed_ms < PACK_GAIN * plain_ms:
        for (parent, name, _), layer in zip(swapped, packed):
            setattr(parent, name, layer)
        return {"packed": True, "layers": len(swapped), **timed,
                "reason": f"prepacked for oneDNN (timed passes: {packed_ms:.1f} ms packed, {plain_ms:.1f} ms "
                          f"plain)"}, swapped
    return {"packed": is_packed(model), "layers": 0, **timed,
            "reason": f"plain, torch's default kernels (timed passes: {packed_ms:.1f} ms packed, {plain_ms:.1f} ms "
                      f"plain)"}, []


@contextmanager
def packed_if_faster(model: nn.Module, device: Optional[torch.device] = None,
                     timer: Optional[Callable[[nn.Module], float]] = None) -> Iterator[dict[str, Any]]:
    """`prepack_if_faster` for the duration of a `with` block, yielding its decision; the original layers come back
    on exit (inside, the packed weights are held beside them: twice the linear weights' memory)."""
    decision, swapped = _decide(model, device, timer)
    try:
        yield decision
    finally:
        _restore(swapped)


def is_packed(model: nn.Module) -> bool:
    """Whether any linear layer of `model` is a `PackedLinear`."""
    return any(isinstance(m, PackedLinear) for m in model.modules())
