"""An objective defined outside amos_jax, as a user would add one: random-token
replacement detection (a discriminator with no generator; Clark et al.'s weakest
ELECTRA ablation). `objective.name=tests.objective_example` selects it; nothing in
the trainer knows it exists."""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from amos_jax.errors import ConfigError
from amos_jax.model import rng as rng_lib
from amos_jax.model.encoder import Encoder, EncoderConfig
from amos_jax.model.heads import RTDHead
from amos_jax.objectives.base import Objective


class Detector(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.encoder = Encoder(cfg, rngs=rngs)
    self.head = RTDHead(cfg, 1, rngs=rngs)


class RandomReplacementDetection(Objective):
  name = "random_replacement"

  @classmethod
  def validate_config(cls, config):
    if not 0.0 < config.objective.mask_rate < 1.0:
      raise ConfigError(f"objective.mask_rate={config.objective.mask_rate} must be in (0, 1)")

  def build_model(self, rngs):
    return Detector(EncoderConfig.from_config(self.config.model), rngs=rngs)

  def loss_counts(self, batch):
    return {"num_tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32)}

  def loss(self, model, batch, counts, rng, train):
    r_pick, r_token, r_drop = rng_lib.split(rng, 3)
    ids, seg = batch["input_ids"], batch["segment_ids"]
    real = seg > 0
    pick = rng_lib.draw(jax.random.uniform, r_pick, ids.shape) < self.config.objective.mask_rate
    random_ids = rng_lib.draw(lambda k, s: jax.random.randint(
        k, s, max(self.tokens.ids) + 1, self.config.model.vocab_size), r_token, ids.shape)
    replaced = pick & real & (random_ids != ids)
    hidden = model.encoder(jnp.where(replaced, random_ids, ids), seg, batch.get("positions"),
                           batch.get("token_type_ids"),
                           dropout_rng=r_drop if train else None)[-1]
    logits = model.head(hidden)
    xent = optax.sigmoid_binary_cross_entropy(logits, replaced.astype(jnp.float32))
    loss = (xent * real).sum() / jnp.maximum(counts["num_tokens"], 1.0)
    accuracy = (((logits > 0) == replaced) * real).sum() / jnp.maximum(counts["num_tokens"], 1.0)
    return loss, {"loss": loss, "detection_accuracy": accuracy}


OBJECTIVE = RandomReplacementDetection
