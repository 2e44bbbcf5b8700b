"""Checkpoints: exact round trip of weights and masks, strict loading, fallback, no pickle."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import gnp
from daemon.registry import (
    CheckpointError, ModelRegistry, ModelVersion, NoModelError, ServedModel, UpdateCost,
)

SHAPE = (1, 8, 8)


def _registry(tmp_path, **kw) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", "lenet-300-100", SHAPE, 10, **kw)


def _trained_like_model(seed: int) -> torch.nn.Module:
    """A gnp model with random weights and random (partly pruned) masks."""
    torch.manual_seed(seed)
    model = gnp.build_model("lenet-300-100", SHAPE, 10)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("_mask"):
                t.copy_((torch.rand_like(t.float()) > 0.5).to(t.dtype))
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


def _meta(**kw) -> ModelVersion:
    base = dict(version=0, parent=None, created=0.0, model_name="", input_shape=(),
                num_classes=0, chunk_ids=("c1",), seen_chunk_ids=("c1",),
                offsets={"c1": {"0": (0, 99)}}, val_accuracy=0.75, active_params=10,
                dense_params=20, cost=UpdateCost(1000, 2.5, 1.25, "cpu"))
    base.update(kw)
    return ModelVersion(**base)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_keeps_weights_masks_and_metadata(tmp_path):
    reg = _registry(tmp_path)
    model = _trained_like_model(0)
    assert any(k.endswith("_mask") for k in model.state_dict())
    saved = reg.save(model, _meta())

    assert saved.version == 1 and saved.created > 0
    assert (reg.path / "v000001.safetensors").is_file() and (reg.path / "v000001.json").is_file()
    loaded, version = reg.latest()
    _assert_same_state(model, loaded)
    assert not loaded.training
    assert version == saved
    assert version.offsets == {"c1": {"0": (0, 99)}} and version.cost.epochs == 2.5
    # The header carries string metadata identifying the checkpoint.
    with safetensors.safe_open(reg.path / "v000001.safetensors", "pt") as f:
        header = f.metadata()
    assert header["format"] == "gnpd-checkpoint/1" and header["version"] == "1"
    assert json.loads(header["input_shape"]) == list(SHAPE)
    x = torch.rand(5, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_versions_count_up_and_history_lists_them(tmp_path):
    reg = _registry(tmp_path)
    assert reg.latest() is None and reg.history() == []
    v1 = reg.save(_trained_like_model(1), _meta())
    v2 = reg.save(_trained_like_model(2), _meta(parent=1, val_accuracy=0.8))
    assert [v.version for v in reg.history()] == [1, 2]
    assert reg.history()[1].parent == 1 and reg.history()[1].val_accuracy == 0.8
    assert reg.latest()[1] == v2 != v1


def test_load_is_strict_about_missing_and_unexpected_tensors(tmp_path):
    reg = _registry(tmp_path)
    reg.save(_trained_like_model(1), _meta())
    v2 = reg.save(_trained_like_model(2), _meta(parent=1))
    tensors = safetensors.torch.load((reg.path / "v000002.safetensors").read_bytes())
    for bad in ({k: v for k, v in tensors.items() if not k.endswith("_mask")},
                {**tensors, "extra.weight": torch.zeros(3)}):
        blob = safetensors.torch.save(bad)
        (reg.path / "v000002.safetensors").write_bytes(blob)
        meta = json.loads((reg.path / "v000002.json").read_text())
        meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        (reg.path / "v000002.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="cannot load"):
            reg.load(2)
        assert reg.latest()[1].version == 1
    assert v2.version == 2


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_byte", "garbage_json",
                                    "weights_only", "json_only", "temp_files"])
def test_corrupt_or_incomplete_latest_falls_back_to_previous(tmp_path, damage):
    reg = _registry(tmp_path)
    first = _trained_like_model(1)
    reg.save(first, _meta())
    reg.save(_trained_like_model(2), _meta(parent=1))
    w, j = reg.path / "v000002.safetensors", reg.path / "v000002.json"
    if damage == "truncate_weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "flip_byte":
        blob = bytearray(w.read_bytes())
        blob[-10] ^= 0xFF
        w.write_bytes(bytes(blob))
    elif damage == "garbage_json":
        j.write_text('{"version": 2, "par')
    elif damage == "weights_only":  # killed between the two renames
        j.unlink()
    elif damage == "json_only":
        w.unlink()
    elif damage == "temp_files":  # killed while writing: only temp files exist
        w.rename(reg.path / "v000002.safetensors.tmp")
        j.rename(reg.path / "v000002.json.tmp")

    model, version = reg.latest()
    assert version.version == 1
    _assert_same_state(first, model)
    # A new save never overwrites the damaged number.
    assert reg.save(_trained_like_model(3), _meta(parent=1)).version == 3
    assert reg.latest()[1].version == 3


def test_architecture_mismatch_is_refused(tmp_path):
    _registry(tmp_path).save(_trained_like_model(1), _meta())
    other = ModelRegistry(tmp_path / "models", "lenet-300-100", SHAPE, 5)
    with pytest.raises(CheckpointError, match="architecture"):
        other.load(1)
    assert other.latest() is None


def test_loading_never_unpickles(tmp_path, monkeypatch):
    reg = _registry(tmp_path)
    model = _trained_like_model(1)
    reg.save(model, _meta())

    def forbidden(*a, **k):
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded, _ = reg.latest()
    _assert_same_state(model, loaded)
    # The weights file is a safetensors file: an 8-byte length then a JSON header.
    raw = (reg.path / "v000001.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + n])["__metadata__"]["format"] == "gnpd-checkpoint/1"


def test_served_model_predicts_with_the_published_version(tmp_path):
    served = ServedModel(SHAPE)
    with pytest.raises(NoModelError):
        served.predict(np.zeros((1, 64), np.float32))
    reg = _registry(tmp_path)
    model = _trained_like_model(4)
    served.publish(model, reg.save(model, _meta()))
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    labels, probs, version = served.predict(x)
    assert version == 1 and labels.shape == (3,) and probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        expected = model(torch.from_numpy(x).reshape(3, *SHAPE)).argmax(1).numpy()
    np.testing.assert_array_equal(labels, expected)
    assert served.predict(x.reshape(3, *SHAPE)).labels.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="shape"):
        served.predict(np.zeros((2, 63), np.float32))


def test_prune_keeps_the_newest_and_the_protected_versions(tmp_path):
    reg = _registry(tmp_path)
    for i in range(5):
        reg.save(_trained_like_model(i), _meta())
    assert reg.prune(keep=2, protect={1}) == [2, 3]
    assert [v.version for v in reg.history()] == [1, 4, 5]
    assert sorted(p.name for p in reg.path.iterdir()) == [
        f"v{n:06d}.{ext}" for n in (1, 4, 5) for ext in ("json", "safetensors")]
    assert reg.save(_trained_like_model(9), _meta()).version == 6  # numbers never reused
    with pytest.raises(ValueError, match="keep"):
        reg.prune(keep=0)


def test_clean_removes_temp_files_left_by_a_crash(tmp_path):
    reg = _registry(tmp_path)
    reg.save(_trained_like_model(0), _meta())
    (reg.path / "v000002.safetensors.tmp").write_bytes(b"half")
    (reg.path / "v000002.json.tmp").write_text("{")
    assert {p.name for p in reg.clean()} == {"v000002.safetensors.tmp", "v000002.json.tmp"}
    assert sorted(p.name for p in reg.path.iterdir()) == ["v000001.json", "v000001.safetensors"]


SAVE_UNDER_FILE_LIMIT = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
import gnp
from daemon.registry import ModelRegistry, ModelVersion
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
reg = ModelRegistry(sys.argv[1], "lenet-300-100", (1, 8, 8), 10)
meta = ModelVersion(version=0, parent=None, created=0.0, model_name="", input_shape=(),
                    num_classes=0)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
try:
    reg.save(gnp.build_model("lenet-300-100", (1, 8, 8), 10), meta)
except OSError as e:
    print("OSError", e.errno)
"""


