"""Linear probes: from every layer's hidden state at every latent slot, predict each step's intermediate
result on held-out problems (closed-form ridge, leave-one-out strength), next to a shuffled-label control and
the majority-class rate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .collect import _torch_threads


TARGETS = ("last_digit", "log_value", "holder")
CLASSES = ("last_digit", "holder")  # targets probed as classes (accuracy); log_value is a regression (R²)


def _holders(example) -> list[int]:
    """Per step of a shuffled walk, the index in :data:`kava_lab.synthetic.NAMES` of who holds the count after it
    (the step's second name: "Maria gives Nina + 5, ..." or "<< Maria gives Nina + 5: ...>>" -> Nina)."""
    import re

    from ..synthetic import NAMES

    index = {name: i for i, (name, _, _) in enumerate(NAMES)}
    pattern = re.compile(r"\b(" + "|".join(index) + r")\b")
    out = []
    for step in example.steps:
        names = pattern.findall(step)
        if len(names) < 2:
            raise ValueError(f"example {example.id!r}: step {step!r} names no giver and receiver; the 'holder' probe "
                             "needs shuffled walks (synthetic:LO-HI:shuffled)")
        out.append(index[names[1]])
    return out


def probe_targets(examples: Sequence, target: str = "last_digit", n_steps: int | None = None
                  ) -> tuple[Tensor, list[str]]:
    """Per example and step the probe's label: ``[B, K]`` with ``K = n_steps + 1`` columns (step 1..n, then
    the final answer); ``last_digit`` gives class ids (``-1`` where the example has no such step),
    ``log_value`` gives ``log(1 + |value|)`` (NaN where missing), and ``holder`` (shuffled walks) the index of the
    person holding the count after the step (the answer column: the last holder, whom the question names)."""
    if target not in TARGETS:
        raise ValueError(f"unknown probe target {target!r}; expected one of {TARGETS}")
    values = [list(e.step_values) for e in examples]
    if not any(values):
        raise ValueError("the examples carry no step_values (synthetic problems and equation traces do)")
    n = n_steps if n_steps is not None else max(len(v) for v in values)
    names = [f"step {i + 1}" for i in range(n)] + ["answer"]
    if target == "holder":
        held = [_holders(e) for e in examples]
        return torch.tensor([[h[i] if i < len(h) else -1 for i in range(n)] + [h[-1]] for h in held]), names
    rows = []
    for e, v in zip(examples, values):  # ragged Python lists -> one table
        answer = e.answer_value if v == [] else v[-1]
        rows.append([v[i] if i < len(v) else math.nan for i in range(n)] + [answer])
    table = torch.tensor(rows, dtype=torch.float64)
    if target == "last_digit":
        ok = torch.isfinite(table) & (table == table.round())
        digits = torch.where(ok, table.nan_to_num(0).abs().remainder(10), torch.full_like(table, -1))
        return digits.long(), names
    return torch.log1p(table.abs()).float(), names


def ridge_fit_predict(x_train: Tensor, y_train: Tensor, x_test: Tensor,
                      lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4),
                      classify: bool = True) -> tuple[Tensor, Tensor]:
    """Batched closed-form ridge with leave-one-out choice of the strength, per probe.

    ``x_train`` ``[P, n, D]``, ``y_train`` ``[n, C]`` (one-hot for classes, ``C=1`` values), ``x_test``
    ``[P, m, D]``. Features are standardised with training statistics and an intercept is fitted. The LOO
    prediction of ridge is exact from one SVD: ``(ŷ_i - H_ii y_i) / (1 - H_ii)`` (hat diagonal ``H_ii``
    plus ``1/n`` for the intercept). LOO criterion: accuracy (classify) or squared error.
    Returns test predictions ``[P, m, C]``, the chosen lambda ``[P]`` and its LOO score ``[P]`` (accuracy,
    or minus the mean squared error).
    """
    x = x_train.double()
    y = y_train.double()
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp(min=1e-6)
    xs, xt = (x - mu) / sd, (x_test.double() - mu) / sd
    ybar = y.mean(0)
    yc = y - ybar
    n = x.shape[1]
    u, s, vh = torch.linalg.svd(xs, full_matrices=False)  # [P, n, r], [P, r], [P, r, D]
    uty = u.transpose(1, 2) @ yc  # [P, r, C]
    best_score = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
    best_lam = torch.zeros(x.shape[0], dtype=torch.float64)
    best_pred = None
    for lam in sorted(lambdas, reverse=True):  # strongest first: ties keep the simpler probe; batched over probes
        shrink = s.pow(2) / (s.pow(2) + lam)  # [P, r]
        fitted = u @ (shrink[..., None] * uty)  # [P, n, C]
        hat = (u.pow(2) * shrink[:, None, :]).sum(-1) + 1.0 / n  # [P, n]
        loo = (fitted - hat[..., None] * yc) / (1 - hat[..., None]).clamp(min=1e-6) + ybar
        if classify:
            score = (loo.argmax(-1) == y.argmax(-1)).double().mean(1)
        else:
            score = -(loo - y).pow(2).mean((1, 2))
        coef = vh.transpose(1, 2) @ ((s / (s.pow(2) + lam))[..., None] * uty)  # [P, D, C]
        pred = xt @ coef + ybar
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_lam = torch.where(better, torch.full_like(best_lam, lam), best_lam)
        best_pred = pred if best_pred is None else torch.where(better[:, None, None], pred, best_pred)
    return best_pred.float(), best_lam.float(), best_score.float()


