"""`common.vectors.float_vector` gives the message ``Vector(values=array.tolist())`` gives."""

import numpy as np
import pytest

from common.vectors import float_vector
from marketplace.embedder.v1 import embedder_pb2
from marketplace.indexer.v1 import indexer_pb2


@pytest.mark.parametrize("message_type", [embedder_pb2.Vector, indexer_pb2.Vector])
@pytest.mark.parametrize("size", [0, 1, 3, 31, 32, 33, 1280, 5000])
def test_same_message_as_from_a_list(message_type, size):
    values = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    built = float_vector(message_type, values)
    assert built == message_type(values=values.tolist())
    assert built.SerializeToString() == message_type(values=values.tolist()).SerializeToString()


def test_special_values_kept_bit_for_bit():
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38], dtype=np.float32)
    built = np.asarray(float_vector(indexer_pb2.Vector, values).values, dtype=np.float32)
    assert built.tobytes() == values.tobytes()


def test_float64_and_strided_input_become_float32_like_protobuf_does():
    values = np.random.default_rng(0).standard_normal((4, 9))[:, ::2]  # float64, not contiguous
    for row in values:
        assert float_vector(indexer_pb2.Vector, row) == indexer_pb2.Vector(values=row.tolist())
