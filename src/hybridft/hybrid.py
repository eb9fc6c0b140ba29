"""The hybrid model: the student answers, and the inputs it is unsure of go to the teacher.

A confidence cascade. Both models' temperatures are calibrated on validation (minimum NLL), the student's
confidence on each input is computed from its calibrated probabilities, and inputs below a threshold are sent
to the teacher in a batch of their own, so the teacher runs only on those. The threshold is chosen on
validation for a goal: a teacher budget (the default: the fewest teacher calls that reach the best validation
accuracy possible with at most this fraction of inputs to the teacher) or a target accuracy (within `gap` of the
teacher).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from hybridft.data import Examples, text_problem
from hybridft.errors import HybridFTError
from hybridft.tasks import classification as task

FORMAT = "hybridft.hybrid/1"
CONFIDENCE_KINDS = ("max_prob", "margin", "entropy")


# ---------------------------------------------------------------------------------------------------
# calibration and confidence (pure functions of logits)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on held-out labels (Guo et al. 2017).

    Args:
        logits (Tensor): [N, C]. labels (Tensor): [N], rows with -100 ignored.
    """
    keep = labels != -100
    z, y = logits[keep].detach().float(), labels[keep]
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros((), requires_grad=True)  # optimise log T so that T stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    keep = labels != -100
    return float(torch.nn.functional.cross_entropy(logits[keep].float() / temperature, labels[keep]))


def confidence(logits: torch.Tensor, temperature: float, kind: str = "max_prob") -> torch.Tensor:
    """Per-row confidence [N], higher = surer: top probability, top-1 minus top-2, or minus the entropy."""
    probs = (logits.float() / temperature).softmax(-1)  # [N, C]
    if kind == "max_prob":
        return probs.max(-1).values
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values  # [N, 2]
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        return (probs * probs.clamp_min(1e-12).log()).sum(-1)  # -H(p)
    raise HybridFTError(f"hybrid.confidence '{kind}' is not one of {CONFIDENCE_KINDS}")


# ---------------------------------------------------------------------------------------------------
# the accuracy / teacher-fraction curve and the choice of threshold


def cascade_curve(student_conf: torch.Tensor, student_pred: torch.Tensor, teacher_pred: torch.Tensor,
                  labels: torch.Tensor) -> list[dict[str, float]]:
    """Accuracy of the cascade for every number of inputs sent to the teacher, least confident first.

    Point k sends the k least confident rows to the teacher; its `threshold` (a row goes to the teacher when
    its confidence < threshold) lies midway between the k-th and (k+1)-th confidences. Shapes: all [N].
    """
    n = len(labels)
    order = student_conf.argsort()  # least confident first
    conf = student_conf[order].tolist()
    s_ok = (student_pred == labels)[order].float()
    t_ok = (teacher_pred == labels)[order].float()
    # accuracy(k) = teacher-correct among the first k + student-correct among the rest
    t_cum = torch.cat([torch.zeros(1), t_ok.cumsum(0)])  # [N + 1]
    s_rest = s_ok.sum() - torch.cat([torch.zeros(1), s_ok.cumsum(0)])  # [N + 1]
    acc = ((t_cum + s_rest) / max(n, 1)).tolist()
    points = []
    for k in range(n + 1):
        if k < n and 0 < k and conf[k] == conf[k - 1]:
            continue  # ties: a threshold cannot split equal confidences
        if k == 0:
            threshold = conf[0] - 1.0 if n else 0.0
        elif k == n:
            threshold = conf[-1] + 1.0
        else:
            threshold = (conf[k - 1] + conf[k]) / 2
        points.append({"threshold": threshold, "teacher_fraction": k / max(n, 1), "accuracy": acc[k]})
    return points


def choose_threshold(curve: list[dict[str, float]], *, teacher_budget: Optional[float] = None,
                     target_accuracy: Optional[float] = None, spend_whole_budget: bool = False) -> dict[str, float]:
    """The point of the curve that meets the goal.

    With a budget: the fewest teacher calls that reach the best validation accuracy reachable within the budget.
    A teacher call that buys nothing on validation is not paid for: where the student already matches the
    teacher, nothing goes to the teacher. `spend_whole_budget=True` takes the largest teacher fraction within the
    budget instead (more teacher calls, on the bet that they buy accuracy on new data even where validation
    cannot show it).
    With a target accuracy: the point with the fewest teacher calls that reaches it (all to the teacher if none).

    Args:
        curve: `cascade_curve`'s points, in increasing teacher fraction.
    Raises:
        ValueError: Neither or both of `teacher_budget` and `target_accuracy` given.
    """
    if (teacher_budget is None) == (target_accuracy is None):
        raise ValueError("give exactly one of teacher_budget and target_accuracy")
    if teacher_budget is not None:
        allowed = [p for p in curve if p["teacher_fraction"] <= teacher_budget + 1e-12]
        if spend_whole_budget:
            return max(allowed, key=lambda p: p["teacher_fraction"])
        best = max(p["accuracy"] for p in allowed)
        return min((p for p in allowed if p["accuracy"] >= best - 1e-12), key=lambda p: p["teacher_fraction"])
    reaching = [p for p in curve if p["accuracy"] >= target_accuracy - 1e-12]
    return min(reaching, key=lambda p: p["teacher_fraction"]) if reaching else curve[-1]


