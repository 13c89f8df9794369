import sys, numpy as np
from pathlib import Path
from tff_sam.models import build
from tff_sam import config as config_lib
from tff_sam.evaluation import automatic, instance_metrics
from tff_sam.data import reading
img_path = Path(sys.argv[2])
img = reading.read_image(img_path)
truth = reading.read_mask(next((img_path.parent.parent / "masks").glob(img_path.stem + ".*")))
b = build.load_sam(sys.argv[1])
g = automatic.AutomaticMaskGenerator(b, settings=config_lib.AutomaticSettings(points_per_side=int(sys.argv[3]), pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, max_mask_fraction=1.0))
f = g(img)
H, W = img.shape[:2]
for it in (0.88, 0.8, 0.7, 0.5):
  for st in (0.95, 0.8, 0.6, 0.3):
    k = f.take((f.iou >= it) & (f.stability >= st))
    k = k.take(automatic.box_nms(k.boxes, k.iou, threshold=0.7))
    k = k.take(k.masks.sum(axis=(1,2)) <= 0.5 * H * W)
    lab = automatic.label_image(k, (H, W))
    sa = instance_metrics.segmentation_accuracy(truth, lab)
    print(f"iou>={it} stab>={st}: found {lab.max()} / {len(np.unique(truth))-1}  mSA {sa['msa']:.3f} SA50 {sa['sa50']:.3f}")
