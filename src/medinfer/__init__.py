"""medinfer: run trained 3D medical-imaging models on real scans.

Results (label maps, probability and heat maps, detections) are always returned
on the exact voxel grid of the source scan, with world coordinates in RAS+ mm.
"""

from medinfer.errors import MedinferError
from medinfer.volume import Volume

__version__ = "0.1.0"
__all__ = ["MedinferError", "Volume", "__version__"]
