"""The ComfyUI the pack runs in, checked once at start-up against the release it needs: an older one is
named in one log line, and every node of the pack fails with the same message instead of a TypeError
deep inside ComfyUI's model code."""
from __future__ import annotations

import logging
import os

import folder_paths

from ..quant_expand.errors import BnbFluxError
from ..quant_expand.comfyui.supported_comfyui import host_problem

# folder_paths lives in ComfyUI's code folder (its base_path moves with --base-directory; this does not)
HOST_PROBLEM = host_problem(os.path.dirname(os.path.abspath(folder_paths.__file__)))
if HOST_PROBLEM:
    logging.getLogger("comfyui-bnb-flux").error(HOST_PROBLEM)


def require_supported_host():
    if HOST_PROBLEM:
        raise BnbFluxError(HOST_PROBLEM)
