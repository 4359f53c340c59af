"""Pure-Python reference of the batched MCTS, written from the EfficientZero rules for clarity.

One `Node` object per node; each root searched independently. The compiled core must give
the same visit counts and root values. Floating-point operations follow the same order as
the core, and tie-breaking uses the same splitmix64 stream per root, so results match exactly.
"""
from __future__ import annotations

import math

import numpy as np

MASK64 = (1 << 64) - 1
TIE_TOLERANCE = 1e-9


class SplitMix64:
    """The per-root tie-breaking generator (same stream as the core)."""

    def __init__(self, seed: int, root: int) -> None:
        self.state = (seed * 0x100000001B3 + root) & MASK64
        self.state = self.next()

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


class Node:
    def __init__(self, depth: int, value_prefix: float, prior: list[float]) -> None:
        self.depth = depth
        self.value_prefix = value_prefix
        self.prior = prior
        self.children: dict[int, Node] = {}
        self.visits = 0
        self.value_sum = 0.0

    def value(self) -> float:
        return self.value_sum / self.visits


def softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    t = 0.0
    for x in e:
        t += x
    return [x / t for x in e]


class ReferenceTree:
    """One root's search."""

    def __init__(self, logits, legal, noise, noise_fraction, *, discount, c_init, c_base,
                 floor, horizon, rng: SplitMix64) -> None:
        self.discount, self.c_init, self.c_base = discount, c_init, c_base
        self.floor, self.horizon, self.rng = floor, horizon, rng
        self.legal = [bool(x) for x in legal]
        legal_logits = [float(x) for x, ok in zip(logits, self.legal, strict=False) if ok]
        probs = iter(softmax(legal_logits))
        prior = [next(probs) if ok else 0.0 for ok in self.legal]
        if noise is not None:
            prior = [
                (1.0 - noise_fraction) * p + noise_fraction * float(n) if ok else p
                for p, n, ok in zip(prior, noise, self.legal, strict=False)
            ]
        self.root = Node(0, 0.0, prior)
        self.qmin, self.qmax = math.inf, -math.inf
        self.path: list[Node] = []
        self.action = -1

    def is_reset(self, node: Node) -> bool:
        if self.horizon == 0:
            return node.depth == 0
        return node.depth % self.horizon == 0

    def reward(self, parent: Node, child: Node) -> float:
        if self.is_reset(parent):
            return child.value_prefix
        return child.value_prefix - parent.value_prefix

    def q(self, parent: Node, child: Node) -> float:
        return self.reward(parent, child) + self.discount * child.value()

    def normalize(self, q: float) -> float:
        if self.qmin > self.qmax:
            return q
        v = (q - self.qmin) / max(self.qmax - self.qmin, self.floor)
        return min(max(v, 0.0), 1.0)

    def select(self) -> tuple[Node, int]:
        node, parent_q, at_root = self.root, 0.0, True
        self.path = [node]
        while True:
            visited = {a: self.q(node, c) for a, c in node.children.items()}
            q_sum = 0.0
            for a in sorted(visited):
                q_sum += visited[a]
            n_p = 0.0
            for a in sorted(node.children):
                n_p += node.children[a].visits
            if at_root:
                mean_q = q_sum / len(visited) if visited else 0.0
            else:
                mean_q = (parent_q + q_sum) / (len(visited) + 1)
            pb_c = (self.c_init + math.log((n_p + self.c_base + 1.0) / self.c_base)) \
                * math.sqrt(n_p)
            scores = []
            for a in range(len(node.prior)):
                if at_root and not self.legal[a]:
                    scores.append(-math.inf)
                elif a in node.children:
                    child = node.children[a]
                    scores.append(self.normalize(visited[a])
                                  + node.prior[a] * pb_c / (1.0 + child.visits))
                else:
                    scores.append(self.normalize(mean_q) + node.prior[a] * pb_c)
            best = max(scores)
            ties = [a for a, s in enumerate(scores) if s >= best - TIE_TOLERANCE]
            action = ties[0] if len(ties) == 1 else ties[self.rng.next() % len(ties)]
            if action not in node.children:
                self.action = action
                return node, action
            parent_q, at_root = mean_q, False
            node = node.children[action]
            self.path.append(node)

    def expand(self, value_prefix: float, value: float, logits) -> None:
        parent = self.path[-1]
        leaf = Node(parent.depth + 1, float(value_prefix), softmax([float(x) for x in logits]))
        parent.children[self.action] = leaf
        path = [*self.path, leaf]
        g = float(value)
        for i in range(len(path) - 1, -1, -1):
            node = path[i]
            node.value_sum += g
            node.visits += 1
            if i > 0:
                r = self.reward(path[i - 1], node)
                q = r + self.discount * node.value()
                self.qmin, self.qmax = min(self.qmin, q), max(self.qmax, q)
                g = r + self.discount * g


def reference_search(root_logits, legal, noise, noise_fraction, leaf_value_prefix, leaf_value,
                     leaf_logits, *, discount, c_init=1.25, c_base=19652.0, floor=0.01,
                     horizon=5, seed=0):
    """Run S simulations for B roots with pre-generated leaf outputs.

    Leaf outputs are indexed [s, b] like the benchmark workload. Returns (visit counts
    int [B, A], root values float [B], leaf depths int [B, S]).
    """
    root_logits = np.asarray(root_logits, dtype=np.float32)
    B, A = root_logits.shape
    S = leaf_value.shape[0]
    # The core works on float32 inputs widened to double; do the same.
    vp = np.asarray(leaf_value_prefix, dtype=np.float32)
    val = np.asarray(leaf_value, dtype=np.float32)
    lg = np.asarray(leaf_logits, dtype=np.float32)
    nz = None if noise is None else np.asarray(noise, dtype=np.float32)
    counts = np.zeros((B, A), dtype=np.int64)
    values = np.zeros(B)
    depths = np.zeros((B, S), dtype=np.int64)
    for b in range(B):
        tree = ReferenceTree(
            root_logits[b], np.ones(A) if legal is None else legal[b],
            None if nz is None else nz[b], float(np.broadcast_to(noise_fraction, (B,))[b]),
            discount=discount, c_init=c_init, c_base=c_base, floor=floor, horizon=horizon,
            rng=SplitMix64(seed, b))
        for s in range(S):
            parent, _ = tree.select()
            depths[b, s] = parent.depth + 1
            tree.expand(vp[s, b], val[s, b], lg[s, b])
        for a, child in tree.root.children.items():
            counts[b, a] = child.visits
        values[b] = tree.root.value()
    return counts, values, depths
