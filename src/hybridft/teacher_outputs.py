"""The teacher-output store: the teacher runs once over the training text, a summary of what it said goes to
disk, and the student trains from it. See docs/teacher_outputs.md for the format.

Three kinds (format version 2; version-1 files, dense only, still read):
    dense    classification: logits float32 [N, C] per example (4 bytes x classes).
    topk     causal LMs: per target token, the teacher's top-k log-probabilities (fp16) and ids (int32), the
             rest of its mass left implicit (1 - sum). 49,152 floats per token become k pairs.
    sampled  causal LMs: per target token, ids drawn from the teacher's distribution with their counts and
             log-probabilities ("Random-Sampling KD", Anshumann et al., ACL 2025), an unbiased estimator.
Rows are looked up by example key (`hybridft.data.example_key`); token stores keep `offsets` [N+1] into the
token rows, which are read lazily (memory-mapped slices) one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from hybridft.errors import HybridFTError
from hybridft.losses import SparseTargets

FORMAT_V1 = "hybridft.teacher_outputs/1"
FORMAT = "hybridft.teacher_outputs/2"
KINDS = ("dense", "topk", "sampled")


def _key_bytes(keys: list[str]) -> torch.Tensor:
    return torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8).reshape(len(keys), 16)


@dataclass
class Store:
    """A dense store: one row of logits per example."""

    logits: torch.Tensor  # [N, C] float32
    keys: list[str]
    label_names: list[str]
    fingerprint: str
    kind: str = "dense"

    def lookup(self, keys: list[str], source: str) -> torch.Tensor:
        """Logits [len(keys), C] in the order of `keys`; every key must be present."""
        return self.logits[torch.tensor(_rows(self.keys, keys, source), dtype=torch.long)]


@dataclass
class TokenSlice:
    """One example's rows of a token store, read when its batch is built."""

    store: "TokenStore"
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def read(self) -> SparseTargets:
        return self.store.read(self.start, self.end)


