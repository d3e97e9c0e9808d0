"""Per-epoch training metrics, accumulated on the device and read once per epoch.

A batch contributes a fixed-length vector of sums (``batch_sums``); the epoch adds these vectors on
the device and ``summarize`` turns the one host copy into rates. Keeping the sums in one tensor
means the whole epoch costs a single device-to-host transfer, however many batches it has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Order of the entries of the sums vector.
SUM_FIELDS: tuple[str, ...] = (
    "n",
    "n_clean",
    "n_noisy",
    "loss",
    "loss_clean",
    "loss_noisy",
    "correct",  # prediction == training label (the possibly noisy one)
    "correct_clean",
    "memorized",  # noisy sample predicted as its noisy label
    "recovered",  # noisy sample predicted as its true label
)
NUM_SUMS = len(SUM_FIELDS)


def _binary_logit(logits: torch.Tensor) -> torch.Tensor | None:
    """The single logit per sample of a binary model ((B,) or (B, 1) outputs), else None."""
    if logits.ndim == 1:
        return logits
    if logits.ndim == 2 and logits.shape[1] == 1:
        return logits[:, 0]
    return None


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: cross-entropy, or the logistic loss for a single logit (labels 0/1)."""
    single = _binary_logit(logits)
    if single is not None:
        return F.binary_cross_entropy_with_logits(single.float(), targets.float(), reduction="none")
    return F.cross_entropy(logits.float(), targets, reduction="none")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss: what ``optimizer.train_step`` minimises (``loss_fn(logits, targets)``)."""
    single = _binary_logit(logits)
    if single is not None:
        return F.binary_cross_entropy_with_logits(single.float(), targets.float())
    return F.cross_entropy(logits.float(), targets)


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class; a single logit is a binary classifier with threshold 0."""
    single = _binary_logit(logits)
    if single is not None:
        return (single > 0).long()
    return logits.argmax(dim=1)


def batch_sums(
    logits: torch.Tensor, y: torch.Tensor, y_true: torch.Tensor, noisy: torch.Tensor
) -> torch.Tensor:
    """Sums over one batch in ``SUM_FIELDS`` order (float64, on the logits' device, no sync).

    ``y`` is the training label, ``y_true`` the clean one, ``noisy`` whether they differ (as the
    data set recorded it).
    """
    with torch.no_grad():
        losses = per_sample_loss(logits, y).double()
        pred = predictions(logits)
        noisy = noisy.bool()
        clean = ~noisy
        hit = pred == y
        return torch.stack(
            [
                losses.new_full((), float(y.shape[0])),  # a fill kernel, no host copy
                clean.sum().double(),
                noisy.sum().double(),
                losses.sum(),
                # where, not multiply: an infinite loss on one side must not turn the other NaN
                losses.where(clean, 0.0).sum(),
                losses.where(noisy, 0.0).sum(),
                hit.sum().double(),
                (hit & clean).sum().double(),
                (hit & noisy).sum().double(),
                ((pred == y_true) & noisy).sum().double(),
            ]
        )


def _ratio(num: float, den: float) -> float:
    # No samples of a kind (e.g. no noise): the rate is undefined, not zero.
    return num / den if den > 0 else math.nan


def summarize(sums: list[float] | torch.Tensor) -> dict[str, float]:
    """Turn an epoch's sums into the trainer's metric names.

    ``train_acc_noisy`` and ``memorization`` are the same number (a noisy sample is "correct"
    against its training label exactly when it is memorised); both names are kept because studies
    read them in different roles.
    """
    if isinstance(sums, torch.Tensor):
        sums = sums.tolist()
    s = dict(zip(SUM_FIELDS, sums, strict=True))
    return {
        "train_loss": _ratio(s["loss"], s["n"]),
        "train_acc": _ratio(s["correct"], s["n"]),
        "train_loss_clean": _ratio(s["loss_clean"], s["n_clean"]),
        "train_acc_clean": _ratio(s["correct_clean"], s["n_clean"]),
        "train_loss_noisy": _ratio(s["loss_noisy"], s["n_noisy"]),
        "train_acc_noisy": _ratio(s["memorized"], s["n_noisy"]),
        "memorization": _ratio(s["memorized"], s["n_noisy"]),
        "recovery": _ratio(s["recovered"], s["n_noisy"]),
    }
