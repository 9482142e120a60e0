import struct
import sys

import numpy as np
import pytest

from pdsn_cli.errors import BadInputError
from pdsn_cli.report.plots import plot_roc
from pdsn_cli.eval.verification import (
    best_threshold,
    roc_auc,
    roc_curve,
    summarize,
    tar_at_far,
    ten_fold,
)

# --- brute-force references: loops over explicit candidates, no cumulative sums ----------------


def brute_best_threshold(scores, same):
    values = sorted(set(scores.tolist()))
    candidates = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1.0]
    best, best_acc = None, -1.0
    for t in candidates:  # ascending, strict '>' keeps the lowest of equally good thresholds
        acc = sum((s > t) == y for s, y in zip(scores.tolist(), same.tolist())) / len(scores)
        if acc > best_acc:
            best, best_acc = t, acc
    return best


def brute_ten_fold(scores, same, folds):
    accs = []
    for f in sorted(set(folds.tolist())):
        train, test = folds != f, folds == f
        t = brute_best_threshold(scores[train], same[train])
        accs.append(sum((s > t) == y for s, y in zip(scores[test].tolist(), same[test].tolist())) / test.sum())
    return float(np.mean(accs)), float(np.sqrt(np.mean((np.array(accs) - np.mean(accs)) ** 2)))


def brute_tar_at_far(scores, same, far):
    # the best TAR among all thresholds whose impostor count stays within far * #impostors
    pos, neg = scores[same].tolist(), scores[~same].tolist()
    allowed = far * len(neg) + 1e-9
    best = 0.0
    for t in [-np.inf] + scores.tolist():
        if sum(n > t for n in neg) <= allowed:
            best = max(best, sum(p > t for p in pos) / len(pos))
    return best


def brute_auc(scores, same):
    pos, neg = scores[same].tolist(), scores[~same].tolist()
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def random_protocol(seed, folds=10, per_half=12, ties=False):
    rng = np.random.default_rng(seed)
    same = np.tile(np.r_[np.ones(per_half, bool), np.zeros(per_half, bool)], folds)
    fold = np.repeat(np.arange(folds), 2 * per_half)
    scores = np.where(same, rng.normal(1.0, 1.0, same.size), rng.normal(0.0, 1.0, same.size))
    if ties:
        scores = np.round(scores, 1)  # many exact ties, within and across classes
    return scores, same, fold


