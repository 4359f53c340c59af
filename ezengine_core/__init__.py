"""Compiled core of ezengine: batched MCTS (mcts) and the replay sum-tree (sumtree)."""
