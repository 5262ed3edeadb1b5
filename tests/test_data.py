import numpy as np
import pytest
import torch

from fedmi.core.rng import Stream, numpy_generator
from fedmi.data import load_federation, stratified_test_mask
from fedmi.data.csv_features import load_csv
from fedmi.data.heart_disease import load_heart_disease
from fedmi.data.medmnist import load_medmnist
from fedmi.data.partition import dirichlet_label_skew, iid, partition, quantity_skew
from fedmi.data.shift import ScannerProfile, apply_profile, site_profiles
from fedmi.data.synthetic_adni import FEATURES, make_synthetic_adni
from fedmi.errors import FedmiError


def test_heart_disease_matches_flamby_preprocessing():
    fed = load_heart_disease()
    assert fed.site_names == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    assert [s.n for s in fed.sites] == [303, 261, 46, 130]
    assert fed.input_shape == (13,)
    assert fed.feature_names[:3] == ["age", "sex", "cp=2"]
    # label = num > 0, counted from the raw files
    assert [s.class_counts()[1] for s in fed.sites] == [139, 98, 45, 101]
    flamby = load_heart_disease(flamby_split=True)
    assert [(int((~s.test_mask).sum()), int(s.test_mask.sum())) for s in flamby.sites] == \
        [(199, 104), (172, 89), (30, 16), (85, 45)]


def test_split_is_stratified_standardised_and_deterministic():
    fed = load_heart_disease()
    a, b, c = fed.split(1), fed.split(1), fed.split(2)
    for site, split in zip(fed.sites, a):
        counts = site.class_counts()
        assert split.num_train + len(split.y_test) == site.n
        for cls in (0, 1):  # stratified: each class keeps its share in the test split
            assert int((split.y_test == cls).sum()) == round(0.2 * counts[cls])
    cle, raw = a[0], fed.sites[0]
    # z-scored with the site's own training statistics, and the test split with the same ones
    assert torch.allclose(cle.x_train[:, 0].mean(), torch.tensor(0.0), atol=1e-5)
    assert torch.allclose(cle.x_train[:, 0].std(unbiased=False), torch.tensor(1.0), atol=1e-5)
    mask = stratified_test_mask(raw.y, 0.2, numpy_generator(Stream.SPLIT, 1, 0))
    age_train, age_test = raw.x[~mask, 0], raw.x[mask, 0]
    expected = (age_test - age_train.mean()) / age_train.std()
    assert np.allclose(cle.x_test[:, 0].numpy(), expected, atol=1e-5)
    assert all(np.array_equal(x.y_test, y.y_test) for x, y in zip(a, b))
    assert not all(np.array_equal(x.y_test, y.y_test) for x, y in zip(a, c))


def test_stratified_mask_keeps_a_lone_class_in_training():
    y = np.array([1] * 20 + [0])
    m = stratified_test_mask(y, 0.2, np.random.default_rng(0))
    assert m.sum() == 4 and not m[-1]


def test_single_class_test_split_warns(caplog):
    fed = load_heart_disease()
    with caplog.at_level("WARNING", logger="fedmi"):
        fed.split(0)
    assert any("Switzerland" in r.getMessage() and "single class" in r.getMessage() for r in caplog.records)


def test_partitioners_cover_every_sample_once():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    for parts in (iid(500, 5, rng), dirichlet_label_skew(y, 5, 0.3, rng), quantity_skew(500, 5, 0.5, rng)):
        allidx = np.concatenate(parts)
        assert len(parts) == 5 and sorted(allidx.tolist()) == list(range(500))
        assert min(len(p) for p in parts) >= 10


def test_dirichlet_alpha_controls_label_skew():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(1000, int), np.ones(1000, int)]

    def spread(alpha):
        parts = dirichlet_label_skew(y, 10, alpha, np.random.default_rng(3))
        return np.std([y[p].mean() for p in parts])

    assert spread(0.1) > 0.25 > 0.05 > spread(100.0)
    sizes = [len(p) for p in quantity_skew(2000, 10, 0.2, rng)]
    assert max(sizes) > 4 * min(sizes)
    with pytest.raises(FedmiError, match="unknown partition"):
        partition("stripes", y, 4, 1.0, rng)


def test_acquisition_shift_changes_intensity_distribution():
    rng = np.random.default_rng(0)
    img = rng.random((20, 1, 28, 28)).astype(np.float32)
    same = apply_profile(img, ScannerProfile(), rng)
    assert np.allclose(same, img)
    dark = apply_profile(img, ScannerProfile(gamma=1.5, gain=0.8), rng)
    assert dark.mean() < img.mean() - 0.1
    blurred = apply_profile(img, ScannerProfile(blur_sigma=1.0), rng)
    assert blurred.std() < 0.6 * img.std()  # blur removes pixel-level variance
    noisy = apply_profile(img, ScannerProfile(noise_std=0.1), rng)
    assert 0.05 < np.abs(noisy - img).mean() < 0.12
    profiles = site_profiles(4, rng)
    assert len({p.gamma for p in profiles}) == 4
    assert site_profiles(3, rng, strength=0.0) == [ScannerProfile()] * 3