# --- cross-checks on random data ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force(seed, ties):
    scores, same, folds = random_protocol(seed, ties=ties)
    result = ten_fold(scores, same, folds)
    acc, std = brute_ten_fold(scores, same, folds)
    assert result["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert result["std"] == pytest.approx(std, abs=1e-12)
    assert len(result["fold_accuracies"]) == len(result["thresholds"]) == 10
    assert best_threshold(scores, same) == pytest.approx(brute_best_threshold(scores, same))
    for far in (1e-3, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0):
        assert tar_at_far(scores, same, far) == pytest.approx(brute_tar_at_far(scores, same, far)), far
    assert roc_auc(scores, same) == pytest.approx(brute_auc(scores, same), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_brute_force(ties):
    scores, same, _ = random_protocol(7, folds=3, ties=ties)
    fpr, tpr, thr = roc_curve(scores, same)
    assert thr[0] == np.inf and np.all(np.diff(thr) < 0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(thr) == len(np.unique(scores)) + 1
    for f, t, th in zip(fpr, tpr, thr):
        assert f == pytest.approx(np.mean(scores[~same] >= th))
        assert t == pytest.approx(np.mean(scores[same] >= th))


# --- hand-checked cases -------------------------------------------------------------------------


def test_tar_at_far_tie_handling_by_hand():
    # impostors 0.9, 0.5, 0.5, 0.1 ; genuines 0.95, 0.5, 0.3
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.95, 0.5, 0.3])
    same = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    # FAR 0.25 -> one impostor allowed -> threshold 0.5, ties rejected: only 0.95 accepted
    assert tar_at_far(scores, same, 0.25) == pytest.approx(1 / 3)
    # FAR 0.5 -> two allowed, but the 2nd and 3rd impostors tie at 0.5: still threshold 0.5
    assert tar_at_far(scores, same, 0.5) == pytest.approx(1 / 3)
    # FAR 0.75 -> three allowed -> threshold 0.1: every genuine gets in
    assert tar_at_far(scores, same, 0.75) == pytest.approx(1.0)
    # FAR below one impostor: genuines strictly above the best impostor
    assert tar_at_far(scores, same, 1e-3) == pytest.approx(1 / 3)


def test_ten_fold_by_hand_and_population_std():
    # fold 0 separable at 0.5; fold 1 has one genuine pair below every impostor
    scores = np.array([0.9, 0.8, 0.2, 0.1, 0.9, 0.0, 0.2, 0.1])
    same = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    r = ten_fold(scores, same, folds)
    assert r["fold_accuracies"] == [1.0, 0.75]
    assert r["accuracy"] == pytest.approx(0.875)
    assert r["std"] == pytest.approx(0.125)  # population std (ddof=0), not 0.1768
    assert r["thresholds"] == pytest.approx([0.55, 0.5])  # each chosen on the other fold


def test_best_threshold_prefers_the_lowest_of_equals():
    # 0.3 and 0.75 both get 3 of 4 right
    assert best_threshold([0.1, 0.5, 0.6, 0.9], [False, True, False, True]) == pytest.approx(0.3)
    # all one class: accept everything, below the lowest score
    assert best_threshold([0.2, 0.4], [True, True]) == pytest.approx(-0.8)


def test_perfect_separation():
    scores, same, folds = random_protocol(0)
    scores = np.where(same, 10.0 + scores, scores - 10.0)
    out = summarize(scores, same, folds)
    assert out == {"accuracy": 1.0, "std": 0.0, "tar_at_far_1e-3": 1.0, "auc": 1.0, "pairs": 240}


def test_bad_inputs():
    scores, same, folds = random_protocol(1, folds=2)
    with pytest.raises(BadInputError, match="NaN"):
        ten_fold(np.r_[np.nan, scores[1:]], same, folds)
    with pytest.raises(BadInputError, match="equal length"):
        roc_auc(scores[:-1], same)
    with pytest.raises(BadInputError, match="at least 2 folds"):
        ten_fold(scores, same, np.zeros_like(folds))
    with pytest.raises(BadInputError, match="both matched and mismatched"):
        tar_at_far(scores[same], same[same])
    with pytest.raises(BadInputError, match="FAR"):
        tar_at_far(scores, same, 0.0)
    with pytest.raises(BadInputError, match="booleans"):
        roc_curve(scores, same.astype(int) * 2)
    with pytest.raises(BadInputError, match="no pairs"):
        roc_curve([], [])


# --- plots --------------------------------------------------------------------------------------


def test_plot_roc_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    scores, same, _ = random_protocol(3, folds=4, per_half=50)
    fpr, tpr, _ = roc_curve(scores, same)
    out = tmp_path / "roc.png"
    plot_roc({"baseline": (fpr, tpr), "masked": (fpr, np.sqrt(tpr))}, out, "LFW")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (720, 600)
    assert list(tmp_path.iterdir()) == [out]  # nothing left under a temporary name
    with pytest.raises(BadInputError, match="does not exist"):
        plot_roc({"a": (fpr, tpr)}, tmp_path / "missing" / "roc.png", "x")


def test_plot_roc_without_matplotlib(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BadInputError, match=r"--plot needs matplotlib: pip install 'pdsn-cli\[plots\]'"):
        plot_roc({"a": ([0, 1], [0, 1])}, tmp_path / "roc.png", "x")
    assert not (tmp_path / "roc.png").exists()
