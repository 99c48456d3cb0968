"""Post-hoc calibration of a classifier's probabilities: temperature scaling and vector scaling, fitted by NLL.

References:
    Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017 (temperature and vector
    scaling, section 4.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

CALIBRATION_METHODS = ("temperature", "vector", "none")


def _as_views(logits: np.ndarray) -> np.ndarray:
    """(N, C) or (N, V, C) logits -> (N, V, C): V test-time-augmentation views of each case."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2:
        logits = logits[:, None, :]
    if logits.ndim != 3:
        raise ValueError(f"logits must be (cases, classes) or (cases, views, classes), got shape {logits.shape}")
    return logits


def _probs_torch(logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Mean over views of softmax(logits * weight + bias)."""
    return torch.softmax(logits * weight + bias, dim=-1).mean(dim=1)


def calibrated_probs(logits: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """Class probabilities from (N, C) or (N, V, C) logits: calibrate each view, then average the views."""
    views = _as_views(logits)
    weight, bias = _parameters(calibration, views.shape[-1])
    scaled = views * weight + bias
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs.mean(axis=1)


def _parameters(calibration: dict[str, Any] | None, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-class multiplier, per-class offset) a calibration block stands for; identity when there is none."""
    if not calibration or calibration.get("method", "none") == "none":
        return np.ones(num_classes), np.zeros(num_classes)
    if calibration["method"] == "temperature":
        return np.full(num_classes, 1.0 / float(calibration["temperature"])), np.zeros(num_classes)
    if calibration["method"] == "vector":
        weight, bias = np.asarray(calibration["weight"], float), np.asarray(calibration["bias"], float)
        if weight.shape != (num_classes,) or bias.shape != (num_classes,):
            raise ValueError(f"vector calibration has {weight.shape[0]} weights for a {num_classes}-class model")
        return weight, bias
    raise ValueError(f"unknown calibration method '{calibration['method']}'; expected one of {CALIBRATION_METHODS}")


def calibration_method_of(card: dict[str, Any]) -> str:
    """The calibration method a bundle was shipped with (temperature for bundles that predate calibration), so a
    stage that changes the network re-fits the same kind."""
    return (card.get("calibration") or {}).get("method", "temperature")


def negative_log_likelihood(probs: np.ndarray, labels: Sequence[int]) -> float:
    """Mean −log p(true class)."""
    labels = np.asarray(labels)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_calibration(
    logits: np.ndarray, labels: Sequence[int], method: str = "temperature", fitted_on: str = "validation"
) -> dict[str, Any]:
    """Fit temperature (one scalar) or vector scaling (a multiplier and an offset per class) by minimising the NLL.

    `logits` may carry test-time-augmentation views (N, V, C): the fitted map is applied to each view before the
    views' probabilities are averaged, exactly as the predictor does. Returns the card's `calibration` block.
    """
    from pipelines.evaluation.metrics import expected_calibration_error

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method '{method}'; expected one of {CALIBRATION_METHODS}")
    views = _as_views(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(views) or len(labels) == 0:
        raise ValueError(f"{len(labels)} labels for {len(views)} cases; calibration needs one label per case")
    num_classes = views.shape[-1]
    before = calibrated_probs(views, None)
    block: dict[str, Any] = {"method": method, "fitted_on": fitted_on, "n": int(len(labels))}
    if method == "none":
        block["temperature"] = 1.0
    else:
        x = torch.from_numpy(views)
        y = torch.from_numpy(labels)
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        params = [log_t]
        if method == "vector":
            log_w = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
            bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
            params = [log_w, bias]
        optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def weights() -> tuple[torch.Tensor, torch.Tensor]:
            if method == "temperature":
                return torch.exp(-log_t).expand(num_classes), torch.zeros(num_classes, dtype=torch.float64)
            return torch.exp(log_w), bias

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            weight, offset = weights()
            probs = _probs_torch(x, weight, offset)
            loss = -torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).mean()
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
        weight, offset = (t.detach().numpy() for t in weights())
        if method == "temperature":
            block["temperature"] = float(np.exp(log_t.item()))
        else:
            block.update(weight=weight.tolist(), bias=offset.tolist())
    after = calibrated_probs(views, block)
    block.update(
        ece_before=expected_calibration_error(labels, before),
        ece_after=expected_calibration_error(labels, after),
        nll_before=negative_log_likelihood(before, labels),
        nll_after=negative_log_likelihood(after, labels),
    )
    return block
