"""Export format: round trip, atomic writes, validation and broken-file errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from olmoe.analysis import (
    ExportError,
    check_same_tokens,
    load_export,
    load_exports,
    write_export,
)
from olmoe.analysis.export import ARRAYS_FILE, META_FILE


def _arrays(seed: int = 0, L: int = 2, T: int = 50, K: int = 3, E: int = 8):
    rng = np.random.default_rng(seed)
    indices = np.argsort(rng.random((L, T, E)), axis=-1)[..., :K]
    probs = -np.sort(-rng.random((L, T, K)) / K, axis=-1)
    input_ids = rng.integers(0, 1000, T)
    return dict(
        expert_indices=indices,
        expert_probs=probs,
        input_ids=input_ids,
        target_ids=np.append(input_ids[1:], -1),
        domain_ids=rng.integers(0, 2, T),
        domain_names=["web", "code"],
    )


def _write(path, step: int = 7, **overrides):
    arrays = _arrays()
    arrays.update(overrides)
    num_experts = arrays.pop("num_experts", 8)
    return write_export(path, step=step, num_experts=num_experts, **arrays)


def _hidden_entries(directory):
    return [entry.name for entry in directory.iterdir() if entry.name.startswith(".")]


def test_roundtrip_preserves_arrays_and_meta(tmp_path):
    arrays = _arrays()
    config = {"n_layers": 2, "moe": {"num_experts": 8, "top_k": 3}}
    write_export(
        tmp_path / "ckpt",
        step=123,
        model_config=config,
        tokenizer="allenai/gpt-neox-olmo-dolma-v1_5",
        extra={"seed": 1},
        **arrays,
    )
    export = load_export(tmp_path / "ckpt")

    assert export.name == "ckpt"
    assert export.step == 123
    assert export.num_experts == 8
    assert (export.num_layers, export.num_tokens, export.top_k) == (2, 50, 3)
    assert export.domain_names == ["web", "code"]
    assert export.tokenizer == "allenai/gpt-neox-olmo-dolma-v1_5"
    assert export.model_config == config
    assert export.extra == {"seed": 1}
    assert export.path == tmp_path / "ckpt"
    np.testing.assert_array_equal(export.expert_indices, arrays["expert_indices"])
    np.testing.assert_array_equal(export.input_ids, arrays["input_ids"])
    np.testing.assert_array_equal(export.target_ids, arrays["target_ids"])
    np.testing.assert_array_equal(export.domain_ids, arrays["domain_ids"])
    # float16 keeps 11 significant bits: relative error <= 2**-11.
    np.testing.assert_allclose(export.expert_probs, arrays["expert_probs"], rtol=2**-11, atol=1e-7)


def test_roundtrip_dtypes(tmp_path):
    export = load_export(_write(tmp_path / "a").path)

    assert export.expert_indices.dtype == np.uint8
    assert export.expert_probs.dtype == np.float16
    assert export.input_ids.dtype == np.int32
    assert export.target_ids.dtype == np.int32
    assert export.domain_ids.dtype == np.int16


def test_float32_probs_and_int16_indices_for_many_experts(tmp_path):
    arrays = _arrays(E=300)
    write_export(tmp_path / "a", step=0, num_experts=300, probs_dtype="float32", **arrays)
    export = load_export(tmp_path / "a")

    assert export.expert_indices.dtype == np.int16
    assert export.expert_probs.dtype == np.float32
    np.testing.assert_array_equal(export.expert_indices, arrays["expert_indices"])
    np.testing.assert_array_equal(export.expert_probs, arrays["expert_probs"].astype(np.float32))


def test_compressed_export_loads(tmp_path):
    arrays = _arrays()
    write_export(tmp_path / "a", step=0, num_experts=8, compress=True, **arrays)

    np.testing.assert_array_equal(
        load_export(tmp_path / "a").expert_indices, arrays["expert_indices"]
    )


def test_num_experts_from_model_config(tmp_path):
    export = write_export(
        tmp_path / "a", step=0, model_config={"moe": {"num_experts": 8}}, **_arrays()
    )

    assert export.num_experts == 8


def test_missing_num_experts_raises(tmp_path):
    with pytest.raises(ExportError, match="num_experts is missing"):
        write_export(tmp_path / "a", step=0, **_arrays())


def test_torch_tensors_accepted(tmp_path):
    arrays = _arrays()
    tensors = {
        key: torch.from_numpy(np.asarray(value)) if key != "domain_names" else value
        for key, value in arrays.items()
    }
    export = write_export(tmp_path / "a", step=0, num_experts=8, **tensors)

    np.testing.assert_array_equal(export.expert_indices, arrays["expert_indices"])


def test_write_leaves_no_temporary_files(tmp_path):
    _write(tmp_path / "a")

    assert _hidden_entries(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ARRAYS_FILE, META_FILE])


def test_export_directory_is_readable_by_others(tmp_path):
    path = _write(tmp_path / "a").path

    assert path.stat().st_mode & 0o755 == 0o755


def test_existing_export_not_overwritten_by_default(tmp_path):
    _write(tmp_path / "a", step=1)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(tmp_path / "a", step=2)
    assert load_export(tmp_path / "a").step == 1


def test_overwrite_replaces_export(tmp_path):
    _write(tmp_path / "a", step=1)
    _write(tmp_path / "a", step=2, overwrite=True)

    assert load_export(tmp_path / "a").step == 2
    assert _hidden_entries(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path):
    bad = _arrays()["expert_indices"].copy()
    bad[0, 0, 1] = bad[0, 0, 0]

    with pytest.raises(ExportError, match="repeats an expert"):
        _write(tmp_path / "a", expert_indices=bad)
    assert not (tmp_path / "a").exists()
    assert _hidden_entries(tmp_path) == []


def _replace(arrays: dict, key: str, value) -> dict:
    arrays = dict(arrays)
    arrays[key] = value
    return arrays


INVALID_CASES = {
    "expert id too large": (
        lambda a: _replace(
            a, "expert_indices", np.where(a["expert_indices"] == 0, 8, a["expert_indices"])
        ),
        r"expert_indices values span \[1, 8\], outside \[0, 8\)",
    ),
    "negative expert id": (
        lambda a: _replace(a, "expert_indices", a["expert_indices"] - 1),
        r"expert_indices values span \[-1, 6\]",
    ),
    "probs increase along K": (
        lambda a: _replace(a, "expert_probs", a["expert_probs"][..., ::-1]),
        "non-increasing along K",
    ),
    "probs above 1": (
        lambda a: _replace(a, "expert_probs", a["expert_probs"] + 2.0),
        r"finite probabilities in \[0, 1\]",
    ),
    "probs shape": (
        lambda a: _replace(a, "expert_probs", a["expert_probs"][:, :, :2]),
        r"expert_probs shape \(2, 50, 2\) must equal expert_indices \(2, 50, 3\)",
    ),
    "input_ids length": (
        lambda a: _replace(a, "input_ids", a["input_ids"][:-1]),
        r"input_ids shape \(49,\) must be \(T,\) = \(50,\)",
    ),
    "target below -1": (
        lambda a: _replace(a, "target_ids", np.full(50, -2)),
        "only -1 may mark no target",
    ),
    "domain id out of range": (
        lambda a: _replace(a, "domain_ids", np.full(50, 2)),
        r"domain_ids values span \[2, 2\], outside \[0, 2\)",
    ),
    "float expert ids": (
        lambda a: _replace(a, "expert_indices", a["expert_indices"].astype(np.float32)),
        "expert_indices must have an integer dtype",
    ),
    "two-dimensional indices": (
        lambda a: _replace(a, "expert_indices", a["expert_indices"][0]),
        r"3-d array \(L, T, K\)",
    ),
    "duplicate domain names": (
        lambda a: _replace(a, "domain_names", ["web", "web"]),
        "contains duplicates",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_CASES), ids=list(INVALID_CASES))
def test_invalid_arrays_raise(tmp_path, case):
    mutate, message = INVALID_CASES[case]
    arrays = mutate(_arrays())

    with pytest.raises(ExportError, match=message) as error:
        write_export(tmp_path / "bad", step=0, num_experts=8, **arrays)
    assert str(tmp_path / "bad") in str(error.value)
    assert not (tmp_path / "bad").exists()


def test_top_k_above_num_experts_raises(tmp_path):
    with pytest.raises(ExportError, match="top_k=3 .* exceeds num_experts=2"):
        _write(tmp_path / "a", num_experts=2, expert_indices=np.zeros((2, 50, 3), np.int64))


def test_truncated_arrays_file_names_file(tmp_path):
    path = _write(tmp_path / "a").path / ARRAYS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ExportError, match=re.escape(str(path))) as error:
        load_export(tmp_path / "a")
    assert "truncated or corrupt" in str(error.value)


def test_missing_arrays_file_names_file(tmp_path):
    path = _write(tmp_path / "a").path / ARRAYS_FILE
    path.unlink()

    with pytest.raises(ExportError, match=re.escape(f"{path}: file not found")):
        load_export(tmp_path / "a")


def test_missing_meta_names_file(tmp_path):
    path = _write(tmp_path / "a").path / META_FILE
    path.unlink()

    with pytest.raises(ExportError, match=re.escape(f"{path}: file not found")):
        load_export(tmp_path / "a")


def test_truncated_meta_names_file(tmp_path):
    path = _write(tmp_path / "a").path / META_FILE
    path.write_text(path.read_text()[:40])

    with pytest.raises(ExportError, match=re.escape(f"{path}: invalid JSON")):
        load_export(tmp_path / "a")


def test_missing_array_names_file_and_array(tmp_path):
    export = _write(tmp_path / "a")
    path = export.path / ARRAYS_FILE
    with open(path, "wb") as f:
        np.savez(f, expert_indices=export.expert_indices, expert_probs=export.expert_probs)

    with pytest.raises(ExportError, match=re.escape(f"{path}: array 'input_ids' is missing")):
        load_export(tmp_path / "a")


def test_array_shape_disagreeing_with_meta_raises(tmp_path):
    export = _write(tmp_path / "a")
    path = export.path / ARRAYS_FILE
    arrays = {name: getattr(export, name) for name in ("expert_probs", "input_ids")}
    arrays.update(target_ids=export.target_ids, domain_ids=export.domain_ids)
    with open(path, "wb") as f:
        np.savez(f, expert_indices=export.expert_indices[:1], **arrays)

    with pytest.raises(ExportError, match=re.escape(f"{path}: array 'expert_indices'")):
        load_export(tmp_path / "a")


def test_meta_count_disagreeing_with_arrays_raises(tmp_path):
    path = _write(tmp_path / "a").path / META_FILE
    meta = json.loads(path.read_text())
    meta["top_k"] = 4
    path.write_text(json.dumps(meta))

    with pytest.raises(ExportError, match=re.escape(f"{path}: top_k=4 disagrees")):
        load_export(tmp_path / "a")


def test_unsupported_format_version_raises(tmp_path):
    path = _write(tmp_path / "a").path / META_FILE
    meta = json.loads(path.read_text())
    meta["format_version"] = 99
    path.write_text(json.dumps(meta))

    with pytest.raises(ExportError, match="format_version=99 is not supported"):
        load_export(tmp_path / "a")


def test_load_exports_sorted_by_step(tmp_path):
    _write(tmp_path / "b_late", step=300)
    _write(tmp_path / "a_early", step=5)
    _write(tmp_path / "c_middle", step=40)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes.txt").write_text("not an export")

    exports = load_exports(tmp_path)

    assert [export.step for export in exports] == [5, 40, 300]
    assert [export.name for export in exports] == ["a_early", "c_middle", "b_late"]


def test_load_exports_skips_interrupted_write(tmp_path):
    _write(tmp_path / "a", step=1)
    leftover = tmp_path / ".b.tmp-1234"
    leftover.mkdir()
    (leftover / ARRAYS_FILE).write_bytes(b"PK\x03\x04partial")

    assert [export.name for export in load_exports(tmp_path)] == ["a"]


def test_load_exports_of_single_export_dir(tmp_path):
    _write(tmp_path / "a", step=1)

    assert [export.name for export in load_exports(tmp_path / "a")] == ["a"]


def test_load_exports_empty_dir_raises(tmp_path):
    with pytest.raises(ExportError, match="no routing exports found"):
        load_exports(tmp_path)


def test_load_exports_different_layer_count_names_file(tmp_path):
    _write(tmp_path / "a", step=1)
    arrays = _arrays(L=3)
    write_export(tmp_path / "b", step=2, num_experts=8, **arrays)

    with pytest.raises(ExportError, match="num_layers=3 differs from num_layers=2") as error:
        load_exports(tmp_path)
    assert str(tmp_path / "b") in str(error.value)
    assert str(tmp_path / "a") in str(error.value)


def test_load_exports_different_top_k_names_file(tmp_path):
    _write(tmp_path / "a", step=1)
    write_export(tmp_path / "b", step=2, num_experts=8, **_arrays(K=2))

    with pytest.raises(ExportError, match="top_k=2 differs from top_k=3") as error:
        load_exports(tmp_path)
    assert str(tmp_path / "b") in str(error.value)


def test_load_exports_truncated_member_names_file(tmp_path):
    _write(tmp_path / "a", step=1)
    path = _write(tmp_path / "b", step=2).path / ARRAYS_FILE
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(ExportError, match=re.escape(str(path))):
        load_exports(tmp_path)


def test_check_same_tokens_names_both_exports(tmp_path):
    first = _write(tmp_path / "a", step=1)
    second = _write(tmp_path / "b", step=2, input_ids=_arrays(seed=1)["input_ids"])

    with pytest.raises(ExportError, match="input_ids differ") as error:
        check_same_tokens(second, first)
    assert str(first.path) in str(error.value)
    assert str(second.path) in str(error.value)


def test_unserializable_extra_raises(tmp_path):
    with pytest.raises(ExportError, match="must be JSON-serializable"):
        _write(tmp_path / "a", extra={"array": np.zeros(2)})
    assert not (tmp_path / "a").exists()
