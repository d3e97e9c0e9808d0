"""Data sets, label noise and loaders (CPU; CIFAR from files the tests write)."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from samstudy.data import (
    CIFAR10_ASYM_MAP,
    CIFAR100_COARSE,
    CIFAR_STATS,
    TORCHVISION_CLASSES,
    DataNotFoundError,
    asym_map,
    asymmetric_noise,
    build_data,
    crop_flip,
    epoch_plan,
    resolve_device,
    symmetric_noise,
)
from samstudy.data.loaders import batch_bounds

# ---------------------------------------------------------------- CIFAR-format files


def write_cifar10(root: Path, per_batch: int = 12, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR-10 python-format files (data_batch_1..5, test_batch, batches.meta)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in files:
        entry = {
            "batch_label": name,
            "labels": [int(v) for v in np.arange(n) % 10],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return folder


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """CIFAR-100 python-format files (train, test, meta) with fine and coarse labels."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in np.arange(n) % 100]
        entry = {
            "fine_labels": fine,
            "coarse_labels": [CIFAR100_COARSE[f] for f in fine],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)],
            "coarse_label_names": [f"s{i}" for i in range(20)]}  # fmt: skip
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder


def checksummed(base: type, folder: Path) -> type:
    """A torchvision CIFAR subclass whose md5 table matches the test-written files.

    Only the expected checksums change: torchvision's own reading and integrity checks run.
    """

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    return type(
        f"Test{base.__name__}",
        (base,),
        {
            "train_list": [[f, md5(f)] for f, _ in base.train_list],
            "test_list": [[f, md5(f)] for f, _ in base.test_list],
            "meta": {**base.meta, "md5": md5(base.meta["filename"])},
        },
    )


@pytest.fixture
def cifar10_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = write_cifar10(tmp_path)
    cls = checksummed(torchvision.datasets.CIFAR10, folder)
    monkeypatch.setitem(TORCHVISION_CLASSES, "cifar10", cls)
    return tmp_path


# ---------------------------------------------------------------- label noise


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.8])
def test_symmetric_noise_rate_is_exact(rate: float) -> None:
    clean = torch.arange(1001) % 10
    noisy = symmetric_noise(clean, 10, rate, seed=5)
    assert int((noisy != clean).sum()) == round(rate * 1001)
    assert noisy.min() >= 0 and noisy.max() <= 9


def test_symmetric_noise_is_uniform_over_other_classes() -> None:
    clean = torch.zeros(20000, dtype=torch.long)
    noisy = symmetric_noise(clean, 5, 0.5, seed=0)
    counts = Counter(noisy[noisy != clean].tolist())
    assert set(counts) == {1, 2, 3, 4}
    assert all(abs(c / 10000 - 0.25) < 0.02 for c in counts.values())


