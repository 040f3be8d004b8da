"""Default paths of the slice-model workflow (relative to the working directory)."""

#: folder of the per-slice prediction files
DEFAULT_PREDICTIONS = "outputs/inference/predictions"
#: folder searched for the original scans and export metadata
DEFAULT_INFERENCE_DIR = "data/inference"
#: folder of the reconstructed masks (QC overlays in its ``qc/``)
DEFAULT_OUTPUT = "outputs/masks"
