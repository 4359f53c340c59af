# cython: language_level=3
"""Batched MCTS for EfficientZero, with the whole forest in flat C arrays.

Many roots are searched in lockstep. Python drives one simulation at a time for the whole
batch::

    forest = Forest(batch, actions, simulations, discount=0.988)
    forest.reset_roots(root_logits, legal, noise, noise_fraction=0.25)
    for s in range(simulations):
        parent_slot, action, reset = forest.select()
        # run the model: latent[s + 1] = dynamics(latent[parent_slot], action),
        # starting the value-prefix LSTM from zeros where reset is set
        forest.expand(value_prefix, value, policy_logits)
    counts, values = forest.visit_counts(), forest.root_values()

A node's *slot* is its index inside its own root's tree: the root is slot 0 and the node
created by simulation s is slot s + 1, so the driver can keep latent states in a
[simulations + 1, batch, ...] array on the model's device and never copy them through numpy.

The tree never sees torch: only arrays of value prefixes, values and logits come in.
"""
import numpy as np

cimport numpy as cnp
from libc.math cimport exp, log, sqrt, isfinite, INFINITY
from libc.stdint cimport int32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cnp.import_array()

# Scores within this distance of the best count as a tie, broken by the per-root generator.
cdef double TIE_TOLERANCE = 1e-9


cdef inline uint64_t splitmix64_next(uint64_t* state) noexcept nogil:
    """One step of splitmix64; the pure-Python reference search implements the same."""
    state[0] = state[0] + 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline double normalize_q(double q, double qmin, double qmax, double floor) noexcept nogil:
    """Min-max normalised Q, clipped to [0, 1]; the raw Q before any statistics exist."""
    cdef double delta, v
    if qmin > qmax:
        return q
    delta = qmax - qmin
    if delta < floor:
        delta = floor
    v = (q - qmin) / delta
    if v < 0.0:
        return 0.0
    if v > 1.0:
        return 1.0
    return v


def _float_array(name, value, shape):
    """`value` as a C-contiguous float32 array of `shape`, or ValueError naming `name`."""
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


