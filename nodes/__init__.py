"""The pack's ComfyUI nodes (V3 API). Node ids and input names are public API: keep them stable."""
from .load_bnb_flux import LoadBnbFlux

NODES = [LoadBnbFlux]
CATEGORY = "loaders/bnb flux"