@dataclass
class ProbeResult:
    """Held-out scores of linear probes per target step, layer and slot."""

    target: str  # "last_digit" or "holder" (accuracy), or "log_value" (R²)
    metric: str  # "accuracy" or "r2"
    step_names: list[str]  # [K]
    score: Tensor  # [K, L+1, M] on held-out problems
    control: Tensor  # [K, L+1, M] same probes fit on shuffled training labels (mean over shuffles)
    chance: Tensor  # [K] majority-class accuracy (classes) or 0 (R²)
    n_train: Tensor  # [K]
    n_test: Tensor  # [K]
    lambdas: Tensor  # [K, L+1, M] chosen ridge strength
    loo: Tensor  # [K, L+1, M] leave-one-out score on the training problems (accuracy or -MSE)

    def best(self) -> list[dict]:
        """Per step: the (layer, slot) with the best leave-one-out score on the *training* problems (so the
        held-out score is not a maximum over noisy test scores), its held-out score, the shuffled control
        there and its maximum over all sites, and chance."""
        out = []
        for k, name in enumerate(self.step_names):
            s = self.score[k]
            if torch.isnan(s).all():
                continue
            flat = int(torch.nan_to_num(self.loo[k], nan=-math.inf).flatten().argmax())
            layer, slot = divmod(flat, s.shape[1])
            out.append({"step": name, "layer": layer, "slot": slot, self.metric: float(s[layer, slot]),
                        "max_over_sites": float(torch.nan_to_num(s, nan=-math.inf).max()),
                        "control": float(self.control[k, layer, slot]),
                        "control_max": float(torch.nan_to_num(self.control[k], nan=-math.inf).max()),
                        "chance": float(self.chance[k]), "n_train": int(self.n_train[k]),
                        "n_test": int(self.n_test[k])})
        return out


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def linear_probes(hidden: Tensor, examples: Sequence | None = None, target: str = "last_digit",
                  labels: Tensor | None = None, step_names: list[str] | None = None,
                  test_fraction: float = 0.3, seed: int = 0, n_shuffles: int = 3, min_examples: int = 10,
                  lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4), threads: int | None = 1
                  ) -> ProbeResult:
    """Fit one linear probe per (target step, layer, slot) from ``hidden`` ``[B, L+1, M, D]`` (see
    :func:`latent_hidden_states`) to the step's label (:func:`probe_targets` of ``examples``, or ``labels``
    ``[B, K]`` directly), training on a random ``1 - test_fraction`` of the problems and scoring on the rest.

    The control refits every probe on training labels shuffled across problems (``n_shuffles`` times,
    scores averaged): what a probe of this capacity reaches when the hidden states carry no information
    about the label. A step with fewer than ``min_examples`` training problems is left NaN. ``threads``
    caps torch's threads while fitting (None: leave as is).
    """
    with _torch_threads(threads):
        return _linear_probes(hidden, examples, target, labels, step_names, test_fraction, seed, n_shuffles,
                              min_examples, lambdas)


def _linear_probes(hidden, examples, target, labels, step_names, test_fraction, seed, n_shuffles, min_examples,
                   lambdas) -> ProbeResult:
    if labels is None:
        if examples is None:
            raise ValueError("give examples (with step_values) or labels")
        labels, step_names = probe_targets(examples, target)
    classify = target in CLASSES
    B, L1, M, D = hidden.shape
    K = labels.shape[1]
    step_names = step_names or [f"target {k}" for k in range(K)]
    x_all = hidden.float().permute(1, 2, 0, 3).reshape(L1 * M, B, D)  # [P, B, D]
    train_idx, test_idx = _split(B, test_fraction, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    score = torch.full((K, L1, M), math.nan)
    control = torch.full((K, L1, M), math.nan)
    lam_out = torch.full((K, L1, M), math.nan)
    loo_out = torch.full((K, L1, M), math.nan)
    chance = torch.full((K,), math.nan)
    n_train, n_test = torch.zeros(K, dtype=torch.long), torch.zeros(K, dtype=torch.long)
    n_classes = max(10, int(labels.max()) + 1) if classify else 0
    for k in range(K):  # a few target steps; each fits all (layer, slot) probes in one batched solve
        y = labels[:, k]
        valid = (y >= 0) if classify else torch.isfinite(y)
        tr, te = train_idx[valid[train_idx]], test_idx[valid[test_idx]]
        n_train[k], n_test[k] = len(tr), len(te)
        if len(tr) < min_examples or len(te) < 1:
            continue
        if classify:
            y_tr = torch.nn.functional.one_hot(y[tr], n_classes).float()
            y_te = y[te]
            counts = torch.bincount(y[tr], minlength=n_classes)
            chance[k] = (y_te == counts.argmax()).float().mean()
        else:
            y_tr = y[tr, None].float()
            y_te = y[te].float()
            chance[k] = 0.0

        def evaluate(y_fit):
            pred, lam, loo = ridge_fit_predict(x_all[:, tr], y_fit, x_all[:, te], lambdas, classify)
            if classify:
                return (pred.argmax(-1) == y_te).float().mean(1), lam, loo
            resid = (pred[..., 0] - y_te).pow(2).sum(1)
            total = (y_te - y[tr].float().mean()).pow(2).sum().clamp(min=1e-12)
            return 1 - resid / total, lam, loo

        s, lam, loo = evaluate(y_tr)
        score[k], lam_out[k], loo_out[k] = s.view(L1, M), lam.view(L1, M), loo.view(L1, M)
        shuffled = [evaluate(y_tr[torch.randperm(len(tr), generator=gen)])[0] for _ in range(n_shuffles)]
        control[k] = torch.stack(shuffled).mean(0).view(L1, M)
    return ProbeResult(target=target, metric="accuracy" if classify else "r2", step_names=step_names,
                       score=score, control=control, chance=chance, n_train=n_train, n_test=n_test,
                       lambdas=lam_out, loo=loo_out)