cdef class Forest:
    """A batch of search trees preallocated for `max_batch` roots and `num_simulations`.

    Args:
        max_batch: the largest number of roots searched together.
        num_actions: A, the size of the action space.
        num_simulations: S, simulations per search (each expands one node per root).
        discount: per-step discount gamma.
        c_init, c_base: pUCT constants.
        value_delta_floor: the smallest max - min used to normalise Q.
        horizon: value-prefix horizon; nodes at a depth that is a multiple of it restart
            the LSTM, so the reward into their children is the child's value prefix itself.
            0 means only the root is a reset point.
        seed: seeds the per-root generators that break ties.

    Min-max statistics are per root and cover the Q(s, a) of every edge backed up so far
    (the root itself has no incoming edge and is not included).
    """

    cdef int max_batch, batch, A, S, N, horizon, sims_done
    cdef bint awaiting_expand
    cdef double discount, c_init, c_base, delta_floor
    cdef int32_t* visits
    cdef double* value_sum
    cdef double* value_prefix
    cdef int32_t* depth
    cdef double* prior
    cdef int32_t* child
    cdef unsigned char* legal
    cdef int32_t* num_nodes
    cdef double* qmin
    cdef double* qmax
    cdef int32_t* path
    cdef int32_t* path_len
    cdef int32_t* pending_action
    cdef uint64_t* rng
    cdef double* q_scratch
    cdef double* score_scratch
    cdef int32_t* tie_scratch

    def __cinit__(self, int max_batch, int num_actions, int num_simulations, *,
                  double discount, double c_init=1.25, double c_base=19652.0,
                  double value_delta_floor=0.01, int horizon=5, uint64_t seed=0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}")
        if num_simulations < 1:
            raise ValueError(f"num_simulations must be >= 1, got {num_simulations}")
        if not (0.0 < discount <= 1.0):
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        if not (c_base > 0.0) or not isfinite(c_init):
            raise ValueError(f"c_base must be > 0 and c_init finite, got {c_base}, {c_init}")
        if not (value_delta_floor > 0.0):
            raise ValueError(f"value_delta_floor must be > 0, got {value_delta_floor}")
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        self.max_batch = max_batch
        self.batch = 0
        self.A = num_actions
        self.S = num_simulations
        self.N = num_simulations + 1
        self.horizon = horizon
        self.discount = discount
        self.c_init = c_init
        self.c_base = c_base
        self.delta_floor = value_delta_floor
        self.sims_done = 0
        self.awaiting_expand = False
        cdef size_t nodes = <size_t>max_batch * self.N
        self.visits = <int32_t*>malloc(nodes * sizeof(int32_t))
        self.value_sum = <double*>malloc(nodes * sizeof(double))
        self.value_prefix = <double*>malloc(nodes * sizeof(double))
        self.depth = <int32_t*>malloc(nodes * sizeof(int32_t))
        self.prior = <double*>malloc(nodes * num_actions * sizeof(double))
        self.child = <int32_t*>malloc(nodes * num_actions * sizeof(int32_t))
        self.legal = <unsigned char*>malloc(<size_t>max_batch * num_actions)
        self.num_nodes = <int32_t*>malloc(max_batch * sizeof(int32_t))
        self.qmin = <double*>malloc(max_batch * sizeof(double))
        self.qmax = <double*>malloc(max_batch * sizeof(double))
        self.path = <int32_t*>malloc(nodes * sizeof(int32_t))
        self.path_len = <int32_t*>malloc(max_batch * sizeof(int32_t))
        self.pending_action = <int32_t*>malloc(max_batch * sizeof(int32_t))
        self.rng = <uint64_t*>malloc(max_batch * sizeof(uint64_t))
        self.q_scratch = <double*>malloc(num_actions * sizeof(double))
        self.score_scratch = <double*>malloc(num_actions * sizeof(double))
        self.tie_scratch = <int32_t*>malloc(num_actions * sizeof(int32_t))
        if (not self.visits or not self.value_sum or not self.value_prefix or not self.depth
                or not self.prior or not self.child or not self.legal or not self.num_nodes
                or not self.qmin or not self.qmax or not self.path or not self.path_len
                or not self.pending_action or not self.rng or not self.q_scratch or not self.score_scratch
                or not self.tie_scratch):
            raise MemoryError("cannot allocate the search forest")
        cdef int b
        cdef uint64_t state
        for b in range(max_batch):
            # Independent stream per root: roots never share tie-breaking draws.
            state = seed * 0x100000001B3ULL + <uint64_t>b
            self.rng[b] = splitmix64_next(&state)

    def __dealloc__(self):
        free(self.visits)
        free(self.value_sum)
        free(self.value_prefix)
        free(self.depth)
        free(self.prior)
        free(self.child)
        free(self.legal)
        free(self.num_nodes)
        free(self.qmin)
        free(self.qmax)
        free(self.path)
        free(self.path_len)
        free(self.pending_action)
        free(self.rng)
        free(self.q_scratch)
        free(self.score_scratch)
        free(self.tie_scratch)

    @property
    def batch_size(self) -> int:
        """Number of roots in the current search."""
        return self.batch

    @property
    def simulations_done(self) -> int:
        """Simulations completed since the last reset_roots."""
        return self.sims_done

    def reset_roots(self, root_logits, legal_actions=None, noise=None, noise_fraction=0.0):
        """Start a new search for a batch of roots.

        Args:
            root_logits: float [B, A], policy logits from initial inference (B <= max_batch).
            legal_actions: bool or integer [B, A], nonzero where legal; None means all legal.
                Every root needs at least one legal action.
            noise: float [B, A], exploration noise (for example Dirichlet over the legal
                actions) mixed into the root prior; None for no noise.
            noise_fraction: weight of the noise, one for every root or float [B], one per
                root (0 leaves a root's prior as it is); prior = (1 - f) softmax + f noise.
        """
        logits_arr = np.asarray(root_logits)
        if logits_arr.ndim != 2 or logits_arr.shape[1] != self.A:
            raise ValueError(
                f"root_logits must have shape [B, {self.A}], got {logits_arr.shape}")
        cdef int B = logits_arr.shape[0]
        if B < 1 or B > self.max_batch:
            raise ValueError(f"root_logits batch must be in 1..{self.max_batch}, got {B}")
        cdef float[:, ::1] logits = _float_array("root_logits", logits_arr, (B, self.A))
        if legal_actions is None:
            legal_arr = np.ones((B, self.A), dtype=np.uint8)
        else:
            legal_arr = np.asarray(legal_actions)
            if legal_arr.dtype.kind not in "biu":
                raise ValueError(
                    f"legal_actions must be a bool or integer array, got dtype {legal_arr.dtype}")
            if legal_arr.shape != (B, self.A):
                raise ValueError(
                    f"legal_actions must have shape {(B, self.A)}, got {legal_arr.shape}")
            legal_arr = np.ascontiguousarray(legal_arr != 0, dtype=np.uint8)
            if not legal_arr.any(axis=1).all():
                bad = int(np.flatnonzero(~legal_arr.any(axis=1))[0])
                raise ValueError(f"legal_actions: root {bad} has no legal action")
        cdef unsigned char[:, ::1] legal = legal_arr
        cdef bint use_noise = noise is not None
        cdef float[:, ::1] noise_view
        cdef double[::1] fraction
        if use_noise:
            noise_view = _float_array("noise", noise, (B, self.A))
            if (np.asarray(noise_view) < 0).any():
                raise ValueError("noise must be non-negative")
            fraction_arr = np.asarray(noise_fraction, dtype=np.float64)
            if fraction_arr.ndim == 0:
                fraction_arr = np.full(B, float(fraction_arr))
            if fraction_arr.shape != (B,):
                raise ValueError(f"noise_fraction must be a number or have shape ({B},), "
                                 f"got {fraction_arr.shape}")
            if not ((fraction_arr >= 0.0) & (fraction_arr <= 1.0)).all():
                raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
            fraction = np.ascontiguousarray(fraction_arr)
        cdef int b, a, A = self.A, N = self.N
        cdef double mx, total, p
        cdef double* pr
        with nogil:
            memset(self.child, 0xFF, <size_t>B * N * A * sizeof(int32_t))  # all -1
            memset(self.visits, 0, <size_t>B * N * sizeof(int32_t))
            for b in range(B):
                for a in range(A):
                    self.legal[b * A + a] = legal[b, a]
                self.num_nodes[b] = 1
                self.qmin[b] = INFINITY
                self.qmax[b] = -INFINITY
                self.value_sum[b * N] = 0.0
                self.value_prefix[b * N] = 0.0
                self.depth[b * N] = 0
                pr = self.prior + <size_t>b * N * A
                mx = -INFINITY
                for a in range(A):
                    if legal[b, a] and logits[b, a] > mx:
                        mx = logits[b, a]
                total = 0.0
                for a in range(A):
                    if legal[b, a]:
                        pr[a] = exp(logits[b, a] - mx)
                        total = total + pr[a]
                    else:
                        pr[a] = 0.0
                for a in range(A):
                    p = pr[a] / total
                    if use_noise and legal[b, a]:
                        p = (1.0 - fraction[b]) * p + fraction[b] * noise_view[b, a]
                    pr[a] = p
        self.batch = B
        self.sims_done = 0
        self.awaiting_expand = False

    cdef inline bint is_reset(self, int node) noexcept nogil:
        if self.horizon == 0:
            return self.depth[node] == 0
        return self.depth[node] % self.horizon == 0

    cdef inline double edge_reward(self, int parent, int node) noexcept nogil:
        if self.is_reset(parent):
            return self.value_prefix[node]
        return self.value_prefix[node] - self.value_prefix[parent]

    cdef int select_one(self, int b) noexcept nogil:
        """Descend root b's tree by pUCT; record the path and return the leaf's action."""
        cdef int A = self.A, N = self.N
        cdef int base = b * N
        cdef int node = base
        cdef int plen = 1
        cdef bint at_root = True
        cdef double parent_q = 0.0, mean_q, q_sum, q, pb_c, score, best, total_visits
        cdef int a, ch, n_visited, n_ties, action
        cdef double* qs = self.q_scratch
        cdef double* scores = self.score_scratch
        cdef int32_t* ties = self.tie_scratch
        cdef double qmin = self.qmin[b], qmax = self.qmax[b]
        self.path[base] = node
        while True:
            q_sum = 0.0
            n_visited = 0
            total_visits = 0.0
            for a in range(A):
                ch = self.child[<size_t>node * A + a]
                if ch >= 0:
                    qs[a] = (self.edge_reward(node, ch)
                             + self.discount * (self.value_sum[ch] / self.visits[ch]))
                    q_sum = q_sum + qs[a]
                    n_visited = n_visited + 1
                    total_visits = total_visits + self.visits[ch]
            if at_root:
                mean_q = q_sum / n_visited if n_visited > 0 else 0.0
            else:
                mean_q = (parent_q + q_sum) / (n_visited + 1)
            pb_c = (self.c_init + log((total_visits + self.c_base + 1.0) / self.c_base)) \
                * sqrt(total_visits)
            best = -INFINITY
            for a in range(A):
                if at_root and not self.legal[b * A + a]:
                    scores[a] = -INFINITY
                    continue
                ch = self.child[<size_t>node * A + a]
                if ch >= 0:
                    score = (normalize_q(qs[a], qmin, qmax, self.delta_floor)
                             + self.prior[<size_t>node * A + a] * pb_c / (1.0 + self.visits[ch]))
                else:
                    score = (normalize_q(mean_q, qmin, qmax, self.delta_floor)
                             + self.prior[<size_t>node * A + a] * pb_c)
                scores[a] = score
                if score > best:
                    best = score
            n_ties = 0
            for a in range(A):
                if scores[a] >= best - TIE_TOLERANCE:
                    ties[n_ties] = a
                    n_ties = n_ties + 1
            if n_ties == 1:
                action = ties[0]
            else:
                action = ties[splitmix64_next(&self.rng[b]) % <uint64_t>n_ties]
            ch = self.child[<size_t>node * A + action]
            if ch < 0:
                self.path_len[b] = plen
                return action
            parent_q = mean_q
            at_root = False
            node = ch
            self.path[base + plen] = node
            plen = plen + 1

    def select(self):
        """Select one leaf per root by pUCT.

        Returns:
            parent_slot: int32 [B], slot of the expanded node to step the dynamics from.
            action: int32 [B], the action taken from it.
            reset: bool [B], True where the parent is a horizon reset point, so the value-prefix
                LSTM must start from a zero state.
            The new leaf of root b will live in slot `simulations_done` + 1 (before the call).
        """
        if self.batch == 0:
            raise ValueError("select() called before reset_roots()")
        if self.awaiting_expand:
            raise ValueError("select() called twice without expand() in between")
        if self.sims_done >= self.S:
            raise ValueError(f"all {self.S} simulations of this search are done")
        cdef int B = self.batch, b, parent
        parent_slot_arr = np.empty(B, dtype=np.int32)
        action_arr = np.empty(B, dtype=np.int32)
        reset_arr = np.empty(B, dtype=np.bool_)
        cdef int32_t[::1] parent_slot = parent_slot_arr
        cdef int32_t[::1] action = action_arr
        cdef cnp.npy_bool[::1] reset = reset_arr
        with nogil:
            for b in range(B):
                action[b] = self.select_one(b)
                self.pending_action[b] = action[b]
                parent = self.path[b * self.N + self.path_len[b] - 1]
                parent_slot[b] = parent - b * self.N
                reset[b] = self.is_reset(parent)
        self.awaiting_expand = True
        return parent_slot_arr, action_arr, reset_arr

    def expand(self, value_prefix, value, policy_logits):
        """Expand the leaves chosen by the last select() and back the values up.

        Args:
            value_prefix: float [B], predicted value prefix of each new leaf.
            value: float [B], predicted value of each new leaf.
            policy_logits: float [B, A], predicted policy logits of each new leaf.
        """
        if not self.awaiting_expand:
            raise ValueError("expand() called without a preceding select()")
        cdef int B = self.batch
        cdef float[::1] vp = _float_array("value_prefix", value_prefix, (B,))
        cdef float[::1] val = _float_array("value", value, (B,))
        cdef float[:, ::1] logits = _float_array("policy_logits", policy_logits, (B, self.A))
        cdef int b, a, i, A = self.A, N = self.N, node, parent, leaf, plen
        cdef double mx, total, g, r, q
        cdef double* pr
        with nogil:
            for b in range(B):
                plen = self.path_len[b]
                parent = self.path[b * N + plen - 1]
                leaf = b * N + self.num_nodes[b]
                self.num_nodes[b] = self.num_nodes[b] + 1
                self.child[<size_t>parent * A + self.pending_action[b]] = leaf
                self.depth[leaf] = self.depth[parent] + 1
                self.value_prefix[leaf] = vp[b]
                self.value_sum[leaf] = 0.0
                pr = self.prior + <size_t>leaf * A
                mx = logits[b, 0]
                for a in range(1, A):
                    if logits[b, a] > mx:
                        mx = logits[b, a]
                total = 0.0
                for a in range(A):
                    pr[a] = exp(logits[b, a] - mx)
                    total = total + pr[a]
                for a in range(A):
                    pr[a] = pr[a] / total
                self.path[b * N + plen] = leaf
                # Back-propagate from the leaf: node.value_sum += G; G <- r + gamma G.
                g = val[b]
                for i in range(plen, -1, -1):
                    node = self.path[b * N + i]
                    self.value_sum[node] = self.value_sum[node] + g
                    self.visits[node] = self.visits[node] + 1
                    if i > 0:
                        parent = self.path[b * N + i - 1]
                        r = self.edge_reward(parent, node)
                        q = r + self.discount * (self.value_sum[node] / self.visits[node])
                        if q < self.qmin[b]:
                            self.qmin[b] = q
                        if q > self.qmax[b]:
                            self.qmax[b] = q
                        g = r + self.discount * g
        self.awaiting_expand = False
        self.sims_done += 1

    def visit_counts(self):
        """int32 [B, A]: visits of each root child."""
        cdef int B = self.batch, b, a, ch, A = self.A
        out_arr = np.zeros((B, A), dtype=np.int32)
        cdef int32_t[:, ::1] out = out_arr
        for b in range(B):
            for a in range(A):
                ch = self.child[<size_t>b * self.N * A + a]
                if ch >= 0:
                    out[b, a] = self.visits[ch]
        return out_arr

    def root_values(self):
        """float32 [B]: each root's mean backed-up value (0 before any simulation)."""
        cdef int B = self.batch, b, root
        out_arr = np.zeros(B, dtype=np.float32)
        cdef float[::1] out = out_arr
        for b in range(B):
            root = b * self.N
            if self.visits[root] > 0:
                out[b] = self.value_sum[root] / self.visits[root]
        return out_arr

    def node_depths(self):
        """int32 [B, simulations_done]: depth of the leaf each simulation created."""
        cdef int B = self.batch, b, s
        out_arr = np.zeros((B, self.sims_done), dtype=np.int32)
        cdef int32_t[:, ::1] out = out_arr
        for b in range(B):
            for s in range(self.sims_done):
                out[b, s] = self.depth[b * self.N + 1 + s]
        return out_arr
