"""The pack's ComfyUI nodes (V3 API). Node ids and input names are public API: keep them stable."""
from . import host_check  # noqa: F401  (names an unsupported ComfyUI in the log at start-up)
from .apply_control_lora import ApplyControlLora, SetLoraScale
from .apply_lora_stack import ApplyLoraStack
from .example_inputs import copy_example_inputs
from .load_bnb_flux import LoadBnbFlux
from .model_info import register_with_server
from .save_bnb_flux import SaveBnbFlux

NODES = [LoadBnbFlux, ApplyControlLora, ApplyLoraStack, SetLoraScale, SaveBnbFlux]

copy_example_inputs()  # the example workflows' input images, into ComfyUI's input folder when missing
register_with_server()  # GET /bnb_flux/model_info, which the editor asks about unet_name
