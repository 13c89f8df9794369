"""End-to-end test of tff_sam.federated: FedAvg on a learnable toy task with TFF.

One module-scoped run (synthetic data, the tiny model, 3 clients, a few rounds) feeds
most tests; a deliberately poisoned client (NaN embeddings in its cache) joins extra
rounds from the same start. The robust aggregator is also tested on its own with
hand-made updates. TFF's C++ `worker_binary` is ended after the session (conftest.py).
"""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import pipeline
from tff_sam.data import synthetic
from tff_sam.federated.learning import aggregation
from tff_sam.federated.learning import processes
from tff_sam.federated.learning import tasks
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import sam as sam_lib

from conftest import cpp_execution

SITES = ("site_0", "site_1", "site_2")
ROUNDS = 6
CLIENT_LR = 1e-3  # Adam; learns steadily on this task (2e-3 does too, more noisily)
IMAGES_PER_SITE = 2


POISONED = "poisoned"


def _poison(records, out_dir: Path) -> list[Path]:
  """Copies of `records` whose embeddings are all NaN (e.g. a float16 overflow)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, rec in enumerate(records):
    raw = next(iter(tf.data.TFRecordDataset(str(rec.path)))).numpy()
    example = tf.train.Example.FromString(raw)
    emb = tf.io.parse_tensor(example.features.feature["embedding"].bytes_list.value[0],
                             tf.float16)
    example.features.feature["embedding"].bytes_list.value[0] = tf.io.serialize_tensor(
        tf.fill(tf.shape(emb), tf.constant(np.nan, tf.float16))).numpy()
    path = out_dir / f"poisoned_{i}.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
      w.write(example.SerializeToString())
    paths.append(path)
  return paths


@pytest.fixture(name="run", scope="module")
def _run(tmp_path_factory):
  """Builds the process, runs ROUNDS rounds; returns everything the tests inspect."""
  mp = pytest.MonkeyPatch()
  tmp = tmp_path_factory.mktemp("federated")
  mp.setenv("TFF_SAM_CACHE", str(tmp / "cache"))
  try:
    root = synthetic.generate(tmp / "data", images_per_site=IMAGES_PER_SITE, test_per_site=0,
                              seed=0)
    bundle = build.load_sam("tiny")
    records = {}
    for site in SITES:
      records[site], _ = cache.build_records(
          discovery.list_examples(root / site), bundle=bundle, cache_root=tmp / "cache",
          binary_components=False, batch_size=4, show_progress=False)
    counts = cache.write_manifests(tmp / "clients", records)
    assert counts == {s: IMAGES_PER_SITE for s in SITES}
    poisoned = _poison(records["site_2"], tmp / "poisoned")
    (tmp / "clients" / f"{POISONED}.txt").write_text("".join(f"{p}\n" for p in poisoned))
    # The program's task builder; box jitter 8 px of SAM's 1024 frame = 2 px here.
    config = config_lib.RunConfig(
        output_dir=str(tmp / "out"), prompt="box", prompts_per_image=4, box_jitter=8.0,
        local_epochs=1, batch_size=2, client_lr=CLIENT_LR, seed=0)
    task = tasks.build_task(config=config, bundle=bundle,
                            client_ids=list(SITES) + [POISONED], manifest_dir=tmp / "clients")
    assert task.pipeline_spec.box_jitter == 2.0
    process, local = task.training_process, task.decoder
    trainable, non_trainable = decoder_lib.model_weights_lists(local)
    default_state = process.initialize()
    state = task.initial_state
    initial = processes.weights_from_state(process, state)
    metrics, aggregates = [], []
    for round_num in range(1, ROUNDS + 1):
      result = process.next(
          state, [pipeline.round_client_id(c, round_num) for c in SITES])
      state = result.state
      metrics.append(result.metrics["client_work"]["train"])
      aggregates.append(aggregation.aggregation_metrics(result.metrics["aggregator"]))
    final = processes.weights_from_state(process, state)
    # From the same start: two healthy clients, without and with the poisoned one.
    start = processes.initial_state(process, trainable, non_trainable)
    healthy = [pipeline.round_client_id(c, 1) for c in SITES[:2]]
    clean = process.next(start, healthy)
    dirty = process.next(start, healthy + [pipeline.round_client_id(POISONED, 1)])
    yield dict(process=process, local=local, given=(trainable, non_trainable),
               default=processes.weights_from_state(process, default_state),
               initial=initial, final=final, metrics=metrics, aggregation=aggregates,
               clean=clean, dirty=dirty)
  finally:
    mp.undo()


def test_initial_state_carries_given_weights(run):
  given_t, given_n = run["given"]
  init_t, init_n = run["initial"]
  assert len(init_t) == len(given_t) and len(init_n) == len(given_n)
  for a, b in zip(init_t + init_n, given_t + given_n):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  # Meaningful only because model_fn's own (random) initialization is different.
  default_t, _ = run["default"]
  assert any(not np.array_equal(a, b) for a, b in zip(default_t, given_t))


def test_weight_order_matches_keras_model(run):
  local = run["local"]
  init_t, init_n = run["initial"]
  assert [v.shape for v in init_t] == [tuple(w.shape) for w in local.trainable_weights]
  assert [v.shape for v in init_n] == [tuple(w.shape) for w in local.non_trainable_weights]


def test_training_loss_goes_down(run):
  losses_by_round = [float(m["loss"]) for m in run["metrics"]]
  assert all(np.isfinite(losses_by_round)), losses_by_round
  first = np.mean(losses_by_round[:2])
  last = np.mean(losses_by_round[-2:])
  assert last < 0.9 * first, losses_by_round
  assert min(losses_by_round[-2:]) < losses_by_round[0], losses_by_round


def test_every_client_example_is_used(run):
  for m in run["metrics"]:
    assert int(m["num_examples"]) == len(SITES) * IMAGES_PER_SITE
    assert 0.0 <= float(m["dice"]) <= 1.0


def test_only_trainable_weights_change(run):
  init_t, init_n = run["initial"]
  final_t, final_n = run["final"]
  for a, b in zip(init_n, final_n):
    assert a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()  # bit-identical
  names = [w.name for w in run["local"].trainable_weights]
  assert all("mask_decoder" in n for n in names)
  unchanged = sorted(n for n, a, b in zip(names, init_t, final_t) if np.array_equal(a, b))
  # With multimask_output=False the hypernetwork MLPs of masks 1..3 get no gradient;
  # every other trainable weight (incl. the IoU head) must move.
  assert all(any(f"output_hypernetworks_mlps_._{i}/" in n for i in (1, 2, 3))
             for n in unchanged), unchanged
  assert len(unchanged) < 0.25 * len(names)
  assert any("iou_prediction_head" in n for n in names)
  assert all(np.isfinite(v).all() for v in final_t)


def test_final_weights_load_into_keras_model(run):
  """The trained global model can be put into a Keras model and gives finite masks."""
  local = run["local"]
  decoder_lib.assign_model_weights(local, *run["final"])
  cfg = local.sam_config
  side = sam_lib.image_size(cfg)
  out = local({
      "image_embeddings": tf.random.stateless_normal(
          (1,) + sam_lib.embedding_shape(cfg), seed=[1, 2]),
      "boxes": tf.constant([[[0.1 * side, 0.1 * side, 0.5 * side, 0.6 * side]]]),
  })
  assert np.isfinite(out["masks"].numpy()).all()
  for w, v in zip(local.trainable_weights, run["final"][0]):
    np.testing.assert_array_equal(w.numpy(), v)


def test_healthy_rounds_zero_nothing(run):
  for m in run["aggregation"]:
    assert m["nonfinite_clients"] == 0 and m["zeroed_clients"] == 0, m
    assert m["clipped_clients"] is not None and m["clipping_norm"] > 0
    assert m["zeroing_norm"] > 1.0  # multiplier x quantile estimate + increment 1


def test_poisoned_client_cannot_change_the_global_model(run):
  process, clean, dirty = run["process"], run["clean"], run["dirty"]
  assert aggregation.aggregation_metrics(dirty.metrics["aggregator"])["nonfinite_clients"] == 1
  assert aggregation.aggregation_metrics(clean.metrics["aggregator"])["nonfinite_clients"] == 0
  clean_t, _ = processes.weights_from_state(process, clean.state)
  dirty_t, _ = processes.weights_from_state(process, dirty.state)
  for a, b in zip(clean_t, dirty_t):
    assert np.isfinite(b).all()
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-7)
  # Its NaN training metrics are dropped too: the round reports the healthy ones.
  assert np.isfinite(float(dirty.metrics["client_work"]["train"]["loss"]))
  assert int(dirty.metrics["client_work"]["train"]["num_examples"]) == 2 * IMAGES_PER_SITE


def _aggregate(factory, updates, weights):
  """The aggregator alone on `updates`; under TFF's C++ worker, because a bare
  aggregation process `(state, values, weights)` is not a round, the one shape the
  default `tf` execution runs (the program's rounds run these aggregators under tf)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  value_type = tff.TensorType(np.float32, [3])
  process = factory.create(value_type, tff.TensorType(np.float32))
  with cpp_execution():
    out = process.next(process.initialize(), [np.asarray(u, np.float32) for u in updates],
                       [np.float32(w) for w in weights])
  return np.asarray(out.result), aggregation.aggregation_metrics(out.measurements)


# Three healthy updates (L2 norms 0.17, 0.35, 0.52), one with norm 5 (clipped at the
# initial norm 1.0), one exploding (1e6, zeroed at 2 x 10 + 1) and the zero update of
# weight 0 that TFF's client work sends for a NaN/Inf update.
UPDATES = [[0.1] * 3, [0.2] * 3, [0.3] * 3, [0.0, 3.0, 4.0], [1e6, 0.0, 0.0], [0.0] * 3]
WEIGHTS = [1.0, 2.0, 1.0, 1.0, 1.0, 0.0]


def test_robust_aggregator_zeroes_clips_and_counts():
  result, m = _aggregate(aggregation.build_model_aggregator(), UPDATES, WEIGHTS)
  assert m["nonfinite_clients"] == 1 and m["zeroed_clients"] == 1
  assert m["clipped_clients"] == 1
  assert m["clipping_norm"] == pytest.approx(1.0) and m["zeroing_norm"] == pytest.approx(21.0)
  # Zeroed updates keep their weight (TFF's documented behaviour); clipped to norm 1.
  expected = (0.1 + 2 * 0.2 + 0.3) * np.ones(3) + np.array([0.0, 0.6, 0.8])
  np.testing.assert_allclose(result, expected / 6.0, rtol=1e-6)


def test_robust_aggregation_can_be_disabled():
  result, m = _aggregate(aggregation.build_model_aggregator(zeroing=False, clipping=False),
                         UPDATES, WEIGHTS)
  assert m == {"nonfinite_clients": 1, "zeroed_clients": None, "clipped_clients": None,
               "zeroing_norm": None, "clipping_norm": None}
  expected = np.sum(np.asarray(UPDATES) * np.asarray(WEIGHTS)[:, None], axis=0) / 6.0
  np.testing.assert_allclose(result, expected, rtol=1e-6)
  assert result[0] > 1e5  # one exploding client dominates a plain mean


def test_clipping_only_and_its_settings():
  _, m = _aggregate(aggregation.build_model_aggregator(zeroing=False, clipping_initial_norm=0.3),
                    UPDATES[:3] + UPDATES[5:], WEIGHTS[:3] + WEIGHTS[5:])
  assert m["zeroed_clients"] is None and m["clipping_norm"] == pytest.approx(0.3)
  assert m["clipped_clients"] == 2  # norms 0.35 and 0.52
