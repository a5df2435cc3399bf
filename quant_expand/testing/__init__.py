"""Test tooling that ships with the pack because the demo uses it: tiny synthetic FLUX models and LoRAs, an
in-process ComfyUI host, prompt builders and error measures. Not used by the nodes."""
