"""comfyui-bnb-flux: FLUX.1 quantized with bitsandbytes (NF4, FP4, LLM.int8) with Control LoRAs and LoRAs.

ComfyUI imports this folder as a package named after its path; everything inside uses relative imports.
"""
import importlib.util

WEB_DIRECTORY = "./web"

# Outside ComfyUI (pytest collects the repo root as a package) there is nothing to register.
if importlib.util.find_spec("comfy_api") is not None:
    from comfy_api.latest import ComfyExtension, io

    from .nodes import NODES

    class BnbFluxExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> BnbFluxExtension:
        return BnbFluxExtension()
