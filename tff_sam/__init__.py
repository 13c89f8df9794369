"""tff_sam: federated fine-tuning of Segment Anything's mask decoder with TFF.

Library modules have no import-time side effects; command-line binaries live in
`tff_sam.experiments`.
"""

__version__ = "0.1.0"
