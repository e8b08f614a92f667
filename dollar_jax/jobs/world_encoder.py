"""Train the evaluation encoder (dollar_jax/models/world_encoder.py) on real clips; export it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dollar_jax.checkpoint import model_folder_exists, write_model_folder
from dollar_jax.compile_effort import light_jit
from dollar_jax.config import optimizer as optimizer_config
from dollar_jax.data import arrays_dataset, world
from dollar_jax.data.pipeline import eval_batches, train_dataset
from dollar_jax.data.world import world_config
from dollar_jax.models.layers import abstract
from dollar_jax.models.world_encoder import WorldEncoder
from dollar_jax.paths import Paths
from dollar_jax.train.loop import Job, scalar_metrics, train
from dollar_jax.train.optim import make_optimizer
from dollar_jax.train.state import all_finite, apply_gradients, keep_if_finite, split_model


def classes(wcfg: world.WorldConfig) -> dict[str, int]:
    return {f: len(wcfg.values(f)) for f in world.FACTORS}


def make_job(config, workdir: str) -> Job:
    paths, wcfg, e = Paths.of(config, workdir), world_config(config), config.world_encoder
    make = lambda: WorldEncoder(classes(wcfg), e.width, e.features, rngs=nnx.Rngs(config.seed))
    optimizer, lr = make_optimizer(optimizer_config(learning_rate=e.learning_rate, warmup_steps=50), e.steps)
    role, _ = split_model("encoder", abstract(make), optimizer)

    def train_step(state, frozen, batch):
        def loss_fn(p):
            logits = role.module(p)(batch["video"])
            losses = {f: optax.softmax_cross_entropy_with_integer_labels(logits[f], batch[f]).mean() for f in logits}
            return sum(losses.values()), losses

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["encoder"])
        params, opt, gnorm = apply_gradients(state, role, grads)
        new = state.replace(step=state.step + 1, params={"encoder": params}, opt_state={"encoder": opt})
        finite = all_finite(loss, grads)
        return keep_if_finite(finite, new, state), scalar_metrics(loss=loss, grad_norm=gnorm, finite=finite,
                                                                  **{f"loss_{k}": v for k, v in parts.items()})

    source = arrays_dataset.open_split(paths.data, config.data.videos, "train")
    return Job(name="world_encoder", roles={"encoder": role},
               abstract_params=lambda: {"encoder": split_model("e", abstract(make))[1]},
               initial_params=lambda: {"encoder": light_jit(lambda: split_model("e", make())[1])()},
               train_step=train_step,
               dataset=train_dataset(source, e.batch_size, config.data.shuffle_seed,
                                     map_fn=lambda ex: {"video": ex["video"], **{f: ex[f] for f in world.FACTORS}}),
               total_steps=e.steps, learning_rate=lr)


def run(config, workdir: str) -> str:
    out = Paths.of(config, workdir).world_encoder(config)
    if model_folder_exists(out):
        return out
    paths, wcfg, e = Paths.of(config, workdir), world_config(config), config.world_encoder
    job = make_job(config, workdir)
    state = train(job, config, paths.run("world_encoder"))
    model = job.roles["encoder"].module(jax.device_get(state.params["encoder"]))
    source = arrays_dataset.open_split(paths.data, config.data.videos, "validation")
    predict = light_jit(lambda m, v: {k: jnp.argmax(x, -1) for k, x in m(v).items()})
    hits = {f: [] for f in world.FACTORS}
    for batch in eval_batches(source, 128):
        pred = predict(model, batch["video"])
        for f in world.FACTORS:
            hits[f].append(np.asarray(pred[f]) == batch[f])
    accuracy = {f: float(np.concatenate(v).mean()) for f, v in hits.items()}
    write_model_folder(out, {"world_encoder": {"classes": classes(wcfg), "width": e.width, "features": e.features},
                             "metrics": {"validation_accuracy": accuracy, "steps": e.steps}},
                       nnx.to_pure_dict(nnx.state(model)))
    return out
