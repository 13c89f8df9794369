"""Server optimizers (`--server_optimizer`): TFF's own, wired with their settings,
different from FedAvg, and resumed exactly from the saved state.

The program's own processes on the tiny reference data; plain client SGD so that the
server's step is what differs.
"""

import asyncio

import numpy as np
import pytest
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import pipeline
from tff_sam.federated.learning import processes
from tff_sam.federated.learning import tasks
from tff_sam.federated.program import run_folder

from conftest import cache_clients

CLIENTS = ("site_0", "site_1")


def _max_abs(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))


@pytest.fixture(name="clients_dir", scope="module")
def _clients_dir(reference_data, tmp_path_factory, bundle):
  tmp = tmp_path_factory.mktemp("server_optimizers")
  cache_clients(reference_data, CLIENTS, bundle=bundle, tmp=tmp)
  return tmp


def _two_rounds(bundle, tmp, **settings):
  """(task, state after round 1, state after round 2) of the tiny task with `settings`."""
  config = config_lib.RunConfig(output_dir=str(tmp / "out"), model="tiny", prompts_per_image=2,
                                batch_size=2, client_optimizer="sgd", client_lr=0.5, seed=0,
                                **settings).validate()
  task = tasks.build_task(config=config, bundle=bundle, client_ids=list(CLIENTS),
                          manifest_dir=tmp / "clients")
  states = [task.initial_state]
  for round_num in (1, 2):
    ids = [pipeline.round_client_id(c, round_num) for c in CLIENTS]
    states.append(task.training_process.next(states[-1], ids).state)
  return task, states[1], states[2]


@pytest.fixture(name="fedavg", scope="module")
def _fedavg(bundle, clients_dir):
  return _two_rounds(bundle, clients_dir)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    dict(server_optimizer="sgdm", server_momentum=0.9),
    dict(server_optimizer="adam", server_lr=1e-3),
    dict(server_optimizer="yogi", server_lr=1e-3, server_beta_2=0.9),
], ids=lambda s: s["server_optimizer"])
def test_server_optimizer_differs_from_fedavg_and_resumes_exactly(bundle, clients_dir, fedavg,
                                                                  tmp_path, settings):
  """Round 2 from the state saved after round 1 (as `run` saves and loads it) equals
  round 2 in memory; its optimizer state (moments, momentum) is part of that state."""
  task, first, second = _two_rounds(bundle, clients_dir, **settings)
  assert _max_abs(second.global_model_weights.trainable,
                  fedavg[2].global_model_weights.trainable) > 1e-5
  optimizer_state = tf.nest.flatten(first.finalizer)
  assert len(optimizer_state) > len(tf.nest.flatten(fedavg[1].finalizer))

  manager = run_folder.state_manager(tmp_path)
  asyncio.run(manager.save(first, 1))
  loaded, version = asyncio.run(manager.load_latest(task.initial_state))
  assert version == 1
  ids = [pipeline.round_client_id(c, 2) for c in CLIENTS]
  resumed = task.training_process.next(loaded, ids).state
  assert _max_abs(resumed.global_model_weights.trainable,
                  second.global_model_weights.trainable) == 0.0
  assert _max_abs(resumed.finalizer, second.finalizer) == 0.0


def test_server_optimizers_are_tffs_own_with_their_settings():
  """Each name builds TFF's optimizer with the given hyperparameters."""
  built = {name: processes.build_server_optimizer(
               name=name, learning_rate=0.5, momentum=0.7, beta_1=0.8, beta_2=0.95,
               epsilon=0.01)
           for name in config_lib.SERVER_OPTIMIZERS}
  specs = {name: optimizer.initialize(tf.TensorSpec([2], tf.float32))
           for name, optimizer in built.items()}
  assert float(specs["sgd"]["learning_rate"]) == 0.5 and "momentum" not in specs["sgd"]
  assert float(specs["sgdm"]["momentum"]) == pytest.approx(0.7)
  assert {n: type(o).__module__.rsplit(".", 1)[-1] for n, o in built.items()} == {
      "sgd": "sgdm", "sgdm": "sgdm", "adam": "adam", "yogi": "yogi"}
  for name in ("adam", "yogi"):
    assert [float(specs[name][k]) for k in ("beta_1", "beta_2", "epsilon")] == pytest.approx(
        [0.8, 0.95, 0.01])


@pytest.mark.parametrize("settings, message", [
    (dict(server_momentum=0.5), "^--server_momentum: is set but --server_optimizer=sgd does "
     "not use it; drop it or pass --server_optimizer=sgdm$"),
    (dict(server_optimizer="sgdm", server_beta_1=0.5), "^--server_beta_1: is set but "
     "--server_optimizer=sgdm does not use it; drop it or pass --server_optimizer=adam or yogi$"),
    (dict(server_optimizer="sgdm", server_momentum=1.0), "^--server_momentum: must be in "
     "\\[0, 1\\), got 1.0$"),
    (dict(server_optimizer="adam", server_epsilon=0.0), "^--server_epsilon: must be > 0"),
    (dict(server_optimizer="fedadam"), "^--server_optimizer: must be one of"),
])
def test_server_optimizer_settings_are_checked(settings, message):
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.RunConfig(output_dir="x", **settings).validate()
