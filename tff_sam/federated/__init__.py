"""Federated: TFF learning (`learning`), where it runs (`backends`) and the training
program around it (`program`)."""
