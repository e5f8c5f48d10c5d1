"""Data: catalogue readers (SOP, manifest, image folder), synthetic SOP, shard builder, streaming loader, the one
image decoder of catalogue and queries (decode), the transforms and the input spec."""
