"""The optimizer sees one stacked array per layer parameter, not one per layer.

Parameters, checkpoints and Hugging Face names stay per layer
(`...encoder.layer.<i>.attention.self.query.kernel`), but inside the train step
the update (clipping, Adam, weight decay, the non-finite guard) runs on trees
whose per-layer leaves are stacked along a new leading axis:
`...encoder.layer.*.attention.self.query.kernel` of shape (L, ...). The same
arithmetic, element for element, in a program whose size no longer grows with
depth: XLA emits one fused update per stacked leaf instead of one per layer, which
is most of what made the step's compile time grow with depth.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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


def group(tree) -> dict[str, jax.Array]:
  """A parameter-shaped tree -> {name: array}, per-layer leaves stacked (L, ...).

  Names end with the parameter's own name ('.../kernel', '.../bias'), so masks
  keyed by it (weight decay) read the grouped tree as they read the original.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  singles, layers = {}, {}
  for path, leaf in leaves:
    name, index = _key(path)
    if index is None:
      singles[name] = leaf
    else:
      layers.setdefault(name, {})[index] = leaf
  for name, by_index in layers.items():
    singles[name] = jnp.stack([by_index[i] for i in range(len(by_index))])
  return singles


def ungroup(grouped: dict[str, jax.Array], like):
  """The inverse of `group`: a tree with `like`'s structure."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  out = []
  for path, _ in leaves:
    name, index = _key(path)
    out.append(grouped[name] if index is None else grouped[name][index])
  return jax.tree_util.tree_unflatten(treedef, out)


def _is_state(x) -> bool:
  return isinstance(x, nnx.State)


def group_opt_state(opt_state):
  """Each parameter-shaped State inside an optax state grouped; counters as they are."""
  return jax.tree.map(lambda x: group(x) if _is_state(x) else x, opt_state,
                      is_leaf=_is_state)


def ungroup_opt_state(grouped, like):
  return jax.tree.map(lambda l, g: ungroup(g, l) if _is_state(l) else g, like, grouped,
                      is_leaf=_is_state)
