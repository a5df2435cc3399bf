"""ComfyUI in-process, for the tests and the demo: the real executor, loaders, patcher and sampler.

A tiny FLUX cannot use ComfyUI's text encoders (FLUX's T5 is fixed at T5-XXL), so the process that
starts the host (a test run, the demo) registers helper nodes of its own — never part of the pack's
node list: a conditioning node that makes ``[[tokens, {pooled_output, guidance, concat_latent_image}]]``
from a seed, a latent node, and a capture node that hands sampled latents back to Python. Prompts that
use them: ``quant_expand.testing.prompts.sampling_graph``.
"""
from __future__ import annotations

import asyncio
import gc
import importlib
import json
import os
import sys
import uuid

import torch

CAPTURED: dict[str, torch.Tensor] = {}


class BnbFluxTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "context_dim": ("INT", {"default": 64, "min": 1, "max": 8192}),
                             "pooled_dim": ("INT", {"default": 64, "min": 0, "max": 8192}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0})},
                "optional": {"control": ("LATENT",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_test"

    def make(self, seed, tokens, context_dim, pooled_dim, guidance, control=None):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, context_dim, generator=g)
        extra = {"guidance": guidance}
        if pooled_dim:  # 0: no pooled vector, as Chroma's and FLUX.2's text encoders give none
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=g)
        if control is not None:
            extra["concat_latent_image"] = control["samples"]
        return ([[cond, extra]],)


class BnbFluxTestLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "size": ("INT", {"default": 16, "min": 2, "max": 512}),
                             "scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0})},
                "optional": {"channels": ("INT", {"default": 16, "min": 1, "max": 256})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "_test"

    def make(self, seed, size, scale, channels=16):  # FLUX.1 and Chroma latents: 16 channels; FLUX.2: 128
        g = torch.Generator().manual_seed(seed)
        return ({"samples": torch.randn(1, channels, size, size, generator=g) * scale},)


class BnbFluxTestCapture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": "out"})}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "_test"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always runs, so cached upstream results are captured too

    def capture(self, samples, key):
        CAPTURED[key] = samples["samples"].clone()
        return {}


class BnbFluxTestValue:
    """Any JSON value through an output of type ``*``: what a primitive or switch node feeding a node's input
    through a link looks like to it (ComfyUI checks only widget values against the input's schema)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"default": "0"})}}

    RETURN_TYPES = ("*",)
    FUNCTION = "make"
    CATEGORY = "_test"

    def make(self, value):
        return (json.loads(value),)


TEST_NODES = {
    "BnbFluxTestValue": BnbFluxTestValue,
    "BnbFluxTestConditioning": BnbFluxTestConditioning,
    "BnbFluxTestLatent": BnbFluxTestLatent,
    "BnbFluxTestCapture": BnbFluxTestCapture,
}


class _ServerStub:
    """What PromptExecutor needs of ComfyUI's PromptServer: a place to send progress messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    class node_replace_manager:  # comfy_extras/nodes_replacements registers UI node replacements here
        @staticmethod
        def register(replacement):
            pass


def _enable_dynamic_vram() -> bool:
    """What ComfyUI's main.py does before loading anything: start comfy-aimdo, register the devices,
    and make ModelPatcherDynamic the core patcher."""
    import comfy_aimdo.control
    from comfy.cli_args import args

    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
    try:
        comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:  # older comfy-aimdo protocols
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom)
        except TypeError:
            comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    devices = mm.get_all_torch_devices()
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(ok)


