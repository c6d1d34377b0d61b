"""The train state holds each layer parameter as one stacked array, not one per layer.

The model's parameters, checkpoints and Hugging Face names are per layer
(`...encoder.layer.<i>.attention.self.query.kernel`). The trainer keeps them, and
Adam's moments, as a `LayerStacked` tree instead: one (L, ...) array per layer
parameter under `...encoder/layer/*/attention/self/query/kernel`, other
parameters as they are. The step's update (clipping, Adam, weight decay, the
non-finite guard) then runs on a tree whose size does not depend on depth, the
scanned layers read the stacked arrays directly (XLA folds the per-layer view
back into them), and the step's inputs and outputs are the same few arrays
whatever the depth: the compiled program stops growing with the number of
layers. `ungroup` gives the per-layer view: for `nnx.merge` inside the step, and
for checkpoints and exports at the edges (`train.state.per_layer_state`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

LAYER_LIST = "layer"   # the attribute holding an encoder's layers (HF's name)


def _key(path) -> tuple[str, int | None]:
  """(group name, layer index or None) of a leaf's pytree path."""
  names = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      names.append(p.key)
    elif isinstance(p, jax.tree_util.SequenceKey):
      names.append(p.idx)
    # A Variable's own GetAttrKey ('value') is left out: names end with the
    # parameter's name.
  for k in range(len(names) - 1):
    if names[k] == LAYER_LIST and isinstance(names[k + 1], int):
      return "/".join(map(str, names[:k + 1] + ["*"] + names[k + 2:])), names[k + 1]
  return "/".join(map(str, names)), None


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static: the per-layer tree's structure and where each of its leaves goes."""
  treedef: Any                               # of the per-layer tree
  slots: tuple[tuple[str, int | None], ...]  # per-layer leaf -> (group name, layer)
  names: tuple[str, ...]                     # the groups, in the order of the leaves


@jax.tree_util.register_pytree_with_keys_class
class LayerStacked:
  """A parameter-shaped tree grouped by layer: {name: array}, per-layer leaves
  stacked to (L, ...). A pytree (optax, jit and shardings see its arrays, keyed by
  name) that remembers the per-layer structure, so `ungroup` needs nothing else.

  Names end with the parameter's own name ('.../kernel', '.../bias'), so masks
  keyed by it (weight decay) read the grouped tree as they read the per-layer one.
  """

  def __init__(self, arrays: dict[str, Any], layout: _Layout):
    self.arrays, self.layout = arrays, layout

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.DictKey(n), self.arrays[n]) for n in self.layout.names], self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(dict(zip(layout.names, children)), layout)

  def __getitem__(self, name: str):
    return self.arrays[name]

  def __contains__(self, name: str) -> bool:
    return name in self.arrays

  def __len__(self) -> int:
    return len(self.arrays)

  def __repr__(self) -> str:
    return f"LayerStacked({list(self.layout.names)})"


def group(tree, stack: Callable[[list], Any] = jnp.stack) -> LayerStacked:
  """A per-layer tree -> `LayerStacked`, each layer parameter's leaves stacked.

  stack: combines one parameter's per-layer leaves in layer order (default
  `jnp.stack`; `stacked_sharding` for a tree of shardings).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  slots = tuple(_key(path) for path, _ in leaves)
  by_name: dict[str, dict[int | None, Any]] = {}
  for (name, index), (_, leaf) in zip(slots, leaves):
    by_name.setdefault(name, {})[index] = leaf
  arrays = {name: (by_index[None] if None in by_index
                   else stack([by_index[i] for i in range(len(by_index))]))
            for name, by_index in by_name.items()}
  return LayerStacked(arrays, _Layout(treedef, slots, tuple(by_name)))


def ungroup(grouped: LayerStacked):
  """The inverse of `group`: the per-layer tree.

  The layers come from one `jnp.unstack` per stacked leaf, whose gradient is one
  concatenation: XLA folds it into the scan's stacked gradient. Indexing layer by
  layer instead would add a padded full-size gradient per layer.
  """
  layout = grouped.layout
  layers = {name: jnp.unstack(grouped[name]) for name, index in layout.slots
            if index == 0}
  return jax.tree_util.tree_unflatten(layout.treedef, [
      grouped[name] if index is None else layers[name][index]
      for name, index in layout.slots])


def _is_state(x) -> bool:
  return isinstance(x, nnx.State)


def _is_grouped(x) -> bool:
  return isinstance(x, LayerStacked)


def group_opt_state(opt_state, stack: Callable[[list], Any] = jnp.stack):
  """Each parameter-shaped State inside an optax state grouped; counters as they are."""
  return jax.tree.map(lambda x: group(x, stack) if _is_state(x) else x, opt_state,
                      is_leaf=_is_state)


def ungroup_opt_state(grouped):
  """The inverse of `group_opt_state`."""
  return jax.tree.map(lambda x: ungroup(x) if _is_grouped(x) else x, grouped,
                      is_leaf=_is_grouped)


def stacked_sharding(shardings: list[NamedSharding]) -> NamedSharding:
  """The sharding of one stacked leaf from its layers' (all alike): the layer
  axis is not split, each device holds its shard of every layer."""
  s = shardings[0]
  return NamedSharding(s.mesh, P(None, *s.spec))
