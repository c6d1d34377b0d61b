"""The BERT/ELECTRA post-LayerNorm Transformer encoder as Flax NNX modules.

Attribute paths mirror Hugging Face `BertModel` / `ElectraModel` one to one
(`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`, ...), so
export and import are a renaming plus kernel transposes (see `amos_jax/hf/names.py`).
Parameters are float32; activations use `EncoderConfig.dtype` (e.g. bfloat16).
Dropout keys are explicit call arguments (None = deterministic), which keeps the
train step a pure function and lets GradCache replay the exact same dropout.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from amos_jax.model.attention import (ATTENTION_PRODUCT, dot_product_attention,
                                      relative_position_buckets, segment_attention_mask)
from amos_jax.model import cpu_attention, ops
from amos_jax.model import rng as rng_lib
from amos_jax.model.partitioning import constrain, with_logical_axes


REMAT_POLICIES = ("auto", "none", "dots_saveable", "full")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int = 30522
  hidden_size: int = 256
  num_layers: int = 12
  num_heads: int = 4
  intermediate_size: int = 1024
  embedding_size: int | None = None  # None: same as hidden_size (no factorization)
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "float32"             # compute dtype; parameters stay float32
  attention_impl: str | None = None  # None = 'auto' | 'xla' | 'cudnn' | 'gemm'
  dropout_impl: str | None = None    # None = 'auto' | 'xla' | 'native' (CPU): same masks
  layer_norm_impl: str | None = None  # None = 'auto' | 'xla' | 'native' (CPU)
  gelu_impl: str | None = None       # None = 'auto' | 'xla' | 'native' (CPU backward)
  relative_attention_buckets: int = 0  # 0: off; else T5 bias (not HF-exportable)
  relative_attention_max_distance: int = 128
  # What each layer keeps for the backward pass: 'none' (everything), 'dots_saveable'
  # (matmul outputs and dropout masks; the rest is recomputed) or 'full' (only the
  # layer's input).
  # 'auto': dots_saveable for layers under scan, none for unrolled ones (a scan
  # writes every kept value into an (L, ...) stack and reads it back; recomputing
  # the elementwise ops is cheaper than that traffic). True / False: full / none.
  remat: str | bool = "auto"
  scan_layers: bool = True           # one traced layer under lax.scan (flat compile time)

  @property
  def embed_size(self) -> int:
    return self.embedding_size or self.hidden_size

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def remat_policy(self) -> str:
    """`remat` as one of REMAT_POLICIES."""
    if isinstance(self.remat, bool):
      return "full" if self.remat else "none"
    policy = str(self.remat).lower()
    return {"true": "full", "false": "none"}.get(policy, policy)

  @classmethod
  def from_config(cls, cfg) -> "EncoderConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(cfg).items() if k in names})


def dropout(x: jax.Array, rate: float, rng: jax.Array | None,
            implementation: str | None = None) -> jax.Array:
  """Inverted dropout at `rate` (none without a key); implementation: where the
  masks are drawn (rng.resolve_dropout_impl)."""
  if rng is None or rate == 0.0:
    return x
  keep, scale = rng_lib.dropout_keep(rng, rate, x.shape, implementation)
  return ops.dropout(x, keep, scale)


def _split(rng, n):
  return (None,) * n if rng is None else rng_lib.split(rng, n)


@functools.lru_cache(maxsize=None)
def normal_init(stddev: float):
  """BERT's N(0, stddev^2) initializer, one function per stddev: every layer's
  kernels then share it, and their deferred draws batch over the layers
  (model/deferred_init.py)."""
  return nnx.initializers.normal(stddev)


def dense(cfg: EncoderConfig, d_in: int, d_out: int, axes, rngs: nnx.Rngs,
          use_bias: bool = True) -> Dense:
  init = normal_init(cfg.initializer_range)
  return Dense(
      d_in, d_out, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
      kernel_init=with_logical_axes(init, axes),
      bias_init=with_logical_axes(nnx.initializers.zeros, (axes[-1],)), rngs=rngs)


class Dense(nnx.Linear):
  """`nnx.Linear`'s parameters (same names), computed by `ops.dense` (its faster
  kernel gradient); the output is named for the remat policy (ops.DENSE_OUT)."""

  def operands(self, x):
    """(x, kernel, bias or None) in the compute dtype."""
    bias = self.bias[...] if self.bias is not None else None
    return self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)

  def __call__(self, x):
    return checkpoint_name(ops.dense(*self.operands(x)), ops.DENSE_OUT)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm`'s parameters (same names), computed by `ops.layer_norm` (its
  backward pass where `implementation` says)."""

  implementation: str | None = None  # model.layer_norm_impl (encoder.layer_norm)

  def __call__(self, x):
    return ops.layer_norm(x.astype(self.dtype or x.dtype), self.scale[...],
                          self.bias[...], self.epsilon, self.implementation)