def apply_threshold(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    threshold: float, student_temperature: float, kind: str) -> dict[str, float]:
    """Accuracy and teacher fraction of the cascade at a fixed threshold, from both models' logits [N, C]."""
    defer = confidence(student_logits, student_temperature, kind) < threshold
    pred = torch.where(defer, teacher_logits.argmax(-1), student_logits.argmax(-1))
    return {"accuracy": float((pred == labels).float().mean()), "teacher_fraction": float(defer.float().mean())}


# ---------------------------------------------------------------------------------------------------
# the deployable model


@dataclass
class HybridPrediction:
    label_ids: torch.Tensor  # [N]
    probs: torch.Tensor  # [N, C], calibrated probabilities of the model that answered
    answered_by: list[str]  # "student" or "teacher" per row
    labels: list[str] = field(default_factory=list)  # [N] the label name of each row (label_names[label_ids[i]])


class HybridModel:
    """Student first; the rows whose calibrated student confidence is below `threshold` go to the teacher.

    With `teacher_budget`, the teacher answers at most that fraction of the rows seen so far, over the whole
    stream of calls (a running quota: a row below the threshold goes to the teacher only while
    `teacher rows + 1 <= budget x rows seen`), whatever the threshold says. Rows are decided one by one in input
    order, so the same stream gets the same answers whether it comes in calls of 1 or of 256 rows; a serving
    process that takes requests one at a time keeps its budget. The teacher fraction never exceeds the budget
    (teacher rows <= budget x rows seen at every row). `reset_budget()` starts a new stream.

    `text_column` and `text_pair_column` name the columns the run read its texts from; they are saved with the
    hybrid and are `hybridft predict`'s defaults for its input file.

    `student` may be any callable with the HF classifier interface (`model(**inputs).logits`), including an
    exported ONNX student (`hybridft.export.OnnxClassifier`).
    """

    def __init__(self, student: Any, student_tokenizer: Any, teacher: nn.Module, teacher_tokenizer: Any,
                 label_names: list[str], *, threshold: float, student_temperature: float = 1.0,
                 teacher_temperature: float = 1.0, confidence_kind: str = "max_prob", max_length: int = 128,
                 teacher_budget: Optional[float] = None, device: Optional[torch.device] = None,
                 text_column: str = "text", text_pair_column: Optional[str] = None,
                 answered_by: Optional[str] = None) -> None:
        if confidence_kind not in CONFIDENCE_KINDS:
            raise HybridFTError(f"hybrid.confidence '{confidence_kind}' is not one of {CONFIDENCE_KINDS}")
        self.student, self.student_tokenizer = student, student_tokenizer
        self.teacher, self.teacher_tokenizer = teacher, teacher_tokenizer
        self.label_names = list(label_names)
        self.threshold = float(threshold)
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.confidence_kind = confidence_kind
        self.max_length = max_length
        self.teacher_budget = teacher_budget
        # the columns the run read its texts from: `hybridft predict`'s defaults for --text-column and
        # --text-pair-column, so that a file shaped like the training file needs no options
        self.text_column, self.text_pair_column = text_column, text_pair_column
        # one model in both slots (`load_predictor` on a single folder): every row is that model's, by this name
        self.single_name = answered_by
        self.device = torch.device(device) if device is not None else torch.device("cpu")  # "cuda" as a string too
        if self.device.type == "cuda" and not torch.cuda.is_available():  # torch's own error is an AssertionError
            raise HybridFTError(f"device={device!r}, but no CUDA device is visible; use device='cpu'")
        self.rows_seen = self.teacher_rows = 0  # the running quota's counts (see `reset_budget`)
        for model in (student, teacher):
            if isinstance(model, nn.Module):
                model.to(self.device).eval()

    def _logits(self, model: Any, tokenizer: Any, texts: list[str], pairs: Optional[list[str]],
                batch_size: int) -> torch.Tensor:
        ex = Examples(texts=texts, labels=[-100] * len(texts), pairs=pairs, source="input")
        return task.predict_examples(model, tokenizer, ex, self.max_length, batch_size, self.device)[0]

    @torch.no_grad()
    def predict(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
                batch_size: int = 32) -> HybridPrediction:
        """Labels for `texts` (N strings: a list, tuple, numpy array or pandas Series; `pairs`: N second texts or
        None). Raises HybridFTError for a single string instead of a sequence, an item that is not a non-empty
        string, or pairs of another length."""
        texts = _text_sequence(texts, "texts")
        pairs = None if pairs is None else _text_sequence(pairs, "pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise HybridFTError(f"predict got {len(texts)} texts but {len(pairs)} pairs; give one pair per text")
        for name, items in (("texts", texts), ("pairs", pairs or [])):
            for i, t in enumerate(items):
                if not isinstance(t, str) or not t.strip():
                    what = "empty" if isinstance(t, str) else f"not a string ({type(t).__name__})"
                    raise HybridFTError(f"predict: {name}[{i}] is {what}; give one non-empty string per row")
                problem = text_problem(t)  # a lone surrogate, as in the training files
                if problem:
                    raise HybridFTError(f"predict: {name}[{i}] {problem}")
        if not texts:
            return HybridPrediction(label_ids=torch.empty(0, dtype=torch.long),
                                    probs=torch.empty(0, len(self.label_names)), answered_by=[])
        s_logits = self._logits(self.student, self.student_tokenizer, texts, pairs, batch_size)  # [N, C]
        probs = (s_logits / self.student_temperature).softmax(-1)
        conf = confidence(s_logits, self.student_temperature, self.confidence_kind)  # [N]
        defer = conf < self.threshold
        if self.teacher_budget is not None:
            # The budget holds over the stream even when the inputs are harder than validation (a threshold
            # alone sends more rows to the teacher under such a shift), and does not depend on how the stream
            # is cut into calls: each row may use the teacher only while the quota allows.
            for i, wants in enumerate(defer.tolist()):
                self.rows_seen += 1
                if wants and self.teacher_rows + 1 <= self.teacher_budget * self.rows_seen + 1e-9:
                    self.teacher_rows += 1
                else:
                    defer[i] = False
        else:
            self.rows_seen += len(texts)
        idx = defer.nonzero().flatten().tolist()
        if idx:  # the teacher sees only the deferred rows, as a batch of their own
            t_logits = self._logits(self.teacher, self.teacher_tokenizer, [texts[i] for i in idx],
                                    None if pairs is None else [pairs[i] for i in idx], batch_size)
            probs[defer] = (t_logits / self.teacher_temperature).softmax(-1)
        label_ids = probs.argmax(-1)
        return HybridPrediction(label_ids=label_ids, probs=probs,
                                answered_by=[self.single_name or ("teacher" if d else "student")
                                             for d in defer.tolist()],
                                labels=[self.label_names[i] for i in label_ids.tolist()])

    def prepack(self) -> dict[str, Any]:
        """On a CPU, run the student's and the teacher's linear layers from weights prepacked for oneDNN, each only
        where a timed pass is faster (`hybridft.packed_linear.prepack_if_faster`); for a model that only predicts
        from now on (`hybridft predict` does this unless --no-prepack). The all-MiniLM-L6-v2 teacher and its 2-layer
        student ran 1.8x faster at batch 32 and at batch 1 on a 2-core EPYC; the logits change only by rounding.
        Returns {"student": decision, "teacher": decision} (no teacher entry when the student answers alone).
        Calling it again keeps the packing and reports it as already done."""
        from hybridft.packed_linear import encoder_pass_ms, prepack_if_faster

        out: dict[str, Any] = {}
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            if name == "teacher" and model is self.student:
                continue  # a single classifier folder: the teacher slot holds the student itself
            if isinstance(model, nn.Module):
                out[name] = prepack_if_faster(model, self.device, encoder_pass_ms)
        return out

    def prepack_summary(self, decisions: dict[str, Any]) -> str:
        """One line for the CLI: which models `prepack` packed."""
        parts = [f"{name} {'prepacked' if d['packed'] else 'plain'}"
                 + (f" ({d['plain_ms']:.0f} -> {d['packed_ms']:.0f} ms timed)" if "packed_ms" in d else "")
                 for name, d in decisions.items()]
        return "linear weights: " + ", ".join(parts) if parts else "linear weights: nothing to prepack"

    def reset_budget(self) -> None:
        """Start a new stream: the running teacher quota counts rows from zero again."""
        self.rows_seen = self.teacher_rows = 0

    def predict_batch(self, texts: list[str], pairs: Optional[list[str]] = None) -> list[dict[str, Any]]:
        """Rows for `hybridft predict`: label name, its probability and which model answered."""
        p = self.predict(texts, pairs)
        top = p.probs.max(-1).values.tolist()
        return [{"label": self.label_names[i], "probability": round(pr, 6), "answered_by": who}
                for i, pr, who in zip(p.label_ids.tolist(), top, p.answered_by)]

    # -----------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"format": FORMAT, "label_names": self.label_names, "threshold": self.threshold,
                "student_temperature": self.student_temperature, "teacher_temperature": self.teacher_temperature,
                "confidence": self.confidence_kind, "max_length": self.max_length,
                "teacher_budget": self.teacher_budget, "text_column": self.text_column,
                "text_pair_column": self.text_pair_column}

    def save(self, folder: str | Path, saved: Optional[dict[str, Path]] = None) -> Path:
        """One folder: student/, teacher/, hybrid.json and manifest.json (versions and SHA-256 of every file).
        Written beside the target and renamed, so a failed save never leaves a half folder in its place.
        `saved`: folders where these very models are already saved ({"student": ..., "teacher": ...}, a run's
        own), hard-linked instead of written again (no second copy on disk; copied where links are refused)."""
        from hybridft.checkpoint import link_or_copy

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, model, tokenizer in (("student", self.student, self.student_tokenizer),
                                       ("teacher", self.teacher, self.teacher_tokenizer)):
            source = (saved or {}).get(name)
            if source is not None and Path(source).is_dir():
                shutil.copytree(source, tmp / name, copy_function=link_or_copy)
            else:
                task.save_model(model, tokenizer, tmp / name)
        (tmp / "hybrid.json").write_text(json.dumps(self.settings(), indent=2), encoding="utf-8")
        write_manifest(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: Optional[torch.device] = None) -> "HybridModel":
        folder = Path(folder)
        if not (folder / "hybrid.json").is_file():
            raise HybridFTError(f"{folder} is not a hybrid model folder (no hybrid.json); give the folder "
                                f"written by `hybridft run` (OUTPUT_DIR/hybrid)")
        verify_manifest(folder)
        s = json.loads((folder / "hybrid.json").read_text(encoding="utf-8"))
        if s.get("kind") == "speculative":
            raise HybridFTError(f"{folder} is a causal-LM hybrid (the student drafts for the teacher), which generates "
                                f"text; use `hybridft generate --model {folder}` (or hybridft.speculative.load_hybrid)")
        if s.get("format") != FORMAT:
            raise HybridFTError(f"{folder}/hybrid.json has format {s.get('format')!r}, expected {FORMAT!r}")
        labels = s["label_names"]
        models = {}
        for name in ("student", "teacher"):
            path = str(folder / name)
            if task.classifier_labels(path) != labels:
                raise HybridFTError(f"{path} predicts labels {task.classifier_labels(path)}, but the hybrid's labels "
                                    f"are {labels}; the folder is inconsistent, re-save it")
            models[name] = (task.load_classifier(path, labels, name), task.load_tokenizer(path, name))
        return cls(*models["student"], *models["teacher"], labels, threshold=s["threshold"],
                   student_temperature=s["student_temperature"], teacher_temperature=s["teacher_temperature"],
                   confidence_kind=s["confidence"], max_length=s["max_length"],
                   teacher_budget=s.get("teacher_budget"), device=device,
                   text_column=s.get("text_column", "text"), text_pair_column=s.get("text_pair_column"))


