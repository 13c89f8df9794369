"""Exporting a fine-tuned model: transformers' TF and PyTorch layouts, SAM/MobileSAM
checkpoints, ONNX and a TF SavedModel serving signature."""
