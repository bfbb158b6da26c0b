"""Routing exports: the router's decisions for a fixed token set at one checkpoint.

Dims: L = MoE layers, T = tokens, K = top-k, E = experts.

An export is a directory ``<out>/<name>/`` that contains two files. ``routing.npz``
(uncompressed unless requested) contains these arrays:

- ``expert_indices`` (L, T, K) uint8/int16/int32: the selected experts in rank order.
- ``expert_probs`` (L, T, K) float16/float32: their probabilities from the softmax over
  all E experts.
- ``input_ids`` (T,) int32.
- ``target_ids`` (T,) int32: the next token, or -1 where the sample ends.
- ``domain_ids`` (T,) int16: indices into ``domain_names``.

``meta.json`` contains the format version, name, checkpoint step, L/T/K/E, domain names,
tokenizer, model config, free-form ``extra`` and the dtype and shape of every array.

`write_export` builds the directory under a temporary name and renames it into place, so a
reader never sees a half-written export. `load_export` checks every array against
``meta.json`` and raises `ExportError` naming the file on any missing, truncated or
inconsistent content. docs/analysis.md documents the format.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_NAME = "olmoe-routing-export"
FORMAT_VERSION = 1
ARRAYS_FILE = "routing.npz"
META_FILE = "meta.json"
ARRAY_NAMES = ("expert_indices", "expert_probs", "input_ids", "target_ids", "domain_ids")
PROBS_DTYPES = ("float16", "float32")


class ExportError(ValueError):
    """A routing export that is missing, truncated, malformed or incompatible with another."""


def _expert_index_dtype(num_experts: int) -> np.dtype:
    if num_experts <= 256:
        return np.dtype(np.uint8)
    if num_experts <= 32768:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


@dataclass(eq=False)  # the generated __eq__ cannot compare numpy array fields
class RoutingExport:
    """The routing of T tokens through L MoE layers at one checkpoint.

    Construction validates shapes, dtypes and value ranges and raises `ExportError`
    prefixed with `source` (the file, or the name for an in-memory export).
    """

    name: str
    """Checkpoint label, also the export directory's name."""
    step: int
    """Training step of the checkpoint. Exports of one run are ordered by it."""
    num_experts: int
    """E: routed experts per layer. Stored because an unused expert never appears in the indices."""
    expert_indices: np.ndarray
    """(L, T, K) selected experts in rank order (highest probability first)."""
    expert_probs: np.ndarray
    """(L, T, K) probabilities of the selected experts from the softmax over all E."""
    input_ids: np.ndarray
    """(T,) input token ids."""
    target_ids: np.ndarray
    """(T,) next token ids, -1 for the last token of a sample (no ground-truth next token)."""
    domain_ids: np.ndarray
    """(T,) index into `domain_names` of the domain of each token's sample."""
    domain_names: list[str]
    """Names of the data domains, indexed by `domain_ids`."""
    tokenizer: str | None = None
    """Tokenizer name or path used to produce the token ids."""
    model_config: dict[str, Any] = field(default_factory=dict)
    """The model config as a plain dict (ModelConfig.to_dict())."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serializable metadata (data sources, seeds, ...)."""
    path: Path | None = None
    """Export directory it was loaded from or written to, or None for an in-memory export."""

    def __post_init__(self) -> None:
        self.domain_names = list(self.domain_names)
        _validate(self)

    @property
    def source(self) -> str:
        """The export directory, or the name of an in-memory export, for error messages."""
        return str(self.path) if self.path is not None else f"<export {self.name!r}>"

    @property
    def num_layers(self) -> int:
        return int(self.expert_indices.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.expert_indices.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_indices.shape[2])

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)


