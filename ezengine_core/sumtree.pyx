# cython: language_level=3
"""Sum-tree over replay priorities for prioritized experience replay.

Leaves hold priority**alpha; internal nodes hold the sum of their children, and parallel
min- and max-trees hold the minimum (for importance weights) and the maximum (new data
enters at the current maximum priority). Updates recompute parents from their
children rather than adding deltas, so sums never drift. Every batched operation is one call
with a C loop: O(n log capacity), independent of how full the buffer is.
"""
import numpy as np

cimport numpy as cnp
from libc.math cimport isfinite, pow, INFINITY
from libc.stdint cimport int64_t

cnp.import_array()


cdef class SumTree:
    """Priorities of `capacity` items; unset items have priority 0 and are never sampled.

    Args:
        capacity: number of items (indices 0..capacity-1).
        alpha: priorities are stored as p**alpha.
    """

    cdef int64_t capacity, leaves
    cdef double alpha
    cdef double[::1] sums
    cdef double[::1] mins
    cdef double[::1] maxs

    def __init__(self, int64_t capacity, double alpha=1.0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not (alpha >= 0.0) or not isfinite(alpha):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        self.capacity = capacity
        self.alpha = alpha
        self.leaves = 1
        while self.leaves < capacity:
            self.leaves *= 2
        self.sums = np.zeros(2 * self.leaves, dtype=np.float64)
        self.mins = np.full(2 * self.leaves, np.inf, dtype=np.float64)
        self.maxs = np.zeros(2 * self.leaves, dtype=np.float64)

    @property
    def capacity(self) -> int:
        return self.capacity

    @property
    def alpha(self) -> float:
        return self.alpha

    @property
    def total(self) -> float:
        """Sum of p**alpha over all items."""
        return self.sums[1]

    @property
    def min(self) -> float:
        """Smallest p**alpha among items with a priority set (inf when none)."""
        return self.mins[1]

    @property
    def max_priority(self) -> float:
        """Largest priority (before the alpha power) among items set; 0 when none."""
        if self.maxs[1] <= 0.0:
            return 0.0
        return self.maxs[1] ** (1.0 / self.alpha) if self.alpha > 0 else 1.0

    def _indices(self, indices):
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise ValueError(f"indices must be an integer array, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity):
            raise ValueError(
                f"indices must be in 0..{self.capacity - 1} (the capacity is {self.capacity}), "
                f"got values in {idx.min()}..{idx.max()}")
        return idx

    def update(self, indices, priorities):
        """Set the priorities (before the alpha power) of items `indices`.

        Args:
            indices: int [n]; with repeats, the last value wins.
            priorities: float [n], finite and > 0.
        """
        idx = self._indices(indices)
        pri = np.asarray(priorities)
        if pri.dtype.kind not in "fiu":
            raise ValueError(f"priorities must be numeric, got dtype {pri.dtype}")
        if pri.shape != idx.shape:
            raise ValueError(
                f"priorities must have the shape of indices {idx.shape}, got {pri.shape}")
        pri = np.ascontiguousarray(pri, dtype=np.float64)
        if not np.isfinite(pri).all() or (pri <= 0).any():
            raise ValueError("priorities must be finite and > 0")
        cdef int64_t[::1] iv = idx
        cdef double[::1] pv = pri
        cdef int64_t i, n = idx.shape[0], node
        cdef double a = self.alpha
        cdef double[::1] sums = self.sums
        with nogil:
            for i in range(n):
                node = iv[i] + self.leaves
                sums[node] = pow(pv[i], a)
                self._set_leaf(node, sums[node], sums[node], sums[node])

    cdef void _set_leaf(self, int64_t node, double value, double min_value,
                        double max_value) noexcept nogil:
        """Set one leaf and recompute its ancestors from their children."""
        cdef double l, r
        self.sums[node] = value
        self.mins[node] = min_value
        self.maxs[node] = max_value
        node = node // 2
        while node >= 1:
            self.sums[node] = self.sums[2 * node] + self.sums[2 * node + 1]
            l = self.mins[2 * node]
            r = self.mins[2 * node + 1]
            self.mins[node] = l if l < r else r
            l = self.maxs[2 * node]
            r = self.maxs[2 * node + 1]
            self.maxs[node] = l if l > r else r
            node = node // 2

    def clear(self, indices):
        """Remove items `indices` from sampling (priority 0, excluded from the minimum)."""
        idx = self._indices(indices)
        cdef int64_t[::1] iv = idx
        cdef int64_t i, n = idx.shape[0]
        with nogil:
            for i in range(n):
                self._set_leaf(iv[i] + self.leaves, 0.0, INFINITY, 0.0)

    def grow(self, int64_t capacity):
        """Enlarge to `capacity` items; the new items are unset, and every stored p**alpha
        (sum, min and max alike) is carried over exactly, not recomputed from p."""
        if capacity < self.capacity:
            raise ValueError(f"cannot shrink from {self.capacity} to {capacity} items")
        cdef int64_t leaves = self.leaves, lo
        while leaves < capacity:
            leaves *= 2
        arrays = []
        for old, fill in ((np.asarray(self.sums), 0.0), (np.asarray(self.mins), np.inf),
                          (np.asarray(self.maxs), 0.0)):
            new = np.full(2 * leaves, fill, dtype=np.float64)
            new[leaves:leaves + self.capacity] = old[self.leaves:self.leaves + self.capacity]
            arrays.append(new)
        sums, mins, maxs = arrays
        # Parents from their children, level by level (as _set_leaf computes them).
        lo = leaves // 2
        while lo >= 1:
            sums[lo:2 * lo] = sums[2 * lo:4 * lo:2] + sums[2 * lo + 1:4 * lo:2]
            mins[lo:2 * lo] = np.minimum(mins[2 * lo:4 * lo:2], mins[2 * lo + 1:4 * lo:2])
            maxs[lo:2 * lo] = np.maximum(maxs[2 * lo:4 * lo:2], maxs[2 * lo + 1:4 * lo:2])
            lo //= 2
        self.sums, self.mins, self.maxs = sums, mins, maxs
        self.leaves, self.capacity = leaves, capacity

    def get(self, indices):
        """float64 [n]: stored p**alpha of items `indices`."""
        idx = self._indices(indices)
        return np.asarray(self.sums)[idx + self.leaves]

    def sample(self, uniforms):
        """Stratified sampling proportional to p**alpha.

        Args:
            uniforms: float [n] in [0, 1); draw i falls in the i-th of n equal strata of the
                total mass, at relative position uniforms[i].

        Returns:
            indices int64 [n] and their p**alpha as float64 [n].
        """
        u = np.asarray(uniforms)
        if u.dtype.kind != "f" or u.ndim != 1:
            raise ValueError(f"uniforms must be a 1-D float array, got {u.dtype} {u.shape}")
        u = np.ascontiguousarray(u, dtype=np.float64)
        if u.size and (not np.isfinite(u).all() or u.min() < 0.0 or u.max() >= 1.0):
            raise ValueError("uniforms must lie in [0, 1)")
        cdef double total = self.sums[1]
        if not (total > 0.0):
            raise ValueError("cannot sample: no item has a priority")
        cdef int64_t n = u.shape[0], i, node
        out_idx = np.empty(n, dtype=np.int64)
        out_p = np.empty(n, dtype=np.float64)
        cdef int64_t[::1] oi = out_idx
        cdef double[::1] op = out_p, uv = u, sums = self.sums
        cdef double segment = total / n if n > 0 else 0.0, target, left
        with nogil:
            for i in range(n):
                target = (i + uv[i]) * segment
                node = 1
                while node < self.leaves:
                    left = sums[2 * node]
                    # Go right only into positive mass, so rounding never lands on an
                    # empty leaf.
                    if (target < left or sums[2 * node + 1] <= 0.0) and left > 0.0:
                        node = 2 * node
                    else:
                        target = target - left
                        node = 2 * node + 1
                oi[i] = node - self.leaves
                op[i] = sums[node]
        return out_idx, out_p
