"""Deployment export of a student: ONNX (fp32) and a dynamically quantised int8 ONNX, each checked against the
PyTorch student and measured (size on disk, throughput, batch-1 latency) in the same process.

The export folder is self-contained: `model.onnx`, `model_int8.onnx`, `config.json` (label names) and the
tokenizer. `OnnxClassifier` runs either file behind the same `model(**inputs).logits` seam as an HF model, so
`logits_for_loss`, `predict_logits`, `measure_speed` and the hybrid cascade use it unchanged.

onnx and onnxruntime are an optional extra (`pip install 'hybridft[export]'`), imported only when used.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from hybridft.errors import HybridFTError
from hybridft.tasks.classification import MODEL_INPUTS, compute_metrics, make_collate

ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
INSTALL_HINT = "pip install 'hybridft[export]'"


@dataclass(frozen=True)
class Tolerance:
    """What a candidate must meet against the reference to count as the same model.

    Attributes:
        max_abs_logit_diff: Largest allowed |candidate - reference| over all logits; None when the export is lossy
            by design and the difference is only reported.
        min_agreement: Smallest allowed fraction of rows whose argmax equals the reference's.
        max_accuracy_drop: Largest allowed reference accuracy minus candidate accuracy (absolute); None: not judged.
    """

    max_abs_logit_diff: Optional[float]
    min_agreement: float
    max_accuracy_drop: Optional[float] = None


# fp32 ONNX runs the same arithmetic with different kernels (fused LayerNorm/GELU, another GEMM blocking), so
# only float rounding differs: ~1e-6 on MiniLM-sized logits, ~1e-8 on the tiny test model. 1e-4 absolute leaves
# two orders of margin yet catches any real graph error (a dropped mask or a baked-in shape is >= 1e-2). With
# logits that close, a changed prediction needs a top-2 margin below 2e-4, so every prediction must agree.
FP32_TOLERANCE = Tolerance(max_abs_logit_diff=1e-4, min_agreement=1.0)

# int8 is lossy by design: weights are rounded to 256 levels and activations are quantised per batch, so logits
# move by ~0.05 (2-layer MiniLM student) to ~0.5 (6-layer MiniLM), and a logit tolerance would be either
# meaningless or false. It is judged by what the deployment sees: at most 1 point of accuracy lost, and >= 98%
# of predictions unchanged. Not 99%: on SST-2 (872 rows) the fine-tuned MiniLM-L6 agrees on 98.3% (accuracy
# +0.3 points) and a 2-layer copy on 98.1%; every flipped row had a top-2 margin below the logit noise (6% of
# SST-2 rows are that close to the boundary), which `max_flipped_margin` shows. The max logit diff is reported.
INT8_TOLERANCE = Tolerance(max_abs_logit_diff=None, min_agreement=0.98, max_accuracy_drop=0.01)


# ---------------------------------------------------------------------------------------------------
# optional dependencies


def _require(module: str) -> Any:
    """Import an optional export dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise HybridFTError(f"exporting to ONNX needs the {module.split('.')[0]} package; run: {INSTALL_HINT}") from None


# ---------------------------------------------------------------------------------------------------
# export


class _LogitsOnly(nn.Module):
    """Positional tensors in, logits out: the tracer needs a plain tensor signature and a tensor output."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, tensors))).logits


def graph_inputs(model: nn.Module, tokenizer: Any) -> tuple[str, ...]:
    """The inputs the exported graph declares: those of MODEL_INPUTS the model accepts and the tokenizer makes.

    token_type_ids is left out for models without segments (DistilBERT) and for tokenizers that never produce it;
    the graph then uses the model's own default (zeros), exactly as the PyTorch model does.
    """
    accepted = inspect.signature(model.forward).parameters
    produced = getattr(tokenizer, "model_input_names", None) or MODEL_INPUTS
    names = tuple(n for n in MODEL_INPUTS if n in accepted and n in produced)
    if "input_ids" not in names:
        raise HybridFTError(f"{type(model).__name__} does not take input_ids from its tokenizer; only token-id "
                            f"text classifiers can be exported to ONNX")
    return names


def _example_inputs(tokenizer: Any, names: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Two texts of different length, padded: the traced graph then contains the padding-mask path, never a
    shortcut taken because the example mask happened to be all ones."""
    try:
        enc = tokenizer(["good", "a longer second example, so that the first one is padded"], padding=True,
                        return_tensors="pt")
    except ValueError as e:  # transformers: "Asking to pad but the tokenizer does not have a padding token"
        raise HybridFTError(f"cannot make an example batch for the export ({str(e).splitlines()[0]})") from None
    if "attention_mask" in enc and bool(enc["attention_mask"].all()):
        raise HybridFTError("the tokenizer did not pad the example batch; it needs a pad token to export to ONNX")
    return tuple((enc[n] if n in enc else torch.zeros_like(enc["input_ids"])).to(device) for n in names)


