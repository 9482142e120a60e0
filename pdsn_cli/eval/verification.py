"""Face verification metrics: LFW ten-fold accuracy, TAR@FAR, ROC and AUC.

Scores are similarities: higher means "same person". A pair is accepted as genuine when its score is
strictly above the threshold. Everything is plain numpy so the numbers can be checked by hand.
"""

from __future__ import annotations

import math

import numpy as np

from pdsn_cli.errors import BadInputError


def _as_arrays(scores, same, folds=None):
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same)
    if scores.ndim != 1 or same.shape != scores.shape:
        raise BadInputError(f"scores and labels must be 1-D and of equal length, got {scores.shape} and {same.shape}")
    if scores.size == 0:
        raise BadInputError("no pairs to evaluate")
    if not np.isfinite(scores).all():
        raise BadInputError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    if same.dtype != bool:
        if not np.isin(same, (0, 1)).all():
            raise BadInputError("labels must be booleans (or 0/1)")
        same = same.astype(bool)
    if folds is None:
        return scores, same
    folds = np.asarray(folds)
    if folds.shape != scores.shape:
        raise BadInputError(f"folds must have one entry per pair, got {folds.shape} for {scores.shape}")
    return scores, same, folds


def _need_both_classes(same: np.ndarray, what: str) -> None:
    if same.all() or not same.any():
        raise BadInputError(f"{what} needs both matched and mismatched pairs")


def best_threshold(scores, same) -> float:
    """The threshold that maximises accuracy of ``score > threshold`` on these pairs.

    Candidates are the midpoints between consecutive distinct scores, plus one value below the lowest
    score (accept everything) and one above the highest (reject everything). When several candidates
    reach the same accuracy the lowest one is returned, as the usual LFW evaluation code does.
    """
    scores, same = _as_arrays(scores, same)
    values, inverse = np.unique(scores, return_inverse=True)
    pos_at = np.bincount(inverse, weights=same, minlength=values.size)
    neg_at = np.bincount(inverse, weights=~same, minlength=values.size)
    # threshold c_k sits just below values[k] (k = 0..m-1), or above every score (k = m):
    # correct = impostors scoring below it + genuines scoring above it
    neg_below = np.concatenate(([0.0], np.cumsum(neg_at)))
    pos_above = pos_at.sum() - np.concatenate(([0.0], np.cumsum(pos_at)))
    correct = neg_below + pos_above
    k = int(np.argmax(correct))
    if k == 0:
        return float(values[0] - 1.0)
    if k == values.size:
        return float(values[-1] + 1.0)
    return float((values[k - 1] + values[k]) / 2.0)


def ten_fold(scores, same, folds) -> dict:
    """Cross-validated verification accuracy (the LFW View 2 protocol).

    For every fold the threshold is chosen on the other folds (:func:`best_threshold`) and applied to
    the held-out one. ``std`` is the population standard deviation over folds (numpy's default, as
    LFW results are conventionally reported).
    """
    scores, same, folds = _as_arrays(scores, same, folds)
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise BadInputError("cross-validation needs at least 2 folds")
    accuracies, thresholds = [], []
    for f in fold_ids:
        test = folds == f
        threshold = best_threshold(scores[~test], same[~test])
        accuracies.append(float(np.mean((scores[test] > threshold) == same[test])))
        thresholds.append(threshold)
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "thresholds": thresholds,
    }


def tar_at_far(scores, same, far: float = 1e-3) -> float:
    """True accept rate at the threshold that lets through at most ``far`` x #impostors impostors.

    With ``k = floor(far * negatives)``, the threshold is the (k+1)-th highest impostor score and only
    scores strictly above it are accepted. Impostors tied at the threshold are therefore rejected, so
    the achieved FAR never exceeds ``far`` (it is lower when ties straddle the cut), and genuine pairs
    tied with it are rejected too: the estimate is conservative. When ``far * negatives < 1`` this is
    the fraction of genuine pairs scoring above every impostor.
    """
    scores, same = _as_arrays(scores, same)
    _need_both_classes(same, "TAR@FAR")
    if not 0.0 < far <= 1.0:
        raise BadInputError(f"FAR must be in (0, 1], got {far}")
    negatives = np.sort(scores[~same])[::-1]
    # the epsilon keeps far * n exact when it is an integer in decimal but not in binary (0.29 * 100)
    k = math.floor(far * negatives.size + 1e-9)
    threshold = -np.inf if k >= negatives.size else negatives[k]
    return float(np.mean(scores[same] > threshold))


def roc_curve(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for every distinct threshold, from strictest to loosest.

    ``thresholds`` decrease; point ``i`` accepts pairs with ``score >= thresholds[i]``. The first point
    is ``(0, 0)`` at ``+inf``, the last ``(1, 1)`` at the lowest score.
    """
    scores, same = _as_arrays(scores, same)
    _need_both_classes(same, "a ROC curve")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    # a curve point only where the score changes, so tied pairs move together
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(~y)[last_of_run]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    thresholds = np.r_[np.inf, s[last_of_run]]
    return fpr, tpr, thresholds


def roc_auc(scores, same) -> float:
    """Area under the ROC curve (trapezoids, so tied genuine/impostor pairs count one half)."""
    fpr, tpr, _ = roc_curve(scores, same)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def summarize(scores, same, folds) -> dict:
    """The headline numbers for a verification run."""
    result = ten_fold(scores, same, folds)
    return {
        "accuracy": result["accuracy"],
        "std": result["std"],
        "tar_at_far_1e-3": tar_at_far(scores, same, 1e-3),
        "auc": roc_auc(scores, same),
        "pairs": int(np.asarray(scores).size),
    }
