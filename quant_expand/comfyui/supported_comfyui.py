"""The ComfyUI release this pack is built and tested against: the one place that names it.

pyproject.toml's ``requires-comfyui``, the README and the quick start's host set-up are checked against
these by ``tests/test_packaging.py``. Standard library only: ``quickstart.py`` reads this file before anything
is installed, and the pack's start-up reads it without parsing TOML (no ``tomllib`` on Python 3.10).
"""

# Oldest release the pack runs on, and the one its tests run against.
COMFYUI_VERSION = "0.33.0"

# Where the quick start clones that release from when no host is given (git tag ``v<version>``).
COMFYUI_REPOSITORY = "https://github.com/comfyanonymous/ComfyUI.git"

# ComfyUI source archives the quick start accepts (``COMFYUI_ARCHIVE``): sha256 -> the version inside.
# An archive with another digest is refused: it would be unpacked and its code run.
COMFYUI_ARCHIVES = {
    "ba500f452ff903abbc368ca9ee767d695769bc4050ba170c841a711015174310": "0.33.0",
}


def installed_version(comfyui_root: str):
    """The ``__version__`` in ``comfyui_root/comfyui_version.py`` (read as text, never run), or None."""
    import os
    import re

    try:
        with open(os.path.join(comfyui_root, "comfyui_version.py"), encoding="utf-8") as f:
            found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.M)
    except OSError:
        return None
    return found.group(1) if found else None


def host_problem(comfyui_root: str):
    """What to tell the user when the ComfyUI at ``comfyui_root`` is older than the pack needs, or None."""
    found = installed_version(comfyui_root)
    if found is None or version_tuple(found) >= version_tuple(COMFYUI_VERSION):
        return None
    return (f"comfyui-bnb-flux needs ComfyUI {COMFYUI_VERSION} or newer, and this is ComfyUI {found}: update "
            f"ComfyUI (git pull and pip install -r requirements.txt, or ComfyUI-Manager's Update ComfyUI), then "
            f"restart it; until then the BnB Flux nodes do not run")


def version_tuple(version: str) -> tuple:
    """``"0.33.0"`` -> ``(0, 33, 0)``; a suffix after the numbers (``0.34.0rc1``) is ignored."""
    parts = []
    for piece in version.strip().split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break
    return tuple(parts)