@dataclass
class TokenStore:
    """A token store (`topk` or `sampled`): `offsets[i]:offsets[i+1]` are example i's target-token rows."""

    path: Path
    kind: str
    keys: list[str]
    offsets: torch.Tensor  # [N + 1] int64
    k: int
    temperature: float
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    _file: Any = None

    def lookup(self, keys: list[str], source: str) -> list[TokenSlice]:
        rows = _rows(self.keys, keys, source)
        return [TokenSlice(self, int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]

    def read(self, start: int, end: int) -> SparseTargets:
        from safetensors import safe_open

        if self._file is None:  # memory-mapped; slices are read from disk on demand
            self._file = safe_open(str(self.path), framework="pt")
        if self.kind == "topk":
            ids = self._file.get_slice("ids")[start:end].long()
            return SparseTargets(ids, self._file.get_slice("logprobs")[start:end].float())
        # sampled: each token's distinct ids are stored without padding; rows are padded here, per batch
        bounds = self._file.get_slice("entry_offsets")[start:end + 1]
        first, last = int(bounds[0]), int(bounds[-1])
        flat = {name: self._file.get_slice(name)[first:last] for name in ("ids", "counts", "logprobs")}
        sizes = (bounds[1:] - bounds[:-1]).tolist()
        width = max(sizes, default=0) or 1
        out = {"ids": torch.full((len(sizes), width), -1, dtype=torch.long),
               "counts": torch.zeros((len(sizes), width), dtype=torch.long),
               "logprobs": torch.zeros((len(sizes), width))}
        rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
        cols = torch.arange(last - first) - torch.repeat_interleave(bounds[:-1] - first, torch.tensor(sizes))
        for name, values in flat.items():
            out[name][rows, cols] = values.to(out[name].dtype)
        return SparseTargets(out["ids"], out["logprobs"], out["counts"])

    def __getstate__(self) -> dict[str, Any]:  # the open file handle does not cross processes
        return {**self.__dict__, "_file": None}


def _rows(stored: list[str], wanted: list[str], source: str) -> list[int]:
    row = {k: i for i, k in enumerate(stored)}
    missing = [i for i, k in enumerate(wanted) if k not in row]
    if missing:
        raise HybridFTError(f"the teacher-output store has no outputs for {len(missing)} of {len(wanted)} "
                            f"examples of {source} (first: row {missing[0] + 1}); recompute it for this data")
    return [row[k] for k in wanted]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    from hybridft.fileperm import follow_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    follow_umask(tmp)
    os.replace(tmp, path)
    return path


def check_not_probabilities(logits: torch.Tensor, source: str) -> None:
    """Refuse softmax outputs given as logits: every row in [0, 1] and summing to 1. Read as logits they are a
    near-uniform teacher (softmax of values in [0, 1]), and the student learns almost nothing from them."""
    if len(logits) and logits.shape[-1] > 1 and bool((logits >= 0).all()) and bool(
            torch.allclose(logits.sum(-1), torch.ones(len(logits)), atol=1e-3)):
        raise HybridFTError(f"{source}: every row of the teacher outputs is in [0, 1] and sums to 1: probabilities, "
                            f"not logits; store logits, or torch.log(probabilities)")


def write_store(path: str | Path, keys: list[str], logits: torch.Tensor, label_names: list[str],
                fingerprint: str = "external") -> Path:
    """Write a dense store atomically (temporary file, then rename). logits: [N, C] with C = len(label_names).
    Raises HybridFTError for a wrong shape, or for probabilities given as logits."""
    logits = logits.detach().float().cpu().contiguous()
    check_not_probabilities(logits, "write_store")
    if logits.ndim != 2 or logits.shape[0] != len(keys) or logits.shape[1] != len(label_names):
        raise HybridFTError(f"teacher logits have shape {tuple(logits.shape)}, expected ({len(keys)}, "
                            f"{len(label_names)}) for {len(keys)} examples and {len(label_names)} labels")
    return _atomic_save({"logits": logits, "keys": _key_bytes(keys)}, Path(path),
                        {"format": FORMAT, "kind": "dense", "label_names": json.dumps(label_names),
                         "fingerprint": fingerprint})


def write_token_store(path: str | Path, keys: list[str], rows: list[SparseTargets], kind: str,
                      temperature: float, fingerprint: str = "external",
                      meta: Optional[dict[str, Any]] = None) -> Path:
    """Write a `topk` or `sampled` store: `rows[i]` holds example i's target-token rows ([T_i, k] each).

    Sizes on disk per entry: id int32 (4 bytes), log-probability fp16 (2), count int16 (2, sampled only). A
    sampled row keeps only the distinct ids drawn (padding dropped; `entry_offsets` [sum T_i + 1] marks each
    token's entries). `temperature` is the one the log-probabilities were taken at (the KD temperature).
    """
    if kind not in ("topk", "sampled"):
        raise ValueError(f"kind must be topk or sampled, got {kind}")
    if len(rows) != len(keys):
        raise HybridFTError(f"{len(rows)} rows of teacher outputs for {len(keys)} examples")
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(r.ids) for r in rows], dtype=torch.int64), 0)
    ids = torch.cat([r.ids for r in rows])
    logprobs = torch.cat([r.logprobs for r in rows])
    k = ids.shape[-1]
    tensors = {"keys": _key_bytes(keys), "offsets": offsets}
    if kind == "sampled":
        counts = torch.cat([r.counts for r in rows])  # type: ignore[misc]
        keep = counts > 0  # padding (id -1, count 0) is not written
        entry_offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
        entry_offsets[1:] = torch.cumsum(keep.sum(-1), 0)
        ids, logprobs = ids[keep], logprobs[keep]
        tensors.update(entry_offsets=entry_offsets, counts=counts[keep].to(torch.int16).contiguous())
    tensors.update(ids=ids.to(torch.int32).contiguous(), logprobs=logprobs.to(torch.float16).contiguous())
    metadata = {"format": FORMAT, "kind": kind, "k": str(k), "temperature": repr(float(temperature)),
                "fingerprint": fingerprint, "meta": json.dumps(meta or {})}
    return _atomic_save(tensors, Path(path), metadata)


def read_store(path: str | Path) -> Store | TokenStore:
    """Read a store of any kind. Dense logits are loaded; token rows stay on disk until a batch needs them."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HybridFTError(f"teacher-output store not found: {path}; check distill.teacher_logits")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            kind = meta.get("kind", "dense")
            key_bytes = f.get_tensor("keys")
            if kind == "dense":
                logits = f.get_tensor("logits")
            else:
                offsets = f.get_tensor("offsets")
    except (SafetensorError, OSError, KeyError) as e:
        raise HybridFTError(f"{path} is not a teacher-output store ({e}); see docs/teacher_outputs.md") from None
    if meta.get("format") not in (FORMAT, FORMAT_V1) or kind not in KINDS:
        raise HybridFTError(f"{path} has format {meta.get('format')!r} (kind {kind!r}), expected {FORMAT!r}; "
                            f"see docs/teacher_outputs.md")
    keys = [bytes(row).hex() for row in key_bytes.tolist()]
    if kind == "dense":
        if not torch.isfinite(logits).all():
            bad = int((~torch.isfinite(logits)).any(-1).sum())
            raise HybridFTError(f"{path}: {bad} rows of teacher logits are NaN or infinite; recompute them")
        check_not_probabilities(logits, str(path))
        return Store(logits=logits.float(), keys=keys, label_names=json.loads(meta["label_names"]),
                     fingerprint=meta.get("fingerprint", ""))
    needed = {"ids", "logprobs"} | ({"counts", "entry_offsets"} if kind == "sampled" else set())
    if not needed <= names or len(offsets) != len(keys) + 1:
        raise HybridFTError(f"{path}: a {kind} store needs tensors {sorted(needed)} and offsets for every key; "
                            f"recompute it")
    return TokenStore(path=path, kind=kind, keys=keys, offsets=offsets, k=int(meta["k"]),
                      temperature=float(meta["temperature"]), fingerprint=meta.get("fingerprint", ""),
                      meta=json.loads(meta.get("meta", "{}")))


# ---------------------------------------------------------------------------------------------------
# fingerprint and cache

_file_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _file_hashes:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _file_hashes[memo] = h.hexdigest()
    return _file_hashes[memo]


def folder_digest(folder: str | Path) -> str:
    """What a saved model folder holds: the names and SHA-256 of its files (weights, config, tokenizer).

    Hashing the files costs a read at disk speed; hashing the tensors would convert every weight to float32
    first. A folder that is not on disk (a hub id) is identified by its name."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"name:{folder}"
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.relative_to(folder)}={file_sha256(f)};".encode())
    return h.hexdigest()