def _text_sequence(items: Any, name: str) -> list[str]:
    """`items` as a list: any sequence or array of texts, not one string (whose characters would be the texts)
    and not a mapping (whose keys would be)."""
    if isinstance(items, (str, bytes)):
        raise HybridFTError(f"predict takes a sequence of {name}, got one {type(items).__name__}; wrap one text as "
                            f"[text]")
    if isinstance(items, dict) or not hasattr(items, "__iter__") or not hasattr(items, "__len__"):
        raise HybridFTError(f"predict takes a sequence of {name} (a list, tuple, numpy array or pandas Series), got "
                            f"{type(items).__name__}")
    return list(items)


def saved_text_columns(folder: str | Path) -> Optional[tuple[str, Optional[str]]]:
    """The text and text-pair columns a hybrid folder's run read (from hybrid.json, without loading a model); a
    single classifier folder reads those of its run when it is a run's teacher/ or student/ (the run's
    config.yaml beside it), else `text`. None for anything else: loading the folder says what is wrong."""
    path = Path(folder) / "hybrid.json"
    if not path.is_file():
        return _run_text_columns(Path(folder)) if (Path(folder) / "config.json").is_file() else None
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(s, dict) or s.get("kind") == "speculative":  # a causal-LM hybrid: load() says to generate
        return None
    return s.get("text_column", "text"), s.get("text_pair_column")


