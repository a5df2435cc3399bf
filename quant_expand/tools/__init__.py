"""Command-line tools: file conversion and inspection, the demo, and a client for a running ComfyUI server."""