class ComfyHost:
    instance = None

    @classmethod
    def start(cls, comfy_path: str, repo_root: str, models_dir: str, cpu: bool = True,
              dynamic_vram: bool = False, extra_args=()) -> "ComfyHost":
        """``dynamic_vram``: turn ComfyUI's dynamic VRAM on the way its main.py does (NVIDIA only);
        code that imports ComfyUI otherwise gets the legacy ModelPatcher."""
        if cls.instance is not None:
            return cls.instance
        comfy_path = os.path.abspath(comfy_path)
        # first on the path: ComfyUI's top-level ``nodes`` module must win over this repo's ``nodes/``
        # package when the repo root is on sys.path too
        sys.path[:] = [comfy_path] + [p for p in sys.path if os.path.abspath(p or ".") != comfy_path]
        # ComfyUI parses its command line at import: CPU unless asked otherwise (without an NVIDIA
        # driver, importing comfy.model_management fails) and classic caching
        sys.argv = [sys.argv[0], "--cache-classic", *extra_args] + (["--cpu"] if cpu else [])
        import comfy.options

        comfy.options.enable_args_parsing()
        dynamic_on = _enable_dynamic_vram() if dynamic_vram else False
        import execution
        import folder_paths

        import nodes

        for sub in ("diffusion_models", "loras", "checkpoints", "text_encoders", "vae"):
            os.makedirs(os.path.join(models_dir, sub), exist_ok=True)
            folder_paths.add_model_folder_path(sub, os.path.join(models_dir, sub), is_default=True)
        # the pack copies its example inputs into the input folder when it loads: keep them out of the
        # ComfyUI checkout's own input/
        folder_paths.set_input_directory(os.path.join(os.path.dirname(os.path.abspath(models_dir)), "input"))
        server_stub = _ServerStub()
        try:
            import server as comfy_server
        except ImportError:  # a trimmed ComfyUI without the web server's packages (GPU kit)
            comfy_server = None
        if comfy_server is not None and not hasattr(comfy_server.PromptServer, "instance"):
            comfy_server.PromptServer.instance = server_stub  # nodes that message the UI find the stub
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        ok = asyncio.run(nodes.load_custom_node(repo_root))
        if not ok:
            raise RuntimeError(f"ComfyUI could not load the pack from {repo_root}")
        nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
        host = cls()
        host.models_dir = models_dir
        host.repo_root = repo_root
        host.pack_name = repo_root.replace(".", "_x_")
        host.nodes = nodes
        host.execution = execution
        host.server = server_stub
        host.dynamic_vram = dynamic_on
        host.executor = execution.PromptExecutor(host.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        cls.instance = host
        return host

    def pack_module(self, name: str):
        """A module of the pack as ComfyUI imported it (the package named after its path), imported now
        if no node needed it yet."""
        return importlib.import_module(f"{self.pack_name}.{name}")

    def model_path(self, kind: str, filename: str) -> str:
        return os.path.join(self.models_dir, kind, filename)

    def node_output(self, node_id: str, index: int = 0):
        """A node's cached output from the last prompt (the very object ComfyUI passes downstream)."""
        entry = asyncio.run(self.executor.caches.outputs.get(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached output")
        return entry.outputs[index][0]

    def free_models(self):
        """Drop the executor's cached outputs and ComfyUI's loaded models, so that the next prompt's
        model is the only one in memory (tests comparing a large model with ComfyUI's own copy)."""
        import comfy.model_management

        self.executor.reset()
        comfy.model_management.unload_all_models()
        gc.collect()

    def run(self, prompt: dict, expect_error: bool = False):
        """Validate and execute an API-format prompt; returns CAPTURED (latents by capture key)."""
        CAPTURED.clear()
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            if expect_error:
                return {"validation": valid}
            raise AssertionError(f"prompt rejected by ComfyUI's validator: {valid[1]} {valid[3]}")
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
        if expect_error:
            return {"errors": errors, "captured": dict(CAPTURED)}
        if errors or not self.executor.success:
            raise AssertionError(f"prompt failed: {errors}")
        return dict(CAPTURED)


def sample_direct(patcher, *, seed=0, steps=2, size=16, cond_seed=1, control=None, context_dim=64, pooled_dim=64):
    """ComfyUI's sampler (comfy.sample.sample, model management included) called from Python."""
    import comfy.sample

    cond = BnbFluxTestConditioning().make(cond_seed, 8, context_dim, pooled_dim, 3.5,
                                          None if control is None else {"samples": control})[0]
    neg = BnbFluxTestConditioning().make(cond_seed + 1000, 8, context_dim, pooled_dim, 3.5)[0]
    latent = torch.zeros(1, 16, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", cond, neg, latent,
                                   denoise=1.0, seed=seed, disable_pbar=True)
