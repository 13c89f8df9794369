"""Evaluation: held-out Dice/IoU at the original resolution, prompted inference,
and the run's pictures."""