def test_noise_depends_on_noise_seed_only() -> None:
    clean = torch.arange(500) % 10
    torch.manual_seed(1)
    np.random.seed(1)
    a = symmetric_noise(clean, 10, 0.4, seed=3)
    state = torch.get_rng_state()
    torch.manual_seed(99)
    np.random.seed(99)
    b = symmetric_noise(clean, 10, 0.4, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, symmetric_noise(clean, 10, 0.4, seed=4))
    # Drawing noise leaves the global stream (the training seed's) untouched.
    torch.manual_seed(1)
    symmetric_noise(clean, 10, 0.4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_build_data_noise_is_independent_of_training_seed() -> None:
    torch.manual_seed(0)
    a = build_data("digits", noise_kind="symmetric", noise_rate=0.4, noise_seed=7)
    torch.manual_seed(12345)
    b = build_data("digits", noise_kind="symmetric", noise_rate=0.4, noise_seed=7)
    assert torch.equal(a.train_y, b.train_y)
    assert int(a.train_noisy.sum()) == round(0.4 * a.num_train)
    assert torch.equal(a.train_noisy, a.train_y != a.train_y_true)


def test_cifar10_asymmetric_map_and_exact_counts() -> None:
    assert asym_map("cifar10", 10) == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    clean = torch.arange(1000) % 10  # 100 per class
    noisy = asymmetric_noise(clean, CIFAR10_ASYM_MAP, 0.3, seed=0)
    flips = Counter(
        zip(clean[noisy != clean].tolist(), noisy[noisy != clean].tolist(), strict=True)
    )
    assert flips == {(9, 1): 30, (2, 0): 30, (4, 7): 30, (3, 5): 30, (5, 3): 30}


def test_cifar100_asymmetric_map_stays_in_superclass() -> None:
    mapping = asym_map("cifar100", 100)
    assert sorted(mapping.values()) == list(range(100))  # a permutation
    assert all(CIFAR100_COARSE[f] == CIFAR100_COARSE[t] and f != t for f, t in mapping.items())
    assert Counter(CIFAR100_COARSE) == {c: 5 for c in range(20)}
    # Superclass 0 (aquatic mammals) holds beaver 4, dolphin 30, otter 55, seal 72, whale 95.
    assert [mapping[f] for f in (4, 30, 55, 72, 95)] == [30, 55, 72, 95, 4]


def test_default_asymmetric_map_shifts_classes() -> None:
    assert asym_map("digits", 10) == {c: (c + 1) % 10 for c in range(10)}
    assert asym_map("gaussian", 2) == {0: 1, 1: 0}
    data = build_data("digits", noise_kind="asymmetric", noise_rate=0.2, noise_seed=1)
    moved = data.train_noisy
    assert torch.equal(data.train_y[moved], (data.train_y_true[moved] + 1) % 10)
    per_class = torch.bincount(data.train_y_true, minlength=10)
    flipped = torch.bincount(data.train_y_true[moved], minlength=10)
    assert torch.equal(flipped, torch.round(0.2 * per_class.double()).long())


# ---------------------------------------------------------------- human (CIFAR-N) labels


def test_human_labels_from_pt_and_npy(cifar10_root: Path, tmp_path: Path) -> None:
    clean = torch.tensor(build_data("cifar10", root=cifar10_root).train_y_true.tolist())
    worse = (clean + (torch.arange(len(clean)) % 3 == 0).long()) % 10
    pt = tmp_path / "CIFAR-10_human.pt"
    torch.save({"worse_label": worse.numpy(), "aggre_label": clean.numpy(),
                "clean_label": clean.numpy()}, pt)  # fmt: skip
    data = build_data("cifar10", root=cifar10_root, noise_kind="human", label_file=str(pt))
    assert torch.equal(data.train_y, worse)
    assert torch.equal(data.train_noisy, worse != clean)
    npy = tmp_path / "labels.npy"
    np.save(npy, worse.numpy())
    again = build_data("cifar10", root=cifar10_root, noise_kind="human", label_file=npy)
    assert torch.equal(again.train_y, worse)
    with pytest.raises(KeyError, match="random_label1"):
        build_data("cifar10", root=cifar10_root, noise_kind="human", label_file=pt,
                   label_key="random_label1")  # fmt: skip


def test_human_labels_checked_against_clean_labels(cifar10_root: Path, tmp_path: Path) -> None:
    n = build_data("cifar10", root=cifar10_root).num_train
    pt = tmp_path / "wrong.pt"
    torch.save({"worse_label": np.zeros(n, np.int64), "clean_label": np.ones(n, np.int64)}, pt)
    with pytest.raises(ValueError, match="clean_label"):
        build_data("cifar10", root=cifar10_root, noise_kind="human", label_file=pt)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(n - 1, np.int64))
    with pytest.raises(ValueError, match="labels for"):
        build_data("cifar10", root=cifar10_root, noise_kind="human", label_file=short)


