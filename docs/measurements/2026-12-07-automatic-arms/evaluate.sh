#!/bin/bash
cd /tmp/snap_auto
for m in mobile_sam /tmp/demo_auto/compare/seed0/federated/model; do
  n=$(basename $(dirname $m)); [ "$m" = mobile_sam ] && n=zero_shot
  /usr/bin/time -v /work/main/.venv/bin/python -m tff_sam.experiments.evaluate --model $m --data=sample --eval_prompt=automatic --points_per_side=32 --pred_iou_thresh=0.7 --stability_score_thresh=0.8 --output_json=/tmp/auto32/$n.json > /tmp/auto32/$n.log 2>&1
done
echo done > /tmp/auto32/DONE
