"""LoRAs: the run-time lazy delta (``delta``), and LoRA files of every supported trainer to one canonical form."""