def layer_norm(cfg: EncoderConfig, dim: int, rngs: nnx.Rngs) -> LayerNorm:
  norm = LayerNorm(
      dim, epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
      scale_init=with_logical_axes(nnx.initializers.ones, ("norm",)),
      bias_init=with_logical_axes(nnx.initializers.zeros, ("norm",)), rngs=rngs)
  norm.implementation = cfg.layer_norm_impl
  return norm


def embed(cfg: EncoderConfig, num: int, dim: int, axes, rngs: nnx.Rngs) -> nnx.Embed:
  init = normal_init(cfg.initializer_range)
  return nnx.Embed(num, dim, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                   embedding_init=with_logical_axes(init, axes), rngs=rngs)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout. Width E.

  word_embeddings: an `nnx.Embed` owned by another block to share (AMOS's generator
    shares only the token matrix with the discriminator); None makes its own.
  delta: gradient-disentangled sharing (DeBERTa-v3's GDES): the matrix read here is
    stop_gradient(E) + E_delta with E_delta zero-initialized, so this block's loss
    trains E_delta only and E is trained by whoever else reads it.
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs,
               word_embeddings: nnx.Embed | None = None, delta: bool = False):
    self.cfg = cfg
    e = cfg.embed_size
    self.word_embeddings = (word_embeddings if word_embeddings is not None else
                            embed(cfg, cfg.vocab_size, e, ("vocab", "embed"), rngs))
    if delta:
      self.word_embeddings_delta = nnx.Param(with_logical_axes(
          nnx.initializers.zeros, ("vocab", "embed"))(rngs.params(), (cfg.vocab_size, e),
                                                       jnp.float32))
    self.position_embeddings = embed(
        cfg, cfg.max_position_embeddings, e, (None, "embed"), rngs)
    self.token_type_embeddings = embed(cfg, cfg.type_vocab_size, e, (None, "embed"), rngs)
    self.LayerNorm = layer_norm(cfg, e, rngs)

  @property
  def word_matrix(self) -> jax.Array:
    """(V, E) float32: the token matrix this block reads (and tied heads project to)."""
    matrix = self.word_embeddings.embedding[...]
    if hasattr(self, "word_embeddings_delta"):
      matrix = jax.lax.stop_gradient(matrix) + self.word_embeddings_delta[...]
    return matrix

  def __call__(self, input_ids, positions, token_type_ids, *, replace=None,
               dropout_rng=None):
    """input_ids, positions, token_type_ids: (B, T) -> (B, T, E).

    replace: optional (index (B, K), rows (B, K, E)) overriding the word embedding at
    those positions; AMOS feeds `one_hot_sample @ word_matrix` this way.
    """
    if hasattr(self, "word_embeddings_delta"):
      x = jnp.take(self.word_matrix, input_ids, axis=0).astype(self.cfg.compute_dtype)
    else:
      x = self.word_embeddings(input_ids)
    if replace is not None:
      index, rows = replace
      batch = jnp.arange(x.shape[0])[:, None]
      x = x.at[batch, index].set(rows.astype(x.dtype))
    x = x + self.position_embeddings(positions) + self.token_type_embeddings(
        token_type_ids)
    x = self.LayerNorm(x)
    return dropout(x, self.cfg.hidden_dropout, dropout_rng, self.cfg.dropout_impl)


