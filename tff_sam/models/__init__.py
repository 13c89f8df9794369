"""Models: SAM's architectures (prompt encoder + mask decoder, online model, TinyViT),
loading by name (`build`), MobileSAM's checkpoint, losses and metrics, export."""
