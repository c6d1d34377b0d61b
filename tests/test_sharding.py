"""The same steps on different meshes of 8 fake CPU devices give the same losses, and
parameters are sharded as the rules table says."""
import json
import subprocess
import sys
import textwrap

from tests.train_helpers import ROOT, env_for

_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import optax
    from amos_jax.model.partitioning import axis_rules
    from amos_jax.objectives import get_objective
    from amos_jax.train import sharding as shd
    from amos_jax.train.state import CheckpointForm, create_train_state, make_optimizer
    from amos_jax.train.step import make_train_step
    from tests.helpers import random_batch, tiny_config

    out = {}
    batches = [random_batch(jax.random.key(i), 8, 32, 64, pad_tail=5) for i in range(3)]
    for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]:
      c = tiny_config("electra", num_layers=1, hidden_dropout=0.1)
      c.train.update(warmup_steps=0, learning_rate=1e-2)
      c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
      n = shape[0] * shape[1] * shape[2]
      mesh = shd.build_mesh(c.mesh, jax.devices()[:n])
      obj = get_objective(c)
      tx = make_optimizer(c.train)
      graphdef, state, state_sh = create_train_state(obj, mesh, tx)
      batch_sh = shd.batch_sharding(mesh, c.sharding.rules)
      step = jax.jit(make_train_step(graphdef, obj, tx), in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, shd.replicated(mesh)))
      losses = []
      with jax.set_mesh(mesh), axis_rules(c.sharding.rules):
        for b in batches:
          b = jax.device_put(b, batch_sh)
          state, m = step(state, b)
          losses.append(float(m["loss"]))
      name = "discriminator/encoder/layer/*/intermediate/dense/kernel"
      k, m1 = state.params[name], optax.tree.get(state.opt_state, "mu")[name]
      # The per-layer form that checkpoints hold: layer 0 of the stacked arrays.
      saved = CheckpointForm.of(obj, mesh, tx).to_checkpoint(state)
      k0 = saved.params["discriminator"]["encoder"]["layer"][0]["intermediate"]["dense"]["kernel"][...]
      out[str(shape)] = dict(losses=losses, spec=str(k.sharding.spec),
                             shard=list(k.addressable_shards[0].data.shape),
                             mu_spec=str(m1.sharding.spec), saved_spec=str(k0.sharding.spec),
                             saved_shard=list(k0.addressable_shards[0].data.shape))
    print(json.dumps(out))
""")


def test_losses_equal_across_meshes_and_params_sharded():
  # XLA's backend optimizations off: the same values, compiled faster.
  env = dict(env_for(8), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                     text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  ref = out["(1, 1, 1)"]["losses"]
  assert len(set(ref)) == 3  # the steps do train
  for shape, o in out.items():
    assert abs(o["losses"][0] - ref[0]) < 1e-5 * abs(ref[0]), (shape, o["losses"], ref)
    for a, b in zip(o["losses"], ref):
      assert abs(a - b) < 1e-4 * abs(b), (shape, o["losses"], ref)
  # intermediate.dense.kernel is (embed=32, mlp=64): embed -> fsdp, mlp -> tensor;
  # stacked (layers=1, 32, 64), the layer axis unsplit.
  assert out["(2, 2, 2)"]["spec"] == "P(None, 'fsdp', 'tensor')"
  assert out["(2, 2, 2)"]["shard"] == [1, 16, 32]
  assert out["(1, 4, 2)"]["shard"] == [1, 8, 32]
  assert out["(8, 1, 1)"]["shard"] == [1, 32, 64]
  # Adam's moments are sharded like their parameters.
  assert out["(1, 4, 2)"]["mu_spec"] == "P(None, 'fsdp', 'tensor')"
  # The checkpoint form's per-layer kernel is sharded as the rules say.
  assert out["(2, 2, 2)"]["saved_spec"] == "P('fsdp', 'tensor')"
  assert out["(1, 4, 2)"]["saved_shard"] == [8, 32]