class SelfAttention(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.query = dense(cfg, h, h, ("embed", "heads"), rngs)
    self.key = dense(cfg, h, h, ("embed", "heads"), rngs)
    self.value = dense(cfg, h, h, ("embed", "heads"), rngs)


class DenseLayerNorm(nnx.Module):
  """HF's *Output blocks: dense -> dropout -> LayerNorm(x + residual)."""

  def __init__(self, cfg: EncoderConfig, d_in: int, axes, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dense = dense(cfg, d_in, cfg.hidden_size, axes, rngs)
    self.LayerNorm = layer_norm(cfg, cfg.hidden_size, rngs)

  def __call__(self, x, residual, dropout_rng=None):
    x = dropout(self.dense(x), self.cfg.hidden_dropout, dropout_rng, self.cfg.dropout_impl)
    return self.LayerNorm(x + residual)


class Attention(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.self = SelfAttention(cfg, rngs=rngs)
    self.output = DenseLayerNorm(cfg, cfg.hidden_size, ("heads", "embed"), rngs=rngs)

  def __call__(self, x, mask, bias=None, dropout_rng=None):
    cfg = self.cfg
    b, t, _ = x.shape
    n, dh = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    # The three projections of x through one op whose backward pass is one product
    # for x's gradient (ops.dense_shared_input); the parameters stay per layer.
    operands = [m.operands(x) for m in (self.self.query, self.self.key, self.self.value)]
    q, k, v = (checkpoint_name(y, ops.DENSE_OUT).reshape(b, t, n, dh)
               for y in ops.dense_shared_input(operands[0][0],
                                               tuple(o[1] for o in operands),
                                               tuple(o[2] for o in operands)))
    q, k, v = (constrain(a, ("batch", "seq", "heads", None)) for a in (q, k, v))
    r_attn, r_out = _split(dropout_rng, 2)
    ctx = dot_product_attention(
        q, k, v, mask, bias, dropout_rate=cfg.attention_dropout, dropout_rng=r_attn,
        implementation=cfg.attention_impl, dropout_impl=cfg.dropout_impl)
    return self.output(ctx.reshape(b, t, n * dh), x, r_out)


class Intermediate(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
    self.gelu_impl = cfg.gelu_impl

  def __call__(self, x):
    # Exact (erf) GELU, as BERT and ELECTRA use.
    return constrain(ops.gelu(self.dense(x), self.gelu_impl),
                     ("batch", "seq", "mlp"))


class Layer(nnx.Module):
  """One post-LN Transformer block: (B, T, H) -> (B, T, H)."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.attention = Attention(cfg, rngs=rngs)
    self.intermediate = Intermediate(cfg, rngs=rngs)
    self.output = DenseLayerNorm(cfg, cfg.intermediate_size, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x, mask, bias=None, dropout_rng=None):
    r_attn, r_out = _split(dropout_rng, 2)
    x = self.attention(x, mask, bias, r_attn)
    x = self.output(self.intermediate(x), x, r_out)
    return constrain(x, ("batch", "seq", "embed"))


def _layer_fn(graphdef):
  """One layer as a function of its parameters (what remat and scan wrap)."""
  return lambda params, x, mask, bias, rng: nnx.merge(graphdef, params)(x, mask, bias, rng)


def resolve_remat(policy: str, in_scan: bool) -> str:
  """'auto' -> dots_saveable for layers under scan, none for unrolled ones."""
  if policy == "auto":
    return "dots_saveable" if in_scan else "none"
  return policy


def _checkpointed(fn, policy: str, *, in_scan: bool):
  """`fn` under the remat policy (REMAT_POLICIES); 'none' leaves it as it is."""
  policy = resolve_remat(policy, in_scan)
  if policy == "none":
    return fn
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat={policy!r}: use one of {', '.join(REMAT_POLICIES)}")
  saveable = None
  if policy == "dots_saveable":
    # The dense outputs and gemm attention's products (products the policy cannot
    # see inside ops.dense or a custom call), the dropout masks (1 byte per
    # element): hashing their bits again costs more than keeping them, and fused
    # attention's softmax statistics (2 floats per query and head).
    cp = jax.checkpoint_policies
    saveable = cp.save_from_both_policies(
        cp.dots_saveable, cp.save_only_these_names(rng_lib.DROPOUT_KEEP, ops.DENSE_OUT,
                                                   ATTENTION_PRODUCT,
                                                   cpu_attention.SOFTMAX_STATS))
  # Inside scan the loop boundary already stops XLA from merging the recomputation
  # back into the forward pass (jax.checkpoint's documented advice).
  return jax.checkpoint(fn, policy=saveable, prevent_cse=not in_scan)


def run_layers(layers: Sequence[Layer], x, mask, bias, dropout_rngs, *,
               cuts: Sequence[bool] | None = None, remat: str = "none",
               scan: bool = True) -> list[jax.Array]:
  """Applies `layers` in order; returns each layer's output, [(B, T, H)] * len(layers).

  scan: the per-layer parameters are stacked (inside the traced function, so the
  parameter tree and its names stay per layer) and one layer is traced and run
  under `jax.lax.scan`: compile time does not grow with depth. Unscanned, every
  layer is traced in turn. dropout_rngs: one key (or per-row keys) per layer, or
  None each; both modes draw the same dropout.
  cuts: per layer, True where its input enters through stop_gradient (AMOS's
  segment isolation: no gradient flows back across it); default none.
  """
  if not layers:
    return []
  cuts = [False] * len(layers) if cuts is None else [bool(c) for c in cuts]
  apply = _layer_fn(nnx.graphdef(layers[0]))
  states = [nnx.state(layer) for layer in layers]
  if not scan or len(layers) == 1:
    apply = _checkpointed(apply, remat, in_scan=False)
    outputs = []
    for state, rng, cut in zip(states, dropout_rngs, cuts):
      x = apply(state, jax.lax.stop_gradient(x) if cut else x, mask, bias, rng)
      outputs.append(x)
    return outputs

  def body(carry, xs):
    state, rng, cut = xs
    if cut is not None:
      # stop_gradient chosen per iteration: the same forward value, a zero gradient
      # where cut. Segments between cuts share one loop, so one body compiles.
      carry = jnp.where(cut, jax.lax.stop_gradient(carry), carry)
    y = apply(state, carry, mask, bias, rng)
    return y, y

  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
  rngs = None if dropout_rngs[0] is None else jnp.stack(dropout_rngs)
  cut_flags = jnp.asarray(cuts) if any(cuts) else None
  _, ys = jax.lax.scan(_checkpointed(body, remat, in_scan=True), x,
                       (stacked, rngs, cut_flags))
  return [ys[i] for i in range(len(layers))]


class Transformer(nnx.Module):
  """HF's `encoder`: the stack of layers (and the optional relative position bias)."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    if cfg.relative_attention_buckets:
      self.relative_attention_bias = embed(
          cfg, cfg.relative_attention_buckets, cfg.num_heads, (None, "heads"), rngs)


class Encoder(nnx.Module):
  """BertModel / ElectraModel: embeddings -> [embeddings_project] -> layers.

  `embeddings` may be passed in to share one embedding block between encoders
  (ELECTRA's generator and discriminator).
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs,
               embeddings: Embeddings | None = None):
    if cfg.hidden_size % cfg.num_heads:
      raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by "
                       f"num_heads={cfg.num_heads}")
    self.cfg = cfg
    self.embeddings = embeddings if embeddings is not None else Embeddings(cfg, rngs=rngs)
    e = self.embeddings.cfg.embed_size
    if e != cfg.hidden_size:
      self.embeddings_project = dense(cfg, e, cfg.hidden_size, ("embed_in", "embed"), rngs)
    self.encoder = Transformer(cfg, rngs=rngs)

  @property
  def word_embeddings(self) -> jax.Array:
    """(V, E) word-embedding matrix this encoder reads (tied MLM heads project to it)."""
    return self.embeddings.word_matrix

  def __call__(self, input_ids, segment_ids, positions=None, token_type_ids=None, *,
               replace=None, dropout_rng=None, stop_gradient_after: Sequence[int] = (),
               num_layers: int | None = None) -> list[jax.Array]:
    """Runs the encoder; returns all hidden states.

    input_ids, segment_ids (0 = padding), positions, token_type_ids: (B, T) int.
    replace: see `Embeddings.__call__`.
    stop_gradient_after: layer indices l whose output is recorded with its gradient
      but enters block l+1 through stop_gradient (AMOS's segment isolation).
    num_layers: run only the first layers (default: all).
    Returns [hidden_states[0] (embeddings, after projection), ..., hidden_states[L]],
    each (B, T, H).
    """
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    num_layers = cfg.num_layers if num_layers is None else num_layers
    r_embed, *r_layers = _split(dropout_rng, num_layers + 1)

    x = self.embeddings(input_ids, positions, token_type_ids, replace=replace,
                        dropout_rng=r_embed)
    if hasattr(self, "embeddings_project"):
      x = self.embeddings_project(x)
    x = constrain(x, ("batch", "seq", "embed"))
    mask = segment_attention_mask(segment_ids)
    bias = None
    if cfg.relative_attention_buckets:
      t = input_ids.shape[1]
      buckets = relative_position_buckets(t, t, cfg.relative_attention_buckets,
                                          cfg.relative_attention_max_distance)
      table = self.encoder.relative_attention_bias.embedding[...]
      bias = jnp.transpose(table[buckets], (2, 0, 1))[None].astype(jnp.float32)

    # A boundary's output is recorded with its gradient and enters the next layer
    # through stop_gradient; all segments run in one layer loop (when scanned).
    cuts = [0 < i < num_layers and i in stop_gradient_after for i in range(num_layers)]
    return [x] + run_layers([self.encoder.layer[i] for i in range(num_layers)], x, mask,
                            bias, r_layers, cuts=cuts, remat=cfg.remat_policy,
                            scan=cfg.scan_layers)
