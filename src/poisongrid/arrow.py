"""Arrow columns as numpy arrays without pandas (pyarrow's general conversion imports it, which
the light stages avoid)."""
from __future__ import annotations

import numpy as np


def to_numpy(col) -> np.ndarray:
    """An Arrow column (Array or ChunkedArray) as a numpy array; a pandas Series works too."""
    import pyarrow as pa

    if not isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_numpy()
    a = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if a.null_count == 0 and pa.types.is_boolean(a.type):
        bits = np.frombuffer(a.buffers()[1], np.uint8) if len(a) else np.zeros(0, np.uint8)
        return np.unpackbits(bits, count=a.offset + len(a), bitorder="little")[a.offset:].astype(bool)
    if a.null_count == 0 and (pa.types.is_integer(a.type) or pa.types.is_floating(a.type)):
        return np.from_dlpack(a).copy()  # writable, as the general path gives
    return a.to_numpy(zero_copy_only=False)
