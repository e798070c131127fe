"""Mine pattern rules from data: a decision tree over on/off features at one layer.

Following Gopinath et al. ("Property Inference for Deep Neural Networks"), each pure enough
leaf of a decision tree fitted on a layer's activation pattern becomes a rule: the conjunction
of the on/off tests on its path. Rules are chosen on a training split and scored on held-out
inputs, so the reported support, precision and recall are honest estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from sklearn.tree import DecisionTreeClassifier
from torch import Tensor

from app.analyses.patterns.rules import Rule, decisions, layer_pattern, layer_values, relu_node
from app.errors import InvalidInputError
from app.network import Network
from app.progress import ProgressFn, report


@dataclass
class MinedRules:
    """Rules mined at one layer; ``heldout`` indexes the inputs their statistics come from."""

    layer: int
    node: int
    rules: list[Rule]
    heldout: np.ndarray
    num_train: int
    num_neurons: int
    tree_depth: int


@dataclass
class RuleList:
    """A rule-list classifier distilled from the network: first firing rule wins.

    ``fidelity`` is its agreement with the network's decisions on held-out inputs.
    """

    layer: int
    node: int
    rules: list[Rule]
    default: int
    fidelity: float
    heldout: np.ndarray
    lowest: bool = False
    coverage: dict[int, int] = field(default_factory=dict)

    def predict(self, net: Network, x: Tensor) -> np.ndarray:
        """Class per input of the batch ``x``, from the rules alone (no output layer)."""
        values = layer_values(net, x, self.node)
        out = np.full(x.shape[0], self.default)
        open_ = torch.ones(x.shape[0], dtype=torch.bool)
        for rule in self.rules:
            hit = rule.fires_on_values(values) & open_
            out[hit.numpy()] = rule.target
            open_ &= ~hit
        return out


def mine_rules(
    net: Network,
    inputs: Tensor,
    layer: int = -1,
    target: int | None = None,
    min_support: int = 5,
    min_precision: float = 0.95,
    max_depth: int = 8,
    holdout: float = 0.3,
    lowest: bool = False,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> MinedRules:
    """Rules ``pattern at ReLU layer `layer` => decision is `target``` mined from ``inputs``.

    ``layer`` is the 1-based ReLU layer (``-1`` = last). ``target=None`` mines rules for every
    class. A leaf becomes a rule when it holds at least ``min_support`` training inputs and
    at least ``min_precision`` of them get the rule's class. Statistics are on held-out inputs.
    """
    ordinal, node = relu_node(net, layer)
    report(progress, 0.0, f"recording patterns at L{ordinal}")
    train, test, feats, labels = _split_patterns(net, inputs, node, holdout, lowest, seed)
    y = labels if target is None else (labels == target).astype(int)
    tree = DecisionTreeClassifier(
        max_depth=max_depth, min_samples_leaf=max(1, min_support // 2), random_state=seed
    ).fit(feats[train], y[train])
    report(progress, 0.6, "turning leaves into rules")
    rules = []
    for path, counts in _leaf_paths(tree):
        literals = tuple((n, on) for n, on, _ in path)
        cls = int(tree.classes_[np.argmax(counts)])
        if target is not None and cls != 1:
            continue
        total = counts.sum()
        if total < min_support or counts.max() / total < min_precision:
            continue
        rule_target = cls if target is None else target
        rules.append(_score(Rule(ordinal, node, literals, rule_target, lowest),
                            feats[test], labels[test]))
    rules.sort(key=lambda r: (-r.support, -r.precision))
    report(progress, 1.0, f"{len(rules)} rules at L{ordinal}")
    return MinedRules(ordinal, node, rules, test, int(train.size), feats.shape[1],
                      int(tree.get_depth()))


def distill(
    net: Network,
    inputs: Tensor,
    layer: int = -1,
    max_depth: int | None = 8,
    min_leaf: int = 2,
    holdout: float = 0.3,
    lowest: bool = False,
    seed: int = 0,
    literals: Literal["pattern", "threshold"] = "pattern",
    max_rules: int | None = None,
    augment: int = 0,
    noise: float = 0.15,
    input_range: tuple[float, float] = (0.0, 1.0),
    heldout: np.ndarray | None = None,
) -> RuleList:
    """A rule list (one rule per leaf of a multiclass tree) that imitates the network.

    ``literals="pattern"`` tests neurons on/off; ``"threshold"`` compares pre-activations
    with learned thresholds, which keeps the magnitudes that on/off loses. ``max_rules``
    caps the leaves (the size/fidelity trade-off). ``augment`` adds that many copies of the
    training inputs with uniform noise of ``noise`` times the input range (clipped to it),
    labelled by the network, since a tree needs more inputs than a gallery holds.
    ``heldout`` (indices of ``inputs``) replaces the random ``holdout`` split. ``fidelity``
    is the share of held-out inputs on which the rule list and the network decide the same.
    """
    ordinal, node = relu_node(net, layer)
    train, test, _, labels = _split_patterns(net, inputs, node, holdout, lowest, seed, heldout)
    x_train = inputs[train]
    if augment > 0:
        gen = torch.Generator().manual_seed(seed)
        lo, hi = input_range
        shaken = x_train.repeat(augment, *([1] * (x_train.dim() - 1)))
        shaken = shaken + noise * (hi - lo) * (2 * torch.rand(shaken.shape, generator=gen) - 1)
        x_train = torch.cat([x_train, shaken.clamp(lo, hi).to(x_train.dtype)])
    y_train = decisions(net, x_train, lowest)
    feats = layer_values(net, x_train, node).numpy()
    if literals == "pattern":
        feats = (feats > 0).astype(np.int8)
    tree = DecisionTreeClassifier(
        max_depth=max_depth, min_samples_leaf=min_leaf, max_leaf_nodes=max_rules,
        random_state=seed,
    ).fit(feats, y_train)
    test_values = layer_values(net, inputs[test], node)
    rules = [
        _score(Rule(ordinal, node, tuple((n, on) for n, on, _ in path),
                    int(tree.classes_[np.argmax(counts)]), lowest,
                    thresholds=(tuple(float(t) for _, _, t in path)
                                if literals == "threshold" else ())),
               test_values, labels[test])
        for path, counts in _leaf_paths(tree)
    ]
    rules.sort(key=lambda r: (-r.precision, -r.support))
    default = int(np.bincount(y_train).argmax())
    rule_list = RuleList(ordinal, node, rules, default, 0.0, test, lowest)
    predicted = rule_list.predict(net, inputs[test])
    rule_list.fidelity = float((predicted == labels[test]).mean())
    rule_list.coverage = {int(c): int((labels[test] == c).sum()) for c in np.unique(labels[test])}
    return rule_list


def _split_patterns(
    net: Network, inputs: Tensor, node: int, holdout: float, lowest: bool, seed: int,
    heldout: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/held-out index arrays, on/off features and the network's decisions."""
    if inputs.dim() == len(net.input_shape):
        inputs = inputs.unsqueeze(0)
    if tuple(inputs.shape[1:]) != net.input_shape:
        raise InvalidInputError(
            f"inputs have shape {tuple(inputs.shape[1:])}, the model takes {net.input_shape}"
        )
    n = inputs.shape[0]
    if n < 10:
        raise InvalidInputError(f"mining needs at least 10 inputs, got {n}")
    if not 0.0 < holdout < 1.0:
        raise InvalidInputError(f"holdout must be in (0, 1), got {holdout}")
    feats = layer_pattern(net, inputs, node).numpy().astype(np.int8)
    labels = decisions(net, inputs, lowest)
    if heldout is not None:
        test = np.unique(np.asarray(heldout, dtype=int))
        if test.size == 0 or test.size >= n or test.min() < 0 or test.max() >= n:
            raise InvalidInputError("heldout must index some, not all, of the inputs")
        return np.setdiff1d(np.arange(n), test), test, feats, labels
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, min(n - 1, round(n * (1 - holdout))))
    return order[:cut], order[cut:], feats, labels