def test_medmnist_sites():
    fed = load_medmnist("breastmnist", num_sites=3, partition_kind="dirichlet", alpha=0.5, seed=0)
    assert fed.kind == "image" and fed.input_shape == (1, 28, 28)
    assert sum(s.n for s in fed.sites) == 546 + 78 + 156
    assert all(0.0 <= s.x.min() and s.x.max() <= 1.0 for s in fed.sites)
    means = [s.x.mean() for s in fed.sites]
    assert max(means) - min(means) > 0.02  # scanners differ
    small = load_federation("pneumoniamnist", num_sites=2, max_samples=100)
    assert sum(s.n for s in small.sites) == 100
    assert "balanced subset" in small.description


def test_synthetic_adni_cohorts():
    fed = make_synthetic_adni()
    assert fed.synthetic and "SYNTHETIC" in fed.description
    assert [(s.class_counts()[1], s.class_counts()[0]) for s in fed.sites] == [(199, 229), (159, 201)]
    assert len(FEATURES) == 90 and fed.input_shape == (90,)
    assert all("synthetic" in s.name for s in fed.sites)
    hip = FEATURES.index("Hippocampus_L")
    occ = FEATURES.index("Occipital_Mid_L")
    s = fed.sites[0]
    effect = lambda j: s.x[s.y == 0, j].mean() - s.x[s.y == 1, j].mean()  # noqa: E731
    assert effect(hip) > 5 * abs(effect(occ))  # atrophy where AD atrophies
    # scanner shift: ADNI-2 (3T) is brighter on average for the same regions
    assert fed.sites[1].x[fed.sites[1].y == 0].mean() > fed.sites[0].x[fed.sites[0].y == 0].mean()


