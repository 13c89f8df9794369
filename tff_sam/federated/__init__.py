"""Federated: TFF processes and aggregators, the one task builder, execution
contexts, the program's logic and its wiring, and metric releases."""