Path = tuple[tuple[int, bool, float], ...]


def _leaf_paths(tree: DecisionTreeClassifier) -> list[tuple[Path, np.ndarray]]:
    """``((neuron, above, threshold), ...), class counts)`` for every leaf: the left child
    of a split is ``feature <= threshold`` (off, for a 0/1 feature), the right one above."""
    t = tree.tree_
    leaves = []
    stack: list[tuple[int, Path]] = [(0, ())]
    while stack:
        i, path = stack.pop()
        if t.children_left[i] == -1:
            counts = t.value[i][0] * t.weighted_n_node_samples[i]
            leaves.append((path, np.rint(counts).astype(int)))
            continue
        f, thr = int(t.feature[i]), float(t.threshold[i])
        stack.append((t.children_left[i], (*path, (f, False, thr))))
        stack.append((t.children_right[i], (*path, (f, True, thr))))
    return leaves


def _score(rule: Rule, values: np.ndarray | Tensor, labels: np.ndarray) -> Rule:
    """``rule`` with support, precision and recall measured on pre-activations (or an on/off
    pattern, for on/off rules) and the network's decisions."""
    values = torch.as_tensor(values)
    fires = (rule.fires_on_values(values) if values.dtype != torch.int8
             else rule.fires_on_pattern(values.bool())).numpy()
    hits = labels == rule.target
    support = int(fires.sum())
    precision = float((fires & hits).sum() / support) if support else 0.0
    recall = float((fires & hits).sum() / hits.sum()) if hits.any() else 0.0
    return Rule(rule.layer, rule.node, rule.literals, rule.target, rule.lowest, support,
                precision, recall, rule.thresholds)