def fingerprint(teacher_folder: str | Path, tokenizer: Any, settings: str, keys: list[str]) -> str:
    """What the stored outputs depend on: the teacher folder's files, the tokenizer, the settings that change
    the outputs (max_length, precision, kind, k, temperature, ...) and the examples, in order."""
    h = hashlib.sha256()
    h.update(folder_digest(teacher_folder).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(settings.encode())
    for k in keys:
        h.update(k.encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDFT_CACHE", Path.home() / ".cache" / "hybridft")) / "teacher_outputs"


# ---------------------------------------------------------------------------------------------------
# running the teacher once


MIN_BATCHES_TO_TIME = 20
"""The store pass times prepacked weights only when it has at least this many batches. The timing runs the first
batch 8 times (a warm-up and 3 timed passes, plain and packed), and prepacking saves at most about half of each
later batch (1.9x for MiniLM): below about 17 batches the timing costs more than it can save. Measured: 48
SmolLM2 examples, one batch, took 11 s to store and 106 s to time."""


def _packed_in_fp32(teacher: nn.Module, batches: Any, device: torch.device, precision: str,
                    summarise: Callable[[nn.Module, dict[str, Any]], list[Any]]) -> Any:
    """`packed_if_faster` timed on the first of `batches` in fp32 on a CPU when there are `MIN_BATCHES_TO_TIME` of
    them; otherwise a context that does nothing."""
    from contextlib import nullcontext

    from hybridft.batching import to_device
    from hybridft.packed_linear import median_ms, packed_if_faster

    if precision != "fp32" or device.type != "cpu" or len(batches) < MIN_BATCHES_TO_TIME:
        return nullcontext()
    first = next(iter(batches), None)
    if first is None:
        return nullcontext()
    first = to_device(first, device)

    return packed_if_faster(teacher, device, lambda model: median_ms(lambda: summarise(model, first)))


@torch.no_grad()
def compute(teacher: nn.Module, items: list[dict[str, Any]], collate: Any, device: torch.device, precision: str,
            summarise: Callable[[nn.Module, dict[str, Any]], list[Any]], batch_size: int = 64,
            progress: bool = False) -> list[Any]:
    """The teacher's summary of every item, in item order: `summarise(teacher, batch)` returns one object per
    row of the batch (a logits row, or a token summary). Items are batched by length so that dynamic padding
    wastes little work. Under several processes each computes every `world`-th batch and all processes
    receive the merged result. In fp32 on a CPU the teacher runs from oneDNN-prepacked weights where one timed
    batch shows it faster, when the pass has `MIN_BATCHES_TO_TIME` batches (`hybridft.packed_linear`; 1.9x for all-MiniLM-L6-v2 at 32 x 64 tokens); under bf16
    autocast it runs as it is (autocast does not reach packed layers)."""
    from hybridft import dist
    from hybridft.batching import to_device
    from hybridft.progress import progress_bar

    rank, world = dist.rank_and_world()
    teacher.to(device).eval()
    by_length = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    # whole length-sorted batches per process, so each process pads as little as one process would
    order = [i for b, start in enumerate(range(0, len(by_length), batch_size)) if b % world == rank
             for i in by_length[start:start + batch_size]]
    out: list[Any] = [None] * len(items)
    batches = DataLoader([items[i] for i in order], batch_size=batch_size, collate_fn=collate)
    done = 0
    with _packed_in_fp32(teacher, batches, device, precision, summarise), \
            progress_bar(len(batches), "teacher outputs", progress, unit="batch") as bar:
        for batch in batches:
            batch = to_device(batch, device)
            with dist.autocast(device, precision):
                rows = summarise(teacher, batch)
            for j, row in enumerate(rows):
                out[order[done + j]] = row
            done += len(rows)
            bar.update(1)
    if world > 1:
        for part_order, part in dist.gather_objects((order, [out[i] for i in order])):
            for i, row in zip(part_order, part):
                out[i] = row
    return out