@contextlib.contextmanager
def _expected_export_warnings() -> Iterator[None]:
    """Silence the warnings every BERT export gives, and only those; anything new still shows.

    - the legacy-exporter deprecation: we choose the TorchScript exporter on purpose (see `export_onnx`);
    - TracerWarnings from transformers' mask code (`kv_length > mask length`, `q_length > 1 and mask is None`):
      both compare shapes that are equal for every encoder input, so baking in the result is correct;
    - aten::index "negative indices" notice: the indices are aranges over the sequence, never negative.
    The parity check after export is what actually guards against a wrong graph.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=re.escape("The feature will be removed"))
        warnings.filterwarnings("ignore", message=".*Exporting aten::index operator of advanced indexing.*")
        yield


def export_onnx(model: nn.Module, tokenizer: Any, out_dir: Path, opset: int = 17) -> Path:
    """Export a sequence classifier to `out_dir/model.onnx`, with its tokenizer and config beside it.

    Args:
        model: An HF sequence classifier (e.g. BertForSequenceClassification), on any device.
        tokenizer: Its tokenizer; saved next to the graph so the folder is self-contained.
        out_dir: Folder to write (created if missing).
        opset: ONNX opset; 17 is the first with a native LayerNormalization.

    Returns:
        The path of model.onnx. Graph inputs: input_ids, attention_mask and (when the model uses them)
        token_type_ids, each int64 [batch, sequence]; output: logits float32 [batch, num_labels]. Batch and
        sequence are dynamic axes.
    """
    _require("onnx")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HybridFTError(f"export folder {out_dir} is a file; give a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = graph_inputs(model, tokenizer)
    device = next(model.parameters()).device
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    path, tmp = out_dir / ONNX_FILE, out_dir / (ONNX_FILE + ".tmp")
    was_training = model.training
    model.eval()  # dropout off: the graph must be the inference graph
    try:
        # The TorchScript exporter (dynamo=False), deliberately, on torch 2.13: it writes the opset we ask for
        # (the dynamo exporter only implements opset >= 18 and down-converts with a fallback that may fail),
        # embeds the weights in one file (dynamo writes model.onnx.data beside it), needs no onnxscript/onnx-ir,
        # and takes ~0.3 s instead of ~4 s on the tiny model. A BERT forward has no data-dependent control flow
        # that matters (see `_expected_export_warnings`), so tracing is exact; both exporters gave the same
        # logits to 1e-8. It is deprecated: if a future torch removes it, switch to dynamo=True with
        # dynamic_shapes and add onnxscript to the extra.
        with torch.no_grad(), _expected_export_warnings():
            torch.onnx.export(_LogitsOnly(model, names), _example_inputs(tokenizer, names, device), str(tmp),
                              dynamo=False, opset_version=opset, input_names=list(names),
                              output_names=["logits"], dynamic_axes=dynamic, do_constant_folding=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)
    os.replace(tmp, path)  # never leave a half-written model.onnx under the final name
    model.config.save_pretrained(out_dir)  # id2label / num_labels for OnnxClassifier.config
    tokenizer.save_pretrained(out_dir)
    return path


class _DropPreprocessHint(logging.Filter):
    """onnxruntime logs "consider to run pre-processing" on the root logger for every quantisation. We skip
    pre-processing on purpose: its symbolic shape inference fails on the exported BERT graph ("Incomplete
    symbolic shape inference"), and dynamic quantisation of MatMul/Gather weights does not need it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(onnx_path: Path, out_path: Path) -> Path:
    """Dynamically quantise an fp32 ONNX classifier to int8 weights.

    Weights of MatMul (the linear layers) and Gather (the embedding tables, most of a small student's bytes) are
    stored as int8 with one scale per output channel; activations are quantised per batch at run time, so no
    calibration data is needed. The attention products (activation x activation) and the pooler/classifier
    Gemms stay fp32. QInt8 weights with uint8 activations is the combination onnxruntime's x86 CPU kernels
    (MatMulInteger, U8S8) run natively.

    Args:
        onnx_path: An fp32 graph written by `export_onnx`.
        out_path: Where to write the int8 graph.

    Returns:
        out_path. Same inputs and outputs as the fp32 graph.
    """
    _require("onnx")
    quantization = _require("onnxruntime.quantization")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise HybridFTError(f"{onnx_path} does not exist; export the model with export_onnx first")
    tmp = out_path.with_name(out_path.name + ".tmp")
    hint_filter = _DropPreprocessHint()
    logging.getLogger().addFilter(hint_filter)
    try:
        # per_channel: one scale per tensor lets a few large weights coarsen a whole matrix. Per channel, on
        # SST-2 with MiniLM-L6, agreement with fp32 rose from 97.0% to 98.3% and the max logit error halved
        # (1.05 -> 0.56), for +0.1 MB. (reduce_range made it worse: 92.3%; keeping one FFN MatMul per layer in
        # fp32 gained 0.5-1 point of agreement for +22% (2 layers) to +46% (6 layers) size: not the default.)
        quantization.quantize_dynamic(str(onnx_path), str(tmp), weight_type=quantization.QuantType.QInt8,
                                      per_channel=True)
    finally:
        logging.getLogger().removeFilter(hint_filter)
    os.replace(tmp, out_path)
    return out_path


# ---------------------------------------------------------------------------------------------------
# running an exported model


_ORT_DTYPES = {"tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


class OnnxClassifier(nn.Module):
    """An exported classifier behind the HF interface: `model(**inputs).logits`.

    It is an nn.Module without parameters, so `.to(device)`, `.eval()`, `.train()` and `.training` behave as
    `predict_logits`, `measure_speed` and `HybridModel` expect, and do nothing. Inference always runs on the CPU
    with onnxruntime; inputs may live on any device and the logits come back on the device of input_ids.

    Attributes:
        config: The HF config saved beside the graph (id2label, label2id, num_labels).
        input_names: The inputs the graph declares, in graph order.
        path: The .onnx file.
    """

    def __init__(self, path: str | Path, num_threads: Optional[int] = None) -> None:
        """Load `path` (a .onnx file, or a folder holding model.onnx) and config.json from the same folder.

        Args:
            path: The graph, or its folder.
            num_threads: onnxruntime intra-op threads; default torch.get_num_threads(), so the ONNX and PyTorch
                numbers in one report use the same CPU budget.
        """
        super().__init__()
        ort = _require("onnxruntime")
        from transformers import AutoConfig

        path = Path(path)
        if path.is_dir():
            path = path / ONNX_FILE
        if not path.is_file():
            raise HybridFTError(f"ONNX model not found: {path}; give a model.onnx written by hybridft's export")
        if not (path.parent / "config.json").is_file():
            raise HybridFTError(f"{path.parent} has no config.json next to {path.name}; re-export the folder")
        self.path = path
        self.config = AutoConfig.from_pretrained(str(path.parent))
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1  # one graph at a time; parallelism is inside the ops
        # Idle worker threads spin by default; on a shared CPU that steals cycles from the PyTorch model that
        # runs right after (the teacher in the hybrid, the reference in a benchmark).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        state = ort.capi.onnxruntime_pybind11_state
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (state.InvalidProtobuf, state.InvalidGraph, state.NoSuchFile, state.Fail) as e:
            raise HybridFTError(f"cannot load {path} with onnxruntime ({str(e).splitlines()[0]}); "
                                f"re-export the model") from None
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self._dtypes = {i.name: _ORT_DTYPES.get(i.type, torch.int64) for i in self.session.get_inputs()}

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> Any:
        """Logits for a batch.

        Args:
            input_ids: [N, L] token ids. attention_mask: [N, L], default all ones. token_type_ids: [N, L],
                default zeros (the HF defaults). Inputs the graph does not declare are ignored.

        Returns:
            A SequenceClassifierOutput whose `.logits` is float32 [N, C] on the device of input_ids.
        """
        from transformers.modeling_outputs import SequenceClassifierOutput

        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        defaults = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}
        feed = {}
        for name in self.input_names:  # only what the graph declares; onnxruntime rejects unknown inputs
            value = given.get(name)
            if value is None:
                if name not in defaults:
                    raise HybridFTError(f"{self.path} needs input {name!r}, which the batch does not have")
                value = defaults[name](input_ids)
            feed[name] = value.detach().to("cpu", self._dtypes[name]).numpy()
        (logits,) = self.session.run(["logits"], feed)
        return SequenceClassifierOutput(logits=torch.from_numpy(logits).to(input_ids.device))


def load_exported(folder: str | Path, int8: bool = False) -> tuple[OnnxClassifier, Any]:
    """The exported student and its tokenizer, e.g. as the student of a `HybridModel`."""
    from hybridft.models import load_tokenizer

    folder = Path(folder)
    return OnnxClassifier(folder / (INT8_FILE if int8 else ONNX_FILE)), load_tokenizer(str(folder), str(folder))


# ---------------------------------------------------------------------------------------------------
# parity and the export report


def _default_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _logits(model: nn.Module, items: list[dict[str, Any]], collate: Any, device: torch.device,
            batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hybridft.batching import length_sorted_loader
    from hybridft.tasks.classification import predict_logits

    return predict_logits(model, length_sorted_loader(items, batch_size, collate), device)


def parity_from_logits(reference: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor,
                       label_names: list[str], tolerance: Tolerance) -> dict[str, Any]:
    """Compare two models' logits on the same rows.

    Args:
        reference: [N, C] logits of the PyTorch model. candidate: [N, C] logits of the export, same row order.
        labels: [N] gold label ids (-100: unlabeled, ignored by accuracy). label_names: C names.
        tolerance: What the candidate must meet.

    Returns:
        max_abs_logit_diff, prediction_agreement (fraction of rows with the same argmax), max_flipped_margin (the
        largest reference top-1 minus top-2 logit among rows whose prediction changed, 0 if none: flips only
        below the logit noise are near-ties, not errors), accuracy and macro_f1 of the candidate, accuracy_drop
        (reference minus candidate accuracy), tolerance (as a dict) and within_tolerance (every set limit met).
    """
    diff = float((candidate - reference).abs().max()) if reference.numel() else 0.0
    flipped = candidate.argmax(-1) != reference.argmax(-1)  # [N]
    agreement = 1.0 - int(flipped.sum()) / len(flipped) if len(reference) else 1.0  # exact, not float32
    top2 = reference.topk(min(2, reference.shape[-1]), dim=-1).values  # [N, 2]
    margin = top2[:, 0] - top2[:, -1]  # [N]
    flipped_margin = float(margin[flipped].max()) if bool(flipped.any()) else 0.0
    ref_metrics = compute_metrics(reference, labels, label_names)
    metrics = compute_metrics(candidate, labels, label_names)
    drop = ref_metrics["accuracy"] - metrics["accuracy"]
    t = tolerance
    within = (agreement >= t.min_agreement
              and (t.max_abs_logit_diff is None or diff <= t.max_abs_logit_diff)
              and (t.max_accuracy_drop is None or not drop > t.max_accuracy_drop))  # NaN (no labels): not judged
    return {"max_abs_logit_diff": diff, "prediction_agreement": agreement, "max_flipped_margin": flipped_margin,
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"], "accuracy_drop": drop, "tolerance": asdict(t),
            "within_tolerance": bool(within)}


def check_parity(reference: nn.Module, candidate: nn.Module, items: list[dict[str, Any]], collate: Any,
                 label_names: list[str], tolerance: Tolerance, *, device: Optional[torch.device] = None,
                 batch_size: int = 32) -> dict[str, Any]:
    """Run both models on `items` (length-sorted batches) and compare them with `parity_from_logits`.

    Args:
        reference: The PyTorch model. candidate: The export (e.g. an OnnxClassifier).
        items: Encoded examples (`encode`), with labels. collate: `make_collate(tokenizer)`.
        label_names: C names. tolerance: FP32_TOLERANCE, INT8_TOLERANCE or your own.
        device: Where batches go; default the reference's device.
        batch_size: Rows per batch.

    Returns:
        The dict of `parity_from_logits`.
    """
    device = device or _default_device(reference)
    ref, labels = _logits(reference, items, collate, device, batch_size)
    cand, _ = _logits(candidate, items, collate, device, batch_size)
    return parity_from_logits(ref, cand, labels, label_names, tolerance)


def file_size_mb(path: Path) -> float:
    """MiB on disk of a graph, with its external-data file if it has one (same unit as size_on_disk_mb)."""
    files = [path, path.with_name(path.name + ".data")]
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 2**20, 2)


def _pytorch_size_mb(model: nn.Module) -> Optional[float]:
    """Size of the student as deployed in PyTorch: its model.safetensors, written to a temporary folder."""
    from hybridft.evaluate import size_on_disk_mb
    from hybridft.models import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar for a throwaway save
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return size_on_disk_mb(Path(tmp))


def export_student(student: nn.Module, tokenizer: Any, out_dir: Path, items: list[dict[str, Any]],
                   label_names: list[str], device: torch.device, *, opset: int = 17, batch_size: int = 32,
                   speed_batches: int = 8, latency_samples: int = 32) -> dict[str, Any]:
    """Export the student to ONNX and int8 ONNX, check both against it, and measure all three.

    Written to `out_dir` (replaced as a whole, via a temporary sibling folder): model.onnx, model_int8.onnx,
    config.json and the tokenizer.

    Args:
        student: The PyTorch student (an HF sequence classifier).
        tokenizer: Its tokenizer.
        out_dir: The export folder.
        items: Encoded test split (`encode`), used for parity and speed.
        label_names: C names, in id order.
        device: Where the PyTorch student is measured; the ONNX models always run on the CPU.
        opset: ONNX opset. batch_size: Batch for parity and throughput. speed_batches, latency_samples: as in
            `hybridft.evaluate.measure_speed`.

    Returns:
        {"pytorch": {...}, "onnx": {...}, "onnx_int8": {...}} for summary.json. Each entry has size_mb,
        throughput_samples_per_s, latency_ms_batch1, device, accuracy and macro_f1; the ONNX entries also have
        file (name inside out_dir) and the parity keys of `parity_from_logits`.
    """
    from hybridft.evaluate import measure_speed

    if not items:
        raise HybridFTError("the export needs test examples to check the exported models on; the test split is empty")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    fp32_path = export_onnx(student, tokenizer, tmp, opset)
    quantize_int8(fp32_path, tmp / INT8_FILE)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)

    collate = make_collate(tokenizer)
    speed = dict(batch_size=batch_size, batches=speed_batches, latency_samples=latency_samples)
    student.to(device).eval()
    ref_logits, labels = _logits(student, items, collate, device, batch_size)
    report: dict[str, Any] = {"pytorch": {
        "size_mb": _pytorch_size_mb(student), **measure_speed(student, items, collate, device, **speed),
        "device": device.type, **compute_metrics(ref_logits, labels, label_names)}}
    cpu = torch.device("cpu")
    for key, name, tolerance in (("onnx", ONNX_FILE, FP32_TOLERANCE), ("onnx_int8", INT8_FILE, INT8_TOLERANCE)):
        model = OnnxClassifier(out_dir / name)
        cand_logits, _ = _logits(model, items, collate, cpu, batch_size)
        report[key] = {"file": name, "size_mb": file_size_mb(out_dir / name),
                       **measure_speed(model, items, collate, cpu, **speed), "device": "cpu",
                       **parity_from_logits(ref_logits, cand_logits, labels, label_names, tolerance)}
    return report
