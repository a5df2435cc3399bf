"""What the pack reports to the user: errors that name the file and the fix, and names quoted safely."""
from __future__ import annotations

MESSAGE_MAX = 2000  # characters of an error message: names from files can be megabytes long
# ComfyUI names a failed node's exception by module and class (execution.full_type_name); the pack's modules
# are named after the folder ComfyUI loaded it from, so the editor would show a filesystem path as the type
SHOWN_MODULE = "bnb_flux"


class BnbFluxError(ValueError):
    """A problem with the user's input that the node reports as is: it names the file and what to do.

    The message goes to the log, ``/history`` and the websocket: control characters from a file's names
    are spelled out (a newline or an ANSI escape cannot forge a log line) and it is cut to MESSAGE_MAX.
    It and its subclasses are shown as ``bnb_flux.<class>`` (SHOWN_MODULE)."""

    __module__ = SHOWN_MODULE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = SHOWN_MODULE

    def __init__(self, message: str = ""):
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
        if len(text) > MESSAGE_MAX:
            cut = len(text) - MESSAGE_MAX + 200
            text = f"{text[:MESSAGE_MAX - 600]} ... ({cut} characters cut) ... {text[-400:]}"
        super().__init__(text)


NAME_SHOWN = 120  # characters of a name from a file or a link that a message quotes


def has_control_characters(text: str) -> bool:
    """NUL, newlines, escape sequences and the like: never part of a real file or path name."""
    return any(ord(c) < 0x20 or ord(c) == 0x7f for c in text)


def shown_name(text) -> str:
    """A name from a file or a link, quoted and cut for a message or a log line (no raw newlines or escape
    sequences: ``repr`` spells them out)."""
    text = repr(str(text))
    return text if len(text) <= NAME_SHOWN else text[:NAME_SHOWN - 4] + "...'"


class LoraFormatError(BnbFluxError):
    """A LoRA file that cannot be applied to this model; the message names the file and the layer."""
