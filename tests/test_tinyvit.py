"""Tests for tff_sam.models.tinyvit: MobileSAM's TinyViT encoder in Keras."""

from pathlib import Path

import numpy as np
import pytest

from tff_sam import errors
from tff_sam.models import mobile_sam
from tff_sam.models import tinyvit
from tff_sam.models import tinyvit_weights

FIXTURE = Path(__file__).parent / "fixtures" / "tinyvit_parity.npz"


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of the loader's layout conversion (Keras -> PyTorch)."""
  if kind == "conv":
    return np.transpose(value, (3, 2, 0, 1))
  if kind == "dwconv":
    return np.transpose(value, (2, 3, 0, 1))
  if kind == "linear":
    return value.T
  return value


def _randomize(model: tinyvit.TinyViT, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  for name, var, _ in model.torch_params():
    value = rng.normal(0.0, 0.05, var.shape).astype(np.float32)
    if name.endswith("running_var"):
      value = np.abs(value) + 0.5
    var.assign(value)


def _torch_state_dict(model: tinyvit.TinyViT, prefix: str = "image_encoder.") -> dict:
  return {prefix + name: _to_torch(var.numpy(), kind) for name, var, kind in model.torch_params()}


@pytest.fixture(scope="module")
def small_model():
  model = tinyvit.build_tinyvit(64)
  _randomize(model)
  return model


def test_small_input_shape_and_graph_mode_agree(small_model):
  x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
  eager = small_model(x).numpy()
  assert eager.shape == (2, 256, 4, 4)
  assert np.isfinite(eager).all()
  graph = small_model.get_image_embeddings(x).numpy()
  np.testing.assert_allclose(graph, eager, atol=1e-5)
  # Examples are independent: the batch does not mix them.
  np.testing.assert_allclose(small_model.get_image_embeddings(x[1:]).numpy(), eager[1:],
                             atol=1e-5)


def test_rejects_sizes_not_multiple_of_16():
  with pytest.raises(ValueError):
    tinyvit.build_tinyvit(100)


def test_parameter_count_matches_mobile_sam():
  # MobileSAM's encoder has 6.08 M parameters, of which its unused ImageNet head
  # (norm_head + head: 320*2 + 1000*321) is not part of the Keras model.
  model = tinyvit.build_tinyvit(32)
  count = sum(int(np.prod(v.shape)) for _, v, _ in model.torch_params())
  assert count == sum(int(np.prod(w.shape)) for w in model.weights)
  assert count + 320 * 2 + 1000 * 321 == pytest.approx(6.08e6, rel=2e-3)


def test_state_dict_round_trip_and_errors(small_model):
  state = _torch_state_dict(small_model)
  # Entries the forward pass never reads are accepted; other modules' keys ignored.
  state["image_encoder.head.weight"] = np.zeros((1000, 320), np.float32)
  state["image_encoder.layers.0.blocks.0.conv1.bn.num_batches_tracked"] = np.array(5)
  state["mask_decoder.iou_token.weight"] = np.zeros((1, 256), np.float32)
  other = tinyvit.build_tinyvit(64)
  tinyvit_weights.load_tinyvit_state_dict(other, state)
  for (_, a, _), (_, b, _) in zip(small_model.torch_params(), other.torch_params()):
    np.testing.assert_array_equal(a.numpy(), b.numpy())

  broken = dict(state)
  del broken["image_encoder.neck.2.weight"]
  broken["image_encoder.layers.1.blocks.0.attn.bogus"] = np.zeros(3, np.float32)
  broken["image_encoder.layers.1.blocks.0.attn.qkv.weight"] = np.zeros((384, 127), np.float32)
  with pytest.raises(errors.ModelError) as e:
    tinyvit_weights.load_tinyvit_state_dict(other, broken)
  msg = str(e.value)
  assert "\n" not in msg
  assert "missing: image_encoder.neck.2.weight" in msg
  assert "unexpected: image_encoder.layers.1.blocks.0.attn.bogus" in msg
  assert "mis-shaped: image_encoder.layers.1.blocks.0.attn.qkv.weight" in msg


def test_save_load_weights_round_trip(small_model, tmp_path):
  path = tmp_path / "sub" / "tinyvit.npz"
  tinyvit_weights.save_tinyvit_weights(small_model, path)
  assert sorted(p.name for p in path.parent.iterdir()) == ["tinyvit.npz"]  # No temp left.
  loaded = tinyvit_weights.load_tinyvit_weights(path)
  assert loaded.img_size == 64
  for (na, a, _), (nb, b, _) in zip(small_model.torch_params(), loaded.torch_params()):
    assert na == nb
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  x = np.random.default_rng(2).normal(size=(1, 3, 64, 64)).astype(np.float32)
  np.testing.assert_array_equal(loaded(x).numpy(), small_model(x).numpy())


def test_load_weights_rejects_bad_files(tmp_path):
  with pytest.raises(errors.ModelError):
    tinyvit_weights.load_tinyvit_weights(tmp_path / "absent.npz")
  bad = tmp_path / "bad.npz"
  np.savez(bad, foo=np.zeros(3))
  with pytest.raises(errors.ModelError, match="not a TinyViT weights file"):
    tinyvit_weights.load_tinyvit_weights(bad)


def _fixture_pixel_values(fx) -> np.ndarray:
  """The fixture image normalized as tools/make_tinyvit_fixture.py does, (1, 3, 1024, 1024)."""
  pv = (fx["image"].astype(np.float32) - fx["pixel_mean"]) / fx["pixel_std"]
  return np.ascontiguousarray(pv.transpose(2, 0, 1)[None], dtype=np.float32)


@pytest.mark.slow
def test_parity_with_pytorch_reference():

  _, encoder = mobile_sam.load_mobile_sam()
  with np.load(FIXTURE) as fx:
    fx = dict(fx)
  emb = encoder.get_image_embeddings(_fixture_pixel_values(fx)).numpy()[0]
  assert emb.shape == (256, 64, 64)
  # Exact float32 reference values at a subsampled grid.
  ref_sub = fx["embedding_sub_f32"]
  sub_err = np.abs(emb[:, 2::4, 2::4] - ref_sub)
  assert sub_err.max() < 5e-5 and sub_err.max() / np.abs(ref_sub).max() < 1e-4, sub_err.max()
  # The whole map against the float16-rounded reference (half-ulp <= 2.5e-4 here).
  full_err = np.abs(emb - fx["embedding_f16"].astype(np.float32))
  assert full_err.max() < 5e-4, full_err.max()
  assert full_err.mean() < 5e-5, full_err.mean()
  mean, std, lo, hi = fx["embedding_stats"]
  assert abs(emb.mean() - mean) < 1e-5 and abs(emb.std() - std) < 1e-5
  assert abs(emb.min() - lo) < 1e-4 and abs(emb.max() - hi) < 1e-4
