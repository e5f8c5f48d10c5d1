"""Data: catalogue readers (SOP, manifest, image folder), synthetic SOP, shard builder, streaming loader."""