def test_human_label_file_written_by_numpy1_loads_weights_only(tmp_path: Path) -> None:
    # CIFAR-N's files were pickled under numpy 1 (module numpy.core.multiarray).
    from samstudy.data import load_human_labels

    fresh = tmp_path / "fresh.pt"
    torch.save({"worse_label": np.arange(6) % 3}, fresh)
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(fresh) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    labels = load_human_labels(old, "worse_label", torch.arange(6) % 3, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------- data sets


def test_digits_split_is_fixed_and_stratified() -> None:
    a = build_data("digits", test_size=0.2, split_seed=0)
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    assert (a.num_train, a.num_test) == (1437, 360)
    assert float(a.train_x.min()) == 0.0 and float(a.train_x.max()) == 1.0
    test_counts = torch.bincount(a.test_y, minlength=10)
    totals = test_counts + torch.bincount(a.train_y, minlength=10)
    # Stratified: every class keeps its 20% share in the test set, to within one sample.
    assert ((test_counts - 0.2 * totals).abs() <= 1).all()
    b = build_data("digits", test_size=0.2, split_seed=0)
    assert torch.equal(a.train_x, b.train_x)
    c = build_data("digits", test_size=0.2, split_seed=1)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.noise_rate == 0.0 and not a.augmentable


def test_a_process_reads_its_data_set_once(
    cifar10_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reused Ray worker reads, checks and normalises CIFAR once (and moves its images to the
    device once); every trial still gets its own noisy labels, equal to a fresh load's."""
    from samstudy.data import bundle

    reads: list[bool] = []
    checked = TORCHVISION_CLASSES["cifar10"]

    class Counting(checked):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            reads.append(True)
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(TORCHVISION_CLASSES, "cifar10", Counting)
    bundle.clear_cache()
    kw = {"root": cifar10_root, "noise_kind": "symmetric", "noise_rate": 0.4}
    a = build_data("cifar10", noise_seed=1, **kw)
    b = build_data("cifar10", noise_seed=2, **kw)
    half = build_data("cifar10", noise_seed=2, train_fraction=0.5, **kw)
    assert len(reads) == 2  # the training and the test set, once
    assert a.train_x is b.train_x and a.test_x is b.test_x
    assert not torch.equal(a.train_y, b.train_y)
    fields = ("train_x", "train_y", "train_y_true", "train_noisy", "test_x", "test_y")
    for kept in (b, half):
        bundle.clear_cache()
        fraction = 0.5 if kept is half else 1.0
        fresh = build_data("cifar10", noise_seed=2, train_fraction=fraction, **kw)
        assert all(torch.equal(getattr(fresh, f), getattr(kept, f)) for f in fields)
    assert len(reads) == 6
    # Files touched on disk: read again.
    batch = cifar10_root / "cifar-10-batches-py" / "test_batch"
    info = batch.stat()
    os.utime(batch, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    build_data("cifar10", noise_seed=2, **kw)
    assert len(reads) == 8
    bundle.clear_cache()


@pytest.mark.parametrize(
    ("test_size", "seed"), [(0.2, 0), (0.2, 1), (0.25, 7), (0.5, 3), (0.9, 11)]
)
def test_digits_match_scikit_learn(test_size: float, seed: int) -> None:
    """Read without importing scikit-learn, yet the very arrays and split of
    ``load_digits`` + ``train_test_split(stratify=y)``: trials keep their data."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    from samstudy.data.sources import load_digits

    x, y = sk_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    raw = load_digits(test_size, seed)
    assert np.array_equal(raw.train_y.numpy(), y_tr) and np.array_equal(raw.test_y.numpy(), y_te)
    assert np.array_equal(
        raw.train_x.reshape(len(y_tr), -1).numpy(), (x_tr / 16.0).astype(np.float32)
    )
    assert np.array_equal(
        raw.test_x.reshape(len(y_te), -1).numpy(), (x_te / 16.0).astype(np.float32)
    )


def test_digits_load_without_scikit_learn() -> None:
    """A worker's first digits trial does not pay scikit-learn's (and scipy's) import."""
    code = (
        "import sys; from samstudy.data import build_data; build_data('digits'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_gaussian_binary_and_multiclass() -> None:
    syn = {"n_train": 400, "n_test": 600, "dim": 8, "num_classes": 2, "margin": 3.0}
    data = build_data("gaussian", synthetic=syn, split_seed=3)
    assert data.in_shape == (8,) and data.num_classes == 2
    assert torch.bincount(data.train_y).tolist() == [200, 200]
    # The class means are +-mu: the sign of <mu, x> classifies well at margin 3.
    mu = data.train_x[data.train_y == 1].mean(0) - data.train_x[data.train_y == 0].mean(0)
    acc = ((data.test_x @ mu > 0).long() == data.test_y).float().mean()
    assert acc > 0.95
    assert torch.equal(build_data("gaussian", synthetic=syn, split_seed=3).train_x, data.train_x)
    multi = build_data("gaussian", synthetic={**syn, "num_classes": 4}, split_seed=3)
    assert multi.num_classes == 4 and torch.bincount(multi.test_y).tolist() == [150] * 4
    with pytest.raises(ValueError, match="unknown synthetic keys"):
        build_data("gaussian", synthetic={"n_samples": 3})


def test_cifar10_through_torchvision_reader(cifar10_root: Path) -> None:
    data = build_data("cifar10", root=cifar10_root)
    assert data.in_shape == (3, 32, 32) and data.num_classes == 10
    assert (data.num_train, data.num_test) == (60, 20) and data.augmentable
    # Pixel (0, 0) of channel 0 of the first training image, normalised by the CIFAR-10 stats.
    raw = pickle.loads((cifar10_root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    mean, std = CIFAR_STATS["cifar10"]
    expected = (raw["data"][0, 0] / 255 - mean[0]) / std[0]
    assert float(data.train_x[0, 0, 0, 0]) == pytest.approx(expected, abs=1e-5)
    assert data.train_y[:12].tolist() == raw["labels"]
    assert (cifar10_root / ".cifar10.lock").exists()


def test_concurrent_trials_wait_for_the_root_lock(cifar10_root: Path) -> None:
    from filelock import FileLock

    result: dict[str, object] = {}

    def load() -> None:
        result["data"] = build_data("cifar10", root=cifar10_root)

    lock = FileLock(str(cifar10_root / ".cifar10.lock"))
    with lock:  # another trial is downloading
        worker = threading.Thread(target=load)
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and "data" not in result
    worker.join(timeout=30)
    assert not worker.is_alive() and result["data"].num_train == 60


def test_relative_root_is_taken_from_the_project() -> None:
    from samstudy.data.sources import resolve_root
    from samstudy.paths import project_root

    assert resolve_root("data") == project_root() / "data"
    assert resolve_root("/abs/cifar") == Path("/abs/cifar")


def test_cifar100_through_torchvision_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_cifar100(tmp_path)
    monkeypatch.setitem(
        TORCHVISION_CLASSES, "cifar100", checksummed(torchvision.datasets.CIFAR100, folder)
    )
    data = build_data("cifar100", root=tmp_path, noise_kind="asymmetric", noise_rate=0.5)
    assert data.num_classes == 100 and data.num_train == 200
    assert int(data.train_noisy.sum()) == 100  # exactly one of the two samples per class
    coarse = torch.tensor(CIFAR100_COARSE)
    assert torch.equal(coarse[data.train_y], coarse[data.train_y_true])


def test_real_checksums_reject_test_files(tmp_path: Path) -> None:
    # The production classes still verify md5 sums: the test's files are refused.
    write_cifar10(tmp_path)
    with pytest.raises(DataNotFoundError, match="corrupted"):
        build_data("cifar10", root=tmp_path)


def test_missing_cifar_names_root_and_how_to_fetch(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        build_data("cifar100", root=root, download=False)
    message = str(info.value)
    assert str(root) in message
    assert "download: true" in message
    assert "cifar-100-python.tar.gz" in message


# ---------------------------------------------------------------- loaders


def batches(loader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_batch_bounds_cover_everything_without_singletons() -> None:
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]
    assert batch_bounds(1, 4) == [(0, 1)]


def test_device_loader_visits_every_index_once_and_carries_labels() -> None:
    data = build_data("digits", noise_kind="symmetric", noise_rate=0.4, noise_seed=2)
    loader = data.train_loader(100, seed=0, augment=True)
    assert len(loader) == 15
    seen = []
    for x, y, y_true, noisy, index in batches(loader, 3):
        assert x.shape[1:] == (1, 8, 8) and x.shape[0] == len(index)
        assert torch.equal(x, data.train_x[index])  # digits: no augmentation
        assert torch.equal(y, data.train_y[index]) and torch.equal(y_true, data.train_y_true[index])
        assert torch.equal(noisy, y != y_true) and noisy.dtype == torch.bool
        seen.append(index)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(data.num_train))


def test_device_loader_is_a_function_of_seed_and_epoch() -> None:
    data = build_data("digits")
    first = batches(data.train_loader(64, seed=4), 2)
    # A fresh loader (as after a resume) replays epoch 2 exactly, whatever ran before.
    torch.manual_seed(123)
    fresh = data.train_loader(64, seed=4)
    batches(fresh, 0)
    again = batches(fresh, 2)
    assert all(torch.equal(a[4], b[4]) for a, b in zip(first, again, strict=True))
    other_epoch = batches(data.train_loader(64, seed=4), 3)
    other_seed = batches(data.train_loader(64, seed=5), 2)
    assert not torch.equal(first[0][4], other_epoch[0][4])
    assert not torch.equal(first[0][4], other_seed[0][4])


def naive_crop_flip(x, dy, dx, flip, fill, pad=4):
    out = []
    for img, a, b, f in zip(x, dy.tolist(), dx.tolist(), flip.tolist(), strict=True):
        c, h, w = img.shape
        padded = fill.view(c, 1, 1).expand(c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, pad : pad + h, pad : pad + w] = img
        crop = padded[:, a : a + h, b : b + w]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


def test_crop_flip_matches_per_image_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    plan = epoch_plan(16, seed=0, epoch=0)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    got = crop_flip(x, plan.dy, plan.dx, plan.flip, fill)
    torch.testing.assert_close(got, naive_crop_flip(x, plan.dy, plan.dx, plan.flip, fill))
    # Offsets 4 and no flip give the image back.
    same = crop_flip(
        x, torch.full((16,), 4), torch.full((16,), 4), torch.zeros(16, dtype=torch.bool), fill
    )
    assert torch.equal(same, x)
    assert plan.dy.min() >= 0 and plan.dy.max() <= 8 and 0 < plan.flip.float().mean() < 1


def test_cifar_augmentation_and_torchvision_path_agree(cifar10_root: Path) -> None:
    data = build_data("cifar10", root=cifar10_root, noise_kind="symmetric", noise_rate=0.5)
    device = batches(data.train_loader(16, seed=1, augment=True), 4)
    vision = batches(data.train_loader(16, seed=1, augment=True, loader="torchvision"), 4)
    assert [len(b[4]) for b in device] == [16, 16, 16, 12]
    for d, v in zip(device, vision, strict=True):
        assert d[0].shape == (len(d[4]), 3, 32, 32)
        torch.testing.assert_close(d[0], v[0])
        for a, b in zip(d[1:], v[1:], strict=True):
            assert torch.equal(a, b) and a.dtype == b.dtype
    # Augmentation changes images; without it the batch is the stored data.
    x, *_, index = device[0]
    assert not torch.equal(x, data.train_x[index])
    plain = batches(data.train_loader(16, seed=1, augment=False), 4)
    assert torch.equal(plain[0][0], data.train_x[plain[0][4]])
    # Padding shows the normalised black pixel.
    plan = epoch_plan(data.num_train, seed=1, epoch=4)
    i = int(torch.nonzero(plan.dy == 0)[0])
    pos = int(torch.nonzero(torch.cat([b[4] for b in device]) == i)[0])
    row = torch.cat([b[0] for b in device])[pos, :, 0, 0]
    torch.testing.assert_close(row, data.pad_value)


def test_torchvision_loader_with_worker_process(cifar10_root: Path) -> None:
    data = build_data("cifar10", root=cifar10_root)
    with_worker = batches(data.train_loader(32, seed=2, loader="torchvision", num_workers=1), 1)
    in_process = batches(data.train_loader(32, seed=2, loader="device"), 1)
    for a, b in zip(with_worker, in_process, strict=True):
        torch.testing.assert_close(a[0], b[0])
        assert torch.equal(a[4], b[4])


def test_test_loader_is_ordered_and_clean() -> None:
    data = build_data("digits", noise_kind="symmetric", noise_rate=0.4)
    out = list(data.test_loader(100))
    assert [len(b[4]) for b in out] == [100, 100, 100, 60]
    x = torch.cat([b[0] for b in out])
    assert torch.equal(x, data.test_x)
    assert torch.equal(torch.cat([b[1] for b in out]), data.test_y)
    assert not any(b[3].any() for b in out)
    evaluated = list(data.train_eval_loader(500))
    assert torch.equal(torch.cat([b[3] for b in evaluated]), data.train_noisy)


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="allowed: digits"):
        build_data("mnist")
    with pytest.raises(ValueError, match="unknown noise kind"):
        build_data("digits", noise_kind="pair")
    with pytest.raises(ValueError, match="unknown loader"):
        build_data("digits").train_loader(8, loader="fast")


def test_resolve_device_auto_explicit_and_missing_cuda() -> None:
    cuda = torch.cuda.is_available()
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if cuda:
        assert resolve_device("cuda").index == torch.cuda.current_device() == auto.index
    else:
        with pytest.raises(ValueError, match="'cuda:1' requested but CUDA is not available"):
            resolve_device("cuda:1")