def _validate(export: RoutingExport) -> None:
    def fail(message: str) -> None:
        raise ExportError(f"{export.source}: {message}")

    if isinstance(export.step, bool) or not isinstance(export.step, (int, np.integer)):
        fail(f"step={export.step!r} is invalid: must be an integer")
    export.step = int(export.step)
    if export.step < 0:
        fail(f"step={export.step} is invalid: must be >= 0")
    experts = export.num_experts
    if isinstance(experts, bool) or not isinstance(experts, (int, np.integer)) or experts <= 0:
        fail(f"num_experts={experts!r} is invalid: must be a positive integer")
    export.num_experts = int(experts)
    if not export.domain_names:
        fail("domain_names is empty: give at least one domain name")
    if len(set(export.domain_names)) != len(export.domain_names):
        fail(f"domain_names={export.domain_names} contains duplicates")

    indices, probs = export.expert_indices, export.expert_probs
    if not isinstance(indices, np.ndarray) or indices.ndim != 3:
        fail(f"expert_indices must be a 3-d array (L, T, K), got shape {np.shape(indices)}")
    if not np.issubdtype(indices.dtype, np.integer):
        fail(f"expert_indices must have an integer dtype, got {indices.dtype}")
    L, T, K = indices.shape
    if L == 0 or T == 0 or K == 0:
        fail(f"expert_indices has an empty dimension: shape (L, T, K) = {indices.shape}")
    if K > export.num_experts:
        fail(f"top_k={K} (expert_indices.shape[2]) exceeds num_experts={export.num_experts}")
    if not isinstance(probs, np.ndarray) or probs.shape != indices.shape:
        fail(f"expert_probs shape {np.shape(probs)} must equal expert_indices {indices.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        fail(f"expert_probs must have a float dtype, got {probs.dtype}")
    for name in ("input_ids", "target_ids", "domain_ids"):
        array = getattr(export, name)
        if not isinstance(array, np.ndarray) or array.shape != (T,):
            fail(f"{name} shape {np.shape(array)} must be (T,) = ({T},) to match expert_indices")
        if not np.issubdtype(array.dtype, np.integer):
            fail(f"{name} must have an integer dtype, got {array.dtype}")

    # Value ranges. A top-k router produces distinct experts per token and non-increasing
    # probabilities. The saturation and co-activation counts rely on distinct experts.
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= export.num_experts:
        fail(f"expert_indices values span [{low}, {high}], outside [0, {export.num_experts})")
    if K > 1:
        ranked = np.sort(indices, axis=-1)
        repeated = np.nonzero(ranked[..., 1:] == ranked[..., :-1])
        if repeated[0].size:
            layer, token = int(repeated[0][0]), int(repeated[1][0])
            fail(
                f"expert_indices repeats an expert within one token's top-k "
                f"(layer {layer}, token {token}: {indices[layer, token].tolist()})"
            )
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        fail("expert_probs must be finite probabilities in [0, 1]")
    if K > 1 and np.any(probs[..., 1:] > probs[..., :-1]):
        fail("expert_probs must be non-increasing along K (experts in rank order)")
    if export.input_ids.min() < 0:
        fail(f"input_ids contains a negative id {int(export.input_ids.min())}")
    if export.target_ids.min() < -1:
        fail(f"target_ids contains {int(export.target_ids.min())}, but only -1 may mark no target")
    low, high = int(export.domain_ids.min()), int(export.domain_ids.max())
    if low < 0 or high >= export.num_domains:
        fail(
            f"domain_ids values span [{low}, {high}], outside [0, {export.num_domains}) "
            f"for domain_names={export.domain_names}"
        )


def _as_array(value: Any) -> Any:
    # Accept torch tensors and lists without importing torch.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _num_experts_from_config(model_config: dict[str, Any]) -> int | None:
    moe = model_config.get("moe")
    if isinstance(moe, dict) and "num_experts" in moe:
        return int(moe["num_experts"])
    return None


def write_export(
    path: str | os.PathLike,
    *,
    step: int,
    expert_indices: Any,
    expert_probs: Any,
    input_ids: Any,
    target_ids: Any,
    domain_ids: Any,
    domain_names: Sequence[str],
    num_experts: int | None = None,
    model_config: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    extra: dict[str, Any] | None = None,
    probs_dtype: str = "float16",
    compress: bool = False,
    overwrite: bool = False,
) -> RoutingExport:
    """Validate the arrays and write them as the export directory `path`, atomically.

    Arrays may be numpy arrays, torch tensors or nested lists, with the shapes given in
    `RoutingExport`. `num_experts` defaults to ``model_config["moe"]["num_experts"]``.
    `probs_dtype` is "float16" (half the size; relative error at most 2**-11 for values
    above 6.1e-5) or "float32".
    An existing export at `path` raises `FileExistsError` unless `overwrite` is set.
    Returns the written export, with `path` set.
    """
    path = Path(path)
    model_config = dict(model_config or {})
    if num_experts is None:
        num_experts = _num_experts_from_config(model_config)
        if num_experts is None:
            raise ExportError(
                f"{path}: num_experts is missing: pass num_experts or a model_config "
                "with moe.num_experts"
            )
    if probs_dtype not in PROBS_DTYPES:
        raise ExportError(f"{path}: probs_dtype={probs_dtype!r} is invalid: use {PROBS_DTYPES}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True or choose a new name")

    indices = _as_array(expert_indices)
    probs = _as_array(expert_probs)
    if np.issubdtype(indices.dtype, np.integer) and indices.size:
        # Range-check before narrowing the dtype, so an out-of-range id cannot wrap around.
        if int(indices.min()) < 0 or int(indices.max()) >= num_experts:
            raise ExportError(
                f"{path}: expert_indices values span [{int(indices.min())}, "
                f"{int(indices.max())}], outside [0, {num_experts})"
            )
        indices = indices.astype(_expert_index_dtype(num_experts), copy=False)
    if np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(probs_dtype, copy=False)
    export = RoutingExport(
        name=path.name,
        step=step,
        num_experts=num_experts,
        expert_indices=indices,
        expert_probs=probs,
        input_ids=_narrow_ids(_as_array(input_ids), np.int32, path, "input_ids"),
        target_ids=_narrow_ids(_as_array(target_ids), np.int32, path, "target_ids"),
        domain_ids=_narrow_ids(_as_array(domain_ids), np.int16, path, "domain_ids"),
        domain_names=list(domain_names),
        tokenizer=tokenizer,
        model_config=model_config,
        extra=dict(extra or {}),
        path=path,
    )
    _write_directory(export, path, compress=compress, overwrite=overwrite)
    logger.info("Wrote routing export %s (step %d, %d tokens)", path, step, export.num_tokens)
    return export


def _narrow_ids(array: np.ndarray, dtype: type, path: Path, name: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return array  # RoutingExport validation reports the problem.
    info = np.iinfo(dtype)
    if int(array.min()) < info.min or int(array.max()) > info.max:
        raise ExportError(
            f"{path}: {name} values span [{int(array.min())}, {int(array.max())}], "
            f"which does not fit {np.dtype(dtype).name}"
        )
    return array.astype(dtype, copy=False)


def _meta_dict(export: RoutingExport) -> dict[str, Any]:
    arrays = {}
    for name in ARRAY_NAMES:
        array = getattr(export, name)
        arrays[name] = {"dtype": array.dtype.name, "shape": list(array.shape)}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": export.name,
        "step": export.step,
        "num_layers": export.num_layers,
        "num_tokens": export.num_tokens,
        "top_k": export.top_k,
        "num_experts": export.num_experts,
        "domain_names": export.domain_names,
        "tokenizer": export.tokenizer,
        "model_config": export.model_config,
        "extra": export.extra,
        "arrays": arrays,
    }


def _write_directory(export: RoutingExport, path: Path, *, compress: bool, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        meta_text = json.dumps(_meta_dict(export), indent=2) + "\n"
    except (TypeError, ValueError) as error:
        raise ExportError(
            f"{path}: model_config and extra must be JSON-serializable ({error})"
        ) from None
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        # mkdtemp creates the directory with mode 0o700, but exports are meant to be shared.
        os.chmod(temp_dir, 0o755)
        save = np.savez_compressed if compress else np.savez
        with open(temp_dir / ARRAYS_FILE, "wb") as f:
            save(f, **{name: getattr(export, name) for name in ARRAY_NAMES})
            f.flush()
            os.fsync(f.fileno())
        with open(temp_dir / META_FILE, "w", encoding="utf-8") as f:
            f.write(meta_text)
            f.flush()
            os.fsync(f.fileno())

        if path.exists() and overwrite:
            # NOTE: two renames, so between them a reader finds no export at `path`, but it
            # never finds a mix of old and new files.
            old_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old_dir / path.name)
            os.replace(temp_dir, path)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(temp_dir, path)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def load_export(path: str | os.PathLike) -> RoutingExport:
    """Load and validate the export directory `path` (the module docstring gives the format).

    Raises `ExportError` naming the file when a file is missing or truncated, when an
    array is missing, or when an array's dtype or shape disagrees with ``meta.json``.
    """
    path = Path(path)
    meta_path, arrays_path = path / META_FILE, path / ARRAYS_FILE
    if not path.is_dir():
        raise ExportError(f"{path}: export directory not found")
    meta = _read_meta(meta_path)
    arrays = _read_arrays(arrays_path)

    for name in ARRAY_NAMES:
        expected = meta["arrays"].get(name)
        if expected is None:
            raise ExportError(f"{meta_path}: 'arrays' has no entry for {name!r}")
        actual = {"dtype": arrays[name].dtype.name, "shape": list(arrays[name].shape)}
        if actual != {"dtype": expected.get("dtype"), "shape": expected.get("shape")}:
            raise ExportError(
                f"{arrays_path}: array {name!r} has dtype {actual['dtype']} and shape "
                f"{actual['shape']}, but {META_FILE} records {expected}"
            )
    L, T, K = arrays["expert_indices"].shape
    for key, value in (("num_layers", L), ("num_tokens", T), ("top_k", K)):
        if meta.get(key) != value:
            raise ExportError(
                f"{meta_path}: {key}={meta.get(key)!r} disagrees with expert_indices shape "
                f"(L, T, K) = {(L, T, K)}"
            )

    try:
        return RoutingExport(
            name=str(meta.get("name", path.name)),
            step=meta["step"],
            num_experts=meta["num_experts"],
            expert_indices=arrays["expert_indices"],
            expert_probs=arrays["expert_probs"],
            input_ids=arrays["input_ids"],
            target_ids=arrays["target_ids"],
            domain_ids=arrays["domain_ids"],
            domain_names=meta["domain_names"],
            tokenizer=meta.get("tokenizer"),
            model_config=meta.get("model_config") or {},
            extra=meta.get("extra") or {},
            path=path,
        )
    except KeyError as error:
        raise ExportError(f"{meta_path}: required key {error.args[0]!r} is missing") from None


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{meta_path}: file not found (incomplete export?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{meta_path}: invalid JSON ({error}), maybe truncated") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ExportError(f"{meta_path}: not a routing export ('format' is not {FORMAT_NAME!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{meta_path}: format_version={meta.get('format_version')!r} is not supported; "
            f"this code reads version {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("arrays"), dict):
        raise ExportError(f"{meta_path}: required key 'arrays' is missing or not an object")
    return meta


def _read_arrays(arrays_path: Path) -> dict[str, np.ndarray]:
    if not arrays_path.is_file():
        raise ExportError(f"{arrays_path}: file not found (incomplete export?)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(arrays_path, allow_pickle=False) as npz:
            for name in ARRAY_NAMES:
                if name not in npz.files:
                    raise ExportError(f"{arrays_path}: array {name!r} is missing")
                arrays[name] = npz[name]
    except ExportError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ExportError(
            f"{arrays_path}: cannot read ({type(error).__name__}: {error}); "
            "the file is truncated or corrupt, so write the export again"
        ) from None
    return arrays


def load_exports(directory: str | os.PathLike) -> list[RoutingExport]:
    """Load every export under `directory`, sorted by step, and check they are comparable.

    An export is a subdirectory containing ``meta.json`` or ``routing.npz``. Hidden
    subdirectories (temporary files of an interrupted write) and other entries are skipped.
    If `directory` is itself an export, returns just that one. Raises `ExportError` when
    none is found, when one is broken, or when they differ in L, K or E.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: directory not found")
    if (directory / META_FILE).exists() or (directory / ARRAYS_FILE).exists():
        return [load_export(directory)]
    export_dirs = sorted(
        child
        for child in directory.iterdir()
        if child.is_dir()
        and not child.name.startswith(".")
        and ((child / META_FILE).exists() or (child / ARRAYS_FILE).exists())
    )
    if not export_dirs:
        raise ExportError(f"{directory}: no routing exports found (expected <name>/{META_FILE})")
    exports = sorted((load_export(child) for child in export_dirs), key=lambda e: e.step)
    check_compatible(exports)
    return exports


def check_compatible(exports: Sequence[RoutingExport]) -> None:
    """Raise `ExportError` naming both exports unless all have the same L, K and E."""
    if not exports:
        raise ExportError("no exports given: pass at least one RoutingExport")
    reference = exports[0]
    for other in exports[1:]:
        for attribute in ("num_layers", "top_k", "num_experts"):
            expected, actual = getattr(reference, attribute), getattr(other, attribute)
            if expected != actual:
                raise ExportError(
                    f"{other.source}: {attribute}={actual} differs from {attribute}={expected} "
                    f"in {reference.source}; compare exports of the same model only"
                )


def check_same_tokens(export: RoutingExport, reference: RoutingExport) -> None:
    """Raise `ExportError` unless both exports route the same token sequence."""
    check_compatible([reference, export])
    if export.num_tokens != reference.num_tokens:
        raise ExportError(
            f"{export.source}: {export.num_tokens} tokens, but {reference.source} has "
            f"{reference.num_tokens}; export every checkpoint on the same token set"
        )
    if not np.array_equal(export.input_ids, reference.input_ids):
        position = int(np.argmax(export.input_ids != reference.input_ids))
        raise ExportError(
            f"{export.source}: input_ids differ from {reference.source} first at token "
            f"{position}; export every checkpoint on the same token set"
        )