def test_a_failed_save_leaves_no_temp_file_and_no_version(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", SAVE_UNDER_FILE_LIMIT, str(tmp_path / "m"),
                           repo], capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("OSError 27"), proc.stdout + proc.stderr  # EFBIG
    assert list((tmp_path / "m").iterdir()) == []


def test_a_cgap_model_with_unit_masks_round_trips(tmp_path):
    from gnp.units import UnitMasks, seed_units
    reg = _registry(tmp_path)
    model = reg.build()
    seed_units(UnitMasks.attach(model), gnp.Masks(model), 0.3, torch.Generator().manual_seed(0))
    reg.save(model, _meta())
    loaded, _ = reg.latest()
    _assert_same_state(model, loaded)
    assert UnitMasks(loaded).counts() == UnitMasks(model).counts()


def test_a_resnet_cgap_checkpoint_from_before_stream_units_loads_with_the_stream_whole(tmp_path):
    """ResNet-18's residual stream became a unit group after cgap checkpoints were written
    with unit masks on the blocks' inner channels only: such a checkpoint still loads."""
    from gnp.units import UnitMasks, seed_units
    reg = ModelRegistry(tmp_path / "models", "resnet-18", (1, 8, 8), 10)
    model = reg.build()
    units = UnitMasks.attach(model)
    seed_units(units, gnp.Masks(model), 0.5, torch.Generator().manual_seed(0))
    streams = [g for g in units if g.tied]
    assert len(streams) == 4
    for g in streams:  # as before: the stream whole
        g.mask.fill_(True)
    units.sync(gnp.Masks(model))
    old = {k: v for k, v in model.state_dict().items()
           if not any(k == f"{g.name}.unit_mask" for g in streams)}
    loaded = reg.build_for(old)
    loaded.load_state_dict(old, strict=True)
    _assert_same_state(model, loaded)
    assert all(UnitMasks(loaded).counts()[g.name] == (len(g), len(g)) for g in streams)