def _write(tmp_path, text, name="data.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_source(tmp_path):
    p = _write(tmp_path, "site,dx,f1,f2,split\nA,AD,1,2,train\nA,NC,2,3,test\nB,AD,3,4,train\nB,NC,1,1,test\nA,NC,0,1,train\n")
    fed = load_csv(p, label_column="dx", positive_label="AD", split_column="split")
    assert fed.site_names == ["A", "B"]
    assert fed.feature_names == ["f1", "f2"]
    assert fed.sites[0].y.tolist() == [1, 0, 0] and fed.sites[0].test_mask.tolist() == [False, True, False]
    assert fed.has_fixed_split


@pytest.mark.parametrize("text, kwargs, message", [
    ("site,label,f1\nA,0,1\n", {"site_column": "hospital"}, "no site column 'hospital'"),
    ("site,label,f1\nA,0,1\n", {"label_column": "dx"}, "no label column 'dx'"),
    ("site,label,f1\nA,0,1\nA,1,\n", {}, "feature column 'f1' has missing.*line 3"),
    ("site,label,f1\nA,0,1\nA,1,abc\n", {}, "feature column 'f1' is not numeric"),
    ("site,label,f1\nA,AD,1\nA,NC,2\n", {}, "name the positive one"),
    ("site,label,f1\nA,AD,1\nA,NC,2\n", {"positive_label": "MCI"}, "never occurs"),
    ("site,label\nA,0\nA,1\n", {}, "no feature columns"),
    ("site,label,f1,split\nA,0,1,train\nA,1,2,validation\n", {"split_column": "split"}, "'train' or 'test'"),
])
def test_csv_errors_say_what_and_where(tmp_path, text, kwargs, message):
    with pytest.raises(FedmiError, match=message):
        load_csv(_write(tmp_path, text), **kwargs)


def test_unknown_dataset_and_missing_file(tmp_path):
    with pytest.raises(FedmiError, match="unknown dataset 'mnist'"):
        load_federation("mnist")
    with pytest.raises(FedmiError, match="no CSV file"):
        load_federation(f"csv:{tmp_path / 'nope.csv'}")


def test_standardisation_scales_huge_columns_and_centres_constant_ones():
    from fedmi.data.federation import Federation, Site

    rng = np.random.default_rng(0)
    n = 40
    x = np.stack([rng.normal(1e30, 1e29, n), np.full(n, 7.0), rng.normal(0, 1, n)], axis=1).astype(np.float32)
    fed = Federation("huge", [Site("A", x, np.arange(n) % 2)], "tabular", feature_names=["big", "flat", "z"])
    split = fed.split(0)[0]
    big = split.x_train[:, 0].double()
    assert abs(float(big.mean())) < 1e-5 and abs(float(big.std(unbiased=False)) - 1) < 1e-5  # float32 made it 0.0
    assert torch.all(split.x_train[:, 1] == 0) and torch.all(split.x_test[:, 1] == 0)
    # a test value that the training statistics cannot scale into float32 is refused, naming the column
    x2 = np.concatenate([np.full((n, 1), 1.0), np.ones((n, 1))], axis=1).astype(np.float32)
    x2[::2, 0] = 1.0 + 1e-7
    x2[1::10, 0] = 3e38
    fed2 = Federation("odd", [Site("B", x2, np.arange(n) % 2, test_mask=(np.arange(n) % 10 == 1))], "tabular",
                      feature_names=["edge", "one"])
    with pytest.raises(FedmiError, match="site B: feature column 'edge' cannot be standardised"):
        fed2.split(0)


def test_standardisation_can_be_switched_off():
    fed = load_heart_disease()
    fed.standardize = False
    raw = fed.split(0)[0]
    assert float(raw.x_train[:, 0].mean()) > 40  # age in years, untouched


def test_embedded_files_match_their_checksums():
    import hashlib
    from pathlib import Path

    import fedmi.data

    assets = Path(fedmi.data.__file__).parent / "assets"
    lines = (assets / "checksums.md5").read_text().split("\n")
    entries = [line.split() for line in lines if line.strip()]
    assert len(entries) == 12  # heart disease 5, MedMNIST 3, FedBCa 4
    for md5, name in entries:
        assert hashlib.md5((assets / name).read_bytes()).hexdigest() == md5, name


@pytest.mark.parametrize("header, message", [
    ("site,label,f1,label", "appear more than once"),
    (",site,label,f1", "column 1 of the header has no name"),
])
def test_csv_header_problems(tmp_path, header, message):
    path = _write(tmp_path, header + "\n" + "\n".join(f"0,A,{i % 2},1" if header.startswith(",")
                                                      else f"A,{i % 2},1,{i % 2}" for i in range(6)) + "\n")
    with pytest.raises(FedmiError, match=message):
        load_csv(path)


def _npz(tmp_path, **overrides):
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    arrays.update(overrides)
    path = tmp_path / "x.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("overrides, message", [
    ({"val_labels": np.zeros((5, 1), np.uint8)}, "6 val images but 5 val labels"),
    ({"test_images": np.zeros((8, 32, 32), np.uint8)}, "test_images are"),
    ({"train_images": np.zeros((20, 28, 28), np.float32)}, "uint8"),
    ({"train_labels": np.full((20, 1), 2, np.uint8)}, "only binary labels"),
])
def test_npz_problems(tmp_path, overrides, message):
    with pytest.raises(FedmiError, match=message):
        load_medmnist("x", num_sites=2, path=_npz(tmp_path, **overrides))


def test_npz_valid_and_not_an_npz(tmp_path):
    fed = load_medmnist("x", num_sites=2, path=_npz(tmp_path))
    assert sum(s.n for s in fed.sites) == 34
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(FedmiError, match="cannot be read as a .npz"):
        load_medmnist("x", path=bad)


def test_the_disease_is_the_positive_class_of_embedded_images_unless_chosen():
    default = load_federation("breastmnist", max_samples=200)
    assert default.label_names == ("normal or benign", "malignant")  # the file's label 1 is "normal or benign"
    chosen = load_federation("breastmnist", max_samples=200, positive_label="normal or benign")
    assert chosen.label_names == ("malignant", "normal or benign")
    assert all((a.y == 1 - b.y).all() for a, b in zip(default.sites, chosen.sites))
    assert load_federation("pneumoniamnist", max_samples=200).label_names == ("normal", "pneumonia")
    with pytest.raises(FedmiError, match="no class 'benign' to make positive"):
        load_federation("breastmnist", positive_label="benign")


def test_adrenalmnist3d_volumes_partition_into_sites_with_a_3d_scanner_shift():
    fed = load_federation("adrenalmnist3d", num_sites=3, holdout="official", max_samples=120)
    assert fed.input_shape == (1, 28, 28, 28) and fed.label_names == ("normal", "hyperplasia")
    assert sum(s.n for s in fed.sites) == 120 and len(fed.common_test[1]) == 298
    plain = load_federation("adrenalmnist3d", num_sites=3, holdout="official", max_samples=120, shift_strength=0)
    assert not np.allclose(fed.sites[0].x, plain.sites[0].x)  # each site's scanner changed its volumes
