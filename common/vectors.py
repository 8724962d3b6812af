"""Float vectors into protobuf messages without a Python float per component.

Each contract's ``Vector`` is ``repeated float values = 1``. Building one from ``array.tolist()``
appends every component as a Python float (about 75 us for a 1280-d embedding); parsing the
message's wire form, the tag, the length and the float32 bytes, costs one copy (a few us) and
gives the same message, bit for bit (NaN payloads and -0.0 included).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

_PACKED_FIELD_1 = b"\x0a"  # field 1, wire type 2 (length-delimited): a packed repeated float


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def float_vector(message_type: type[M], values: np.ndarray) -> M:
    """A ``message_type`` (whose field 1 is ``repeated float``) holding ``values`` as float32."""
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return message_type.FromString(_PACKED_FIELD_1 + _varint(len(data)) + data)
