"""The ComfyUI release this pack is built and tested against: the one place that names it.

pyproject.toml's ``requires-comfyui``, the README and the quick start's host set-up are checked against
these by ``tests/test_packaging.py``. Standard library only and no imports at all: ``quickstart.py`` reads
this file before anything is installed.
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
