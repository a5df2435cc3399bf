"""FLUX checkpoint files: tensor files and shard sets, stored layers, q/k/v fusion, the reader and the writer."""