def _run_text_columns(folder: Path) -> tuple[str, Optional[str]]:
    """A run's teacher/ or student/ folder: the text columns in the run's config.yaml (or, in a folder the stage
    commands made, the config.<stage>.yaml of the stage that wrote it); else ("text", None)."""
    stage = "config.teacher.yaml" if folder.name == "teacher" else "config.distill.yaml"
    config = next((c for c in (folder.parent / "config.yaml", folder.parent / stage) if c.is_file()), None)
    if folder.name not in ("teacher", "student") or config is None:
        return "text", None
    import yaml

    try:
        data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):  # not a hybridft run's config: the default
        return "text", None
    column, pair = data.get("text_column", "text"), data.get("text_pair_column")
    return (column if isinstance(column, str) else "text"), (pair if isinstance(pair, str) else None)


def load_predictor(folder: str | Path, device: Optional[torch.device] = None) -> HybridModel:
    """A hybrid folder, or a single classifier folder: then that model answers every row, named in `answered_by` as
    "teacher" for a run's teacher/ folder (or an LLM teacher read zero-shot, zero_shot.json), "student" for its
    student/ folder, and "model" for any other folder."""
    folder = Path(folder)
    if (folder / "hybrid.json").is_file():
        return HybridModel.load(folder, device)
    path = str(folder)
    task.check_model_folder(path, "--model")
    labels = task.classifier_labels(path)
    if labels is None:
        raise HybridFTError(f"--model {folder} is neither a hybrid folder (hybrid.json) nor a fine-tuned "
                            f"classifier; give OUTPUT_DIR/hybrid or OUTPUT_DIR/student of a run")
    model, tokenizer = task.load_classifier(path, labels, "--model"), task.load_tokenizer(path, "--model")
    name = ("teacher" if folder.name == "teacher" or (folder / "zero_shot.json").is_file() else
            "student" if folder.name == "student" else "model")
    # A threshold below any confidence: the teacher slot is never called.
    column, pair = _run_text_columns(folder)  # `hybridft predict`'s defaults, as for a hybrid folder
    return HybridModel(model, tokenizer, model, tokenizer, labels, threshold=float("-inf"), device=device,
                       answered_by=name, text_column=column, text_pair_column=pair)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    import transformers

    import hybridft

    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    manifest = {"format": FORMAT, "versions": {"hybridft": hybridft.__version__, "torch": torch.__version__,
                                               "transformers": transformers.__version__},
                "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def verify_manifest(folder: Path) -> None:
    """Refuse a folder whose files do not match the checksums recorded when it was saved."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise HybridFTError(f"{folder} has no manifest.json; it was not saved by hybridft or is incomplete")
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise HybridFTError(f"{path} is damaged; re-save the hybrid model") from None
    for rel, digest in files.items():
        f = folder / rel
        if not f.is_file():
            raise HybridFTError(f"{folder}: {rel} is missing; the folder is incomplete, re-save the hybrid model")
        if _sha256(f) != digest:
            raise HybridFTError(f"{folder}: {rel} does not match its checksum in manifest.json; the folder was "
                                f"modified or corrupted, re-save the hybrid model")


# ---------------------------------------------------------------------------------------------------
# the plot


def plot_curves(curves: dict[str, list[dict[str, float]]], marks: dict[str, dict[str, float]], chosen: dict[str, float],
                path: Path, title: str = "") -> Path:
    """Accuracy against the fraction of inputs sent to the teacher, one line per split; the student alone
    (fraction 0), the teacher alone (fraction 1) and the chosen threshold are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for split, curve in curves.items():
        ax.plot([p["teacher_fraction"] for p in curve], [p["accuracy"] for p in curve], label=f"hybrid ({split})")
    for name, m in marks.items():
        ax.scatter([m["teacher_fraction"]], [m["accuracy"]], zorder=3, label=name)
    ax.axvline(chosen["teacher_fraction"], color="grey", linestyle=":", label="chosen threshold (validation)")
    ax.set_xlabel("fraction of inputs sent to the teacher")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "hybrid: accuracy vs. teacher calls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
