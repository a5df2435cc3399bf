"""Where the pack's nodes sit in ComfyUI's node library: beside core's own nodes of the same kind, so a
user browsing for a model loader or a model saver finds them there."""

# core's UNETLoader, CheckpointLoaderSimple, LoraLoader and LoraLoaderModelOnly are in "model/loaders"
LOADERS = "model/loaders/bnb flux"
# core's ModelSave ("Save Model") and CheckpointSave ("Save Checkpoint") are in "model/merging"
SAVERS = "model/merging"
