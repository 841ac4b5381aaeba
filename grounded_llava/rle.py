"""Boolean masks <-> COCO run-length encoding (RLE), through pycocotools: the one encoder of the package
(synthetic worlds, detections and answers in JSON, COCO results for evaluation).

JSON form: `{"size": [H, W], "counts": str}` (compressed RLE, counts as an ASCII string so it is
json-serialisable). This is the form COCO result files and `COCO.loadRes` accept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode one mask.

    Args:
        mask: (H, W) bool (or 0/1 integer) array at original image size.
    Returns:
        `{"size": [H, W], "counts": str}`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"mask of dtype {mask.dtype} must hold only 0/1 (or be bool)")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    height, width = (int(v) for v in rle["size"])
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode `{"size": [H, W], "counts": str | bytes | list[int]}` into an (H, W) bool mask.

    `counts` may be compressed (str/bytes, as `mask_to_rle` writes) or uncompressed (a list of run
    lengths, as COCO ground truth stores crowd regions).
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"RLE must be a dict with 'size' and 'counts', got {rle!r:.80}")
    size = [int(v) for v in rle["size"]]
    if len(size) != 2:
        raise ValueError(f"RLE 'size' must be [H, W], got {rle['size']!r}")
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    elif isinstance(counts, str | bytes):
        compressed = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"RLE 'counts' must be str, bytes or a list of ints, got {type(counts).__name__}")
    return mask_utils.decode(compressed).astype(bool)
