# cython: language_level=3, boundscheck=False, wraparound=False
"""Tree-ensemble predict, compiled: every tree of a fitted forest in flat arrays, one C loop.

``trees.py`` flattens the estimator, builds a ``CompiledForest`` and checks it against
``estimator.predict``; this module only has to be exact and memory-safe. Exact means the same
arithmetic as scikit-learn, step for step:

- each float64 feature value is cast to float32 with a C ``(float)`` cast, as numpy's
  ``astype(np.float32)`` does in ``validate_data``;
- a node sends a row left when ``(double)x32 <= threshold`` and a node is a leaf when its left
  child is -1, as ``Tree._apply_dense`` does;
- a forest adds the leaf value rows into float64 zeros in tree order and divides the sum by
  the number of trees once, as ``_accumulate_prediction`` with one job and ``proba /= n``
  do; a single tree's output is its leaf row itself (no ``0.0 +``, which would turn -0.0
  into 0.0);
- for a classifier those averaged rows are ``predict_proba``: since scikit-learn 1.4 a
  classifier's ``tree_.value`` holds each leaf's class fractions (weighted count over weighted
  total, computed once at fit) and ``DecisionTreeClassifier.predict_proba`` returns the leaf's
  row as is. Normalizing a row again would change it: fractions need not sum to exactly 1;
- a classifier's answer is the first index of the largest value, numpy's ``argmax`` rule,
  taken after the division (dividing can make two different sums equal); sklearn's forest
  ``predict`` takes it from ``predict_proba``, so one walk gives both.

Batches that sklearn would treat otherwise are not predicted at all: ``predict`` returns
``None`` and the caller hands the batch to sklearn when

- a value's float32 cast is NaN or infinite: sklearn routes NaN by ``missing_go_to_left`` or
  refuses it, and refuses infinity (after numpy's "overflow encountered in cast" warning);
- the float32 values could overflow when summed: sklearn's finiteness check starts with
  ``np.sum`` of the float32 batch, which warns "invalid value encountered in reduce" (an
  error where warnings are) when partial sums reach both infinities. Rather than model
  numpy's summation order, any batch whose absolute sum passes half of ``FLT_MAX`` goes to
  sklearn; rounding cannot take a partial sum of such a batch anywhere near ``FLT_MAX``.

Speed: the walk is branch-free and takes several (tree, row) pairs in lockstep, so that their
independent chains of loads overlap instead of each waiting on a mispredicted branch: the
next node is ``child[x32 <= threshold]``, an indexed load, and a leaf's two children are the
leaf itself (and its feature 0), so a walk that reaches it early stays there for the
remaining steps of its group. Only the control flow differs from sklearn's walk; each
comparison is the same.

Memory safety: the walk reads unchecked indices, so ``_NodeTable.fill`` checks every one of
them once; in particular each child index is larger than its parent's and inside the parent's
tree (sklearn's builders add children after their parent), so a walk of ``depth`` steps ends
at a leaf.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.float cimport FLT_MAX
from libc.math cimport fabs, isfinite, isnan
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t

import numpy as np

cdef enum:
    _TREE_LEAF = -1  # sklearn's marker for "no child": a node whose left child is this is a leaf
    _GROUP = 16  # (tree, row) pairs walked in lockstep


cdef struct _Node:
    # One cache line holds two nodes; everything a step reads is in one of them.
    # Global indices: child[1] is the left child (taken when the value is <= threshold),
    # child[0] the right one; both are the node itself for a leaf.
    int64_t child[2]
    double threshold  # a row goes left when its float32 value, as a double, is <= this
    int32_t feature  # a column of X; 0 for a leaf
    # Where NaN goes: CompiledBoosting's walk reads it. CompiledForest's never does, because
    # it hands a row with NaN back to sklearn (whether NaN is routed or refused is its call).
    uint8_t missing_go_to_left


@cython.final
cdef class _NodeTable:
    """The nodes of one or more fitted trees, concatenated, owned, and checked for the walks.

    Built in two steps, so that an owner can check its own arrays in between: the
    constructor takes the arrays and checks their shapes; ``fill`` checks every index a walk
    will follow and copies the nodes into ``nodes`` (PyMem_Malloc; PyMem_Free in
    ``__dealloc__``). Node k of tree t lies in [root[t], root[t + 1]) (root[n_trees] ==
    n_nodes), and a walk from root[t] reaches a leaf in depth[t] steps and stays there after
    (see "Memory safety" above).
    """

    cdef Py_ssize_t n_trees
    cdef Py_ssize_t n_nodes
    cdef Py_ssize_t n_features
    cdef _Node* nodes  # n_nodes entries
    cdef int64_t* root  # n_trees + 1 entries
    cdef int64_t* depth  # n_trees entries
    # The arrays, until fill has copied them.
    cdef const int64_t[::1] _left
    cdef const int64_t[::1] _right
    cdef const int64_t[::1] _feature
    cdef const double[::1] _threshold
    cdef const uint8_t[::1] _missing_go_to_left
    cdef const int64_t[::1] _offsets

    def __cinit__(self, left, right, feature, threshold, missing_go_to_left, offsets, Py_ssize_t n_features):
        self._left = np.ascontiguousarray(left, dtype=np.int64)
        self._right = np.ascontiguousarray(right, dtype=np.int64)
        self._feature = np.ascontiguousarray(feature, dtype=np.int64)
        self._threshold = np.ascontiguousarray(threshold, dtype=np.float64)
        self._missing_go_to_left = np.ascontiguousarray(missing_go_to_left, dtype=np.uint8)
        self._offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        cdef Py_ssize_t n = self._left.shape[0]
        self.n_nodes = n
        self.n_trees = self._offsets.shape[0] - 1
        self.n_features = n_features
        if n < 1 or self.n_trees < 1 or n_features < 1:
            raise ValueError("a model has at least one tree, one node and one feature")
        if n_features > INT32_MAX:
            raise ValueError("too many features")
        if not (
            self._right.shape[0] == n
            and self._feature.shape[0] == n
            and self._threshold.shape[0] == n
            and self._missing_go_to_left.shape[0] == n
        ):
            raise ValueError("every node array needs one entry per node")
        if self._offsets[0] != 0 or self._offsets[self.n_trees] != n:
            raise ValueError("offsets must start at 0 and end at the number of nodes")

    def __dealloc__(self):
        PyMem_Free(self.nodes)
        PyMem_Free(self.root)
        PyMem_Free(self.depth)

    cdef int fill(self) except -1:
        self.nodes = <_Node*>PyMem_Malloc(self.n_nodes * sizeof(_Node))
        self.root = <int64_t*>PyMem_Malloc((self.n_trees + 1) * sizeof(int64_t))
        self.depth = <int64_t*>PyMem_Malloc(self.n_trees * sizeof(int64_t))
        if self.nodes == NULL or self.root == NULL or self.depth == NULL:
            raise MemoryError()  # __dealloc__ frees whichever did succeed
        cdef const int64_t[::1] left = self._left
        cdef const int64_t[::1] right = self._right
        cdef const int64_t[::1] feature = self._feature
        cdef const int64_t[::1] offsets = self._offsets
        cdef Py_ssize_t t, k
        cdef int64_t end
        cdef _Node* node
        # Depth of each node below its root: children come after their parent, so one pass
        # in node order sees every parent before its children.
        cdef int64_t[::1] depth = np.zeros(self.n_nodes, dtype=np.int64)
        for t in range(self.n_trees):
            end = offsets[t + 1]
            if end <= offsets[t]:
                raise ValueError(f"tree {t} has no nodes")
            self.root[t] = offsets[t]
            self.depth[t] = 0
            for k in range(offsets[t], end):
                node = &self.nodes[k]
                node.threshold = self._threshold[k]
                node.missing_go_to_left = self._missing_go_to_left[k]
                if left[k] == _TREE_LEAF:
                    node.child[0] = k
                    node.child[1] = k
                    node.feature = 0
                    self.depth[t] = max(self.depth[t], depth[k])
                    continue
                if not (k < left[k] < end and k < right[k] < end):
                    raise ValueError(f"node {k}: a child must come after its parent, in the same tree")
                if not (0 <= feature[k] < self.n_features):
                    raise ValueError(f"node {k}: feature {feature[k]} is out of range")
                node.child[1] = left[k]
                node.child[0] = right[k]
                node.feature = <int32_t>feature[k]
                # max(): in a malformed tree a node could have two parents.
                depth[left[k]] = max(depth[left[k]], depth[k] + 1)
                depth[right[k]] = max(depth[right[k]], depth[k] + 1)
        self.root[self.n_trees] = self.n_nodes
        # The nodes hold all of it now.
        self._left = None
        self._right = None
        self._feature = None
        self._offsets = None
        self._threshold = None
        self._missing_go_to_left = None
        return 0


@cython.final
cdef class CompiledForest:
    """The nodes of one or more fitted trees, concatenated, and a GIL-free ``predict``.

    Immutable once built: ``predict`` only reads it, so any number of threads may call it at
    once (each call has its own scratch arrays).
    """

    # Shape, fixed at creation.
    cdef readonly Py_ssize_t n_trees
    cdef readonly Py_ssize_t n_nodes  # all trees together
    cdef readonly Py_ssize_t n_features  # columns ``predict`` expects
    cdef readonly Py_ssize_t n_values  # values per leaf: the classes, or 1 for a regressor
    cdef readonly bint classifier  # predict returns argmax indices, not the values
    cdef readonly bint average  # a forest (sum in tree order, then / n_trees), not one tree

    cdef _NodeTable _table
    # Leaf value rows, (n_nodes, n_values): a private copy, owned through this view.
    cdef const double[:, ::1] _value

    def __cinit__(
        self,
        left,
        right,
        feature,
        threshold,
        missing_go_to_left,
        value,
        offsets,
        Py_ssize_t n_features,
        *,
        bint classifier,
        bint average,
    ):
        self._table = _NodeTable(left, right, feature, threshold, missing_go_to_left, offsets, n_features)
        self._value = np.array(value, dtype=np.float64, order="C", copy=True)
        self.n_nodes = self._table.n_nodes
        self.n_trees = self._table.n_trees
        self.n_features = n_features
        self.n_values = self._value.shape[1]
        self.classifier = classifier
        self.average = average
        if self.n_values < 1:
            raise ValueError("a leaf has at least one value")
        if self._value.shape[0] != self.n_nodes:
            raise ValueError("every node array needs one entry per node")
        if not self.classifier and self.n_values != 1:
            raise ValueError("a regressor has one value per leaf")
        if not self.average and self.n_trees != 1:
            raise ValueError("only a forest (average=True) holds more than one tree")
        self._table.fill()

    def predict(self, const double[:, ::1] X not None):
        """Argmax class indices (int64) or values (float64), one per row of ``X``.

        ``None`` where sklearn must decide: no rows, a value that is not finite as float32, or
        values large enough to overflow a float32 sum (see the module docstring).
        ``ValueError`` if ``X`` does not have ``n_features`` columns.
        """
        walked = self._walk(X)
        if walked is None:
            return None
        values, index = walked
        if self.classifier:
            return index
        return values.reshape(X.shape[0])

    def predict_with_proba(self, const double[:, ::1] X not None):
        """A classifier's ``(index, proba)`` from one walk: the argmax class index of each row
        (int64, as ``predict``) and the class probabilities they are taken from (float64,
        ``(rows, n_values)``, C order), the bits of ``predict_proba``.

        ``None`` where sklearn must decide, as for ``predict``. ``ValueError`` for a
        regressor, or if ``X`` does not have ``n_features`` columns.
        """
        if not self.classifier:
            raise ValueError("a regressor has no class probabilities")
        walked = self._walk(X)
        if walked is None:
            return None
        values, index = walked
        return index, values

    @cython.cdivision(True)
    cdef object _walk(self, const double[:, ::1] X):
        """``(values, index)``: the leaf values summed and averaged per row, and for a
        classifier their argmax (else an empty array); ``None`` where sklearn must decide."""
        cdef Py_ssize_t n_rows = X.shape[0]
        cdef Py_ssize_t nf = self.n_features
        cdef Py_ssize_t nv = self.n_values
        if X.shape[1] != nf:
            raise ValueError(f"X has {X.shape[1]} features, expected {nf}")
        if n_rows == 0:
            return None

        x32_array = np.empty((n_rows, nf), dtype=np.float32)
        acc_array = np.zeros((n_rows, nv), dtype=np.float64)
        index_array = np.empty(n_rows if self.classifier else 0, dtype=np.int64)
        cdef float[:, ::1] x32_view = x32_array
        cdef double[:, ::1] acc_view = acc_array
        cdef int64_t[::1] index_view = index_array

        cdef const double* x = &X[0, 0]
        cdef float* x32 = &x32_view[0, 0]
        cdef double* acc = &acc_view[0, 0]
        cdef int64_t* index = &index_view[0] if self.classifier else NULL
        cdef const _Node* nodes = self._table.nodes
        cdef const int64_t* root = self._table.root
        cdef const int64_t* depth = self._table.depth
        cdef const double* value = &self._value[0, 0]
        cdef Py_ssize_t n_trees = self.n_trees
        cdef Py_ssize_t n_pairs = n_trees * n_rows
        cdef double divisor = <double>n_trees
        cdef bint average = self.average
        cdef bint handled = True
        cdef float v
        cdef double magnitude = 0.0  # sum of |x32|: exact enough for a bound with a 2x margin
        cdef Py_ssize_t i, c, best, start, g, k, step, steps
        cdef const double* leaf
        cdef double* row
        # One group of (tree, row) pairs, in the order tree-major, row-minor: so each row
        # still receives its trees in order, which is all exactness needs.
        cdef Py_ssize_t t = 0  # tree of the group's first pair
        cdef Py_ssize_t r = 0  # row of the group's first pair
        cdef int64_t node[_GROUP]
        cdef const float* pair_x[_GROUP]
        cdef Py_ssize_t pair_row[_GROUP]
        cdef const _Node* n

        with nogil:
            for i in range(n_rows * nf):
                v = <float>x[i]
                if not isfinite(v):
                    handled = False
                    break
                x32[i] = v
                magnitude += fabs(<double>v)
            if magnitude > 0.5 * FLT_MAX:
                handled = False
            if handled:
                start = 0
                while start < n_pairs:
                    g = min(<Py_ssize_t>_GROUP, n_pairs - start)
                    start += g
                    steps = 0
                    for k in range(g):
                        node[k] = root[t]
                        pair_x[k] = x32 + r * nf
                        pair_row[k] = r
                        steps = max(steps, depth[t])
                        r += 1
                        if r == n_rows:
                            r = 0
                            t += 1
                    for step in range(steps):
                        for k in range(g):
                            n = &nodes[node[k]]
                            node[k] = n.child[<int>(<double>pair_x[k][n.feature] <= n.threshold)]
                    for k in range(g):
                        leaf = value + node[k] * nv
                        row = acc + pair_row[k] * nv
                        if average:
                            for c in range(nv):
                                row[c] += leaf[c]
                        else:
                            for c in range(nv):
                                row[c] = leaf[c]
                if average:
                    for i in range(n_rows * nv):
                        acc[i] /= divisor
                if index != NULL:
                    for i in range(n_rows):
                        row = acc + i * nv
                        best = 0
                        for c in range(1, nv):
                            if row[c] > row[best]:  # strictly: the first maximum wins
                                best = c
                        index[i] = best

        if not handled:
            return None
        return acc_array, index_array


@cython.final
cdef class CompiledBoosting:
    """The trees of a fitted HistGradientBoosting model, concatenated, and a GIL-free
    ``predict`` of its raw scores: ``_raw_predict``, step for step.

    - the scores are a Fortran-ordered array, as ``_raw_predict``'s: the values are the same
      in either order, but what sklearn computes from them is not (numpy sums a softmax row
      of eight or more classes pairwise when the row is contiguous, in order when it is not);
    - a row's score for output ``k`` starts as ``0.0 + baseline[k]`` (sklearn adds the
      baseline into float64 zeros) and receives each tree's leaf value, in tree order:
      iteration by iteration, and within one the outputs in order, as ``_predict_iterations``
      does (``raw[:, k] += predictor.predict(X)``);
    - a node sends a row left when its float64 value is NaN and the node's
      ``missing_go_to_left`` is set, or when the value is ``<= threshold``, as
      ``_predict_one_from_raw_data`` does for a numerical split. No cast: the model predicts
      on float64. Categorical splits are not compiled (``trees.py`` refuses such a model).

    The leaf value lives in ``_value[node]``; the nodes are a ``_NodeTable``, as
    CompiledForest's.
    Immutable once built; any number of threads may call ``predict`` at once.
    """

    cdef readonly Py_ssize_t n_trees
    cdef readonly Py_ssize_t n_nodes
    cdef readonly Py_ssize_t n_features
    cdef readonly Py_ssize_t n_outputs  # raw scores per row: one per class (or 1)

    cdef _NodeTable _table
    cdef const double[::1] _value  # per node; a private copy
    cdef const int64_t[::1] _output  # per tree: the raw score it adds to
    cdef const double[::1] _baseline  # per output

    def __cinit__(
        self,
        left,
        right,
        feature,
        threshold,
        missing_go_to_left,
        value,
        offsets,
        output,
        baseline,
        Py_ssize_t n_features,
    ):
        self._table = _NodeTable(left, right, feature, threshold, missing_go_to_left, offsets, n_features)
        self._value = np.array(value, dtype=np.float64, copy=True)
        self._output = np.array(output, dtype=np.int64, copy=True)
        self._baseline = np.array(baseline, dtype=np.float64, copy=True)
        self.n_nodes = self._table.n_nodes
        self.n_trees = self._table.n_trees
        self.n_features = n_features
        self.n_outputs = self._baseline.shape[0]
        cdef Py_ssize_t t
        if self.n_outputs < 1:
            raise ValueError("a model has at least one output")
        if self._value.shape[0] != self.n_nodes:
            raise ValueError("every node array needs one entry per node")
        if self._output.shape[0] != self.n_trees:
            raise ValueError("every tree needs the output it adds to")
        for t in range(self.n_trees):
            if not (0 <= self._output[t] < self.n_outputs):
                raise ValueError(f"tree {t}: output {self._output[t]} is out of range")
        self._table.fill()

    def predict(self, const double[:, ::1] X not None):
        """Raw scores, float64 ``(rows, n_outputs)`` in Fortran order; ``None`` for no rows
        (sklearn refuses those with its own error). ``ValueError`` if ``X`` does not have
        ``n_features`` columns."""
        cdef Py_ssize_t n_rows = X.shape[0]
        cdef Py_ssize_t nf = self.n_features
        cdef Py_ssize_t no = self.n_outputs
        if X.shape[1] != nf:
            raise ValueError(f"X has {X.shape[1]} features, expected {nf}")
        if n_rows == 0:
            return None

        raw_array = np.empty((n_rows, no), dtype=np.float64, order="F")
        cdef double[::1, :] raw_view = raw_array
        cdef double* raw = &raw_view[0, 0]  # output k of row i at raw[k * n_rows + i]
        cdef const double* x = &X[0, 0]
        cdef const _Node* nodes = self._table.nodes
        cdef const int64_t* root = self._table.root
        cdef const int64_t* depth = self._table.depth
        cdef const double* value = &self._value[0]
        cdef const int64_t* output = &self._output[0]
        cdef const double* baseline = &self._baseline[0]
        cdef Py_ssize_t i, k, t, r0, g, j, step
        cdef double v
        cdef double* column  # the scores of the output the current tree adds to
        cdef int64_t node[_GROUP]
        cdef const _Node* n

        with nogil:
            for k in range(no):
                for i in range(n_rows):
                    raw[k * n_rows + i] = 0.0 + baseline[k]
            for t in range(self.n_trees):
                column = raw + output[t] * n_rows
                # Rows in groups walked in lockstep, as in CompiledForest: independent loads
                # overlap. Each row still receives the trees in order.
                r0 = 0
                while r0 < n_rows:
                    g = min(<Py_ssize_t>_GROUP, n_rows - r0)
                    for j in range(g):
                        node[j] = root[t]
                    for step in range(depth[t]):
                        for j in range(g):
                            n = &nodes[node[j]]
                            v = x[(r0 + j) * nf + n.feature]
                            # Comparisons only, so the index is 0 or 1 whatever the flag's byte.
                            node[j] = n.child[
                                <int>((v <= n.threshold) or (isnan(v) != 0 and n.missing_go_to_left != 0))
                            ]
                    for j in range(g):
                        column[r0 + j] += value[node[j]]
                    r0 += g
        return raw_array
