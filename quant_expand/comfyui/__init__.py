"""Everything that touches ComfyUI's internals: ops, loader, saver, patch translation, patcher, LoRA bookkeeping.

The only part of the package that imports ``comfy``; the rest runs with torch and bitsandbytes alone."""
