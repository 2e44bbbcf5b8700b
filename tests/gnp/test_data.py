import gzip

import numpy as np
import pytest
import torch

import gnp
from gnp.data import ChunkedData, Data, load_dataset, place


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_mnist(root, n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = rng.integers(0, 10, n)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
        files[split] = (images, labels)
    return files


def test_mnist_loader_reads_the_official_idx_files(tmp_path):
    written = _write_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path)
    assert ds.name == "mnist" and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert len(ds.train) == 30 and len(ds.test) == 10
    images, labels = written["train"]
    assert torch.allclose(ds.train.x[:, 0], torch.tensor(images / 255.0, dtype=torch.float32))
    assert ds.train.y.tolist() == labels.tolist() and ds.train.y.dtype == torch.int64


def test_mnist_loader_names_what_is_missing_or_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        load_dataset("mnist")  # nothing is downloaded
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(3))  # truncated body
    with pytest.raises(ValueError, match="header"):
        load_dataset("mnist", tmp_path)


def test_chunked_data_gathers_like_the_concatenation_and_is_streamed_over_budget():
    parts = [Data(torch.randn(n, 1, 4, 4), torch.randint(0, 3, (n,))) for n in (5, 9, 2)]
    chunked, whole = ChunkedData(parts), Data.concat(parts)
    idx = torch.tensor([15, 0, 5, 13, 14, 4, 7])
    for a, b in zip(chunked.gather(idx, torch.device("cpu")), whole.gather(idx, torch.device("cpu"))):
        assert torch.equal(a, b)
    assert len(chunked) == 16 and chunked.nbytes == whole.nbytes
    assert place(chunked, torch.device("cpu"), resident_bytes=10) is chunked  # over budget: streamed
    assert isinstance(place(chunked, torch.device("cpu"), resident_bytes=None), Data)


def test_an_update_can_train_on_streamed_data():
    ds = gnp.load_dataset("digits")
    parts = [ds.train.subset(slice(i, i + 300)) for i in range(0, 900, 300)]
    s = gnp.Schedule(new_epochs=1, all_epochs=2, baseline_epochs=3, grow_every=2,
                     train=gnp.TrainConfig(batch_size=32, augment=False, resident_bytes=1),
                     prune=gnp.PruneConfig(max_iterations=2, retrain_epochs=0.5))
    r = gnp.update("tfs", None, new=parts[-1], all=ChunkedData(parts), val=ds.test,
                   schedule=s, build=lambda: gnp.build_model("lenet-300-100", (1, 8, 8)),
                   device="cpu")
    assert r.val_accuracy > 0.5 and r.cost.sample_passes >= 3 * 900


def test_chunked_data_reads_only_the_selected_rows_of_each_part():
    parts = [Data(torch.arange(6.0).view(6, 1), torch.arange(6)),
             Data(torch.arange(10.0, 14.0).view(4, 1), torch.arange(10, 14))]
    rows = [torch.tensor([0, 2, 5]), None]
    c = ChunkedData(parts, rows)
    assert len(c) == 7 and c.nbytes == 7 * (4 + 8)
    x, y = c.gather(slice(None), torch.device("cpu"))
    assert y.tolist() == [0, 2, 5, 10, 11, 12, 13] and torch.equal(c.to("cpu").y, y)


def test_one_budget_covers_every_data_set():
    from gnp.data import place_all
    small, big = (ChunkedData([Data(torch.zeros(n, 3), torch.zeros(n, dtype=torch.long))])
                  for n in (10, 100))
    per_row = 3 * 4 + 8
    out = place_all({"val": small, "all": big}, torch.device("cpu"), 50 * per_row)
    assert isinstance(out["val"], Data) and out["all"] is big  # 10 rows fit; 100 do not
    out = place_all({"val": small, "all": big}, torch.device("cpu"), 110 * per_row)
    assert isinstance(out["all"], Data)
