"""The committed generated code must be exactly what the .proto files produce."""

from __future__ import annotations


from scripts.gen_protos import REPO, generate


def test_generated_code_matches_protos(tmp_path):
    generated = generate(tmp_path)
    assert generated, "no proto files found"
    stale = [
        str(path.relative_to(tmp_path))
        for path in generated
        if (REPO / path.relative_to(tmp_path)).read_bytes() != path.read_bytes()
    ]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"
