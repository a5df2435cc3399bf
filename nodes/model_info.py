"""``GET /bnb_flux/model_info?name=<unet_name>``: how a model file of Load BnB Flux's list is quantized, read
from its header, so the editor can grey out quant_type and double_quant for a pre-quantized file.

Only names in the node's own file list are answered (no path from the request ever reaches the disk).
Answers are JSON: 200 ``{name, prequantized, quant_type, double_quant, scheme}``; 400 without a name, 404 for a
name not in the list, 422 for a file whose header cannot be read (``error`` says why).
"""
from __future__ import annotations

import asyncio
import os

from .load_bnb_flux import model_files, model_path, stored_quantization

ROUTE = "/bnb_flux/model_info"
ERROR_SHOWN = 500  # characters of a reading error sent back


def model_info(name) -> tuple[int, dict]:
    """(HTTP status, JSON body) for ``name``."""
    if not isinstance(name, str) or not name:
        return 400, {"error": f"give a file name of Load BnB Flux's unet_name list: {ROUTE}?name=<file>"}
    if name not in model_files():
        return 404, {"name": name, "error": "not a file of models/diffusion_models or models/checkpoints"}
    path = model_path(name)
    try:
        stored = stored_quantization(path)
    except Exception as e:  # a damaged or foreign file: the editor leaves the inputs as they are
        folder = os.path.dirname(path)
        message = str(e).replace(folder + os.sep, "").replace(folder, "the model folder")
        return 422, {"name": name, "error": f"{type(e).__name__}: {message}"[:ERROR_SHOWN]}
    return 200, {"name": name, "prequantized": stored.prequantized, "quant_type": stored.quant_type,
                 "double_quant": stored.double_quant, "scheme": stored.describe()}


def register(routes):
    from aiohttp import web

    @routes.get(ROUTE)
    async def get_model_info(request):
        # headers only, but on a slow disk still off the event loop
        status, body = await asyncio.to_thread(model_info, request.query.get("name"))
        return web.json_response(body, status=status)


def register_with_server():
    """Adds the route to ComfyUI's server when there is one (an in-process host without a web server has none)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is not None:
        register(routes)
