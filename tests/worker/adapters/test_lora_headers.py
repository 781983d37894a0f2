"""A LoRA file is untrusted data: its header and saved adapter config are read, never run. Made the way
diffusers saves a peft LoRA (random weights, no model needed), with the config a hostile or an honest
trainer would write."""

from __future__ import annotations

import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxfarm.shared.errors import JobInputError
from fluxfarm.worker.adapters.lora_files import HEADER_MAX_BYTES, read_lora
from tests.adapter_files import write_lora_with_config


@pytest.mark.timeout(60)  # compiled as a regex, this pattern takes years per module name
def test_a_pattern_that_is_a_regular_expression_fails_at_once(tmp_path: Path) -> None:
    path = write_lora_with_config(tmp_path, {"rank_pattern": {"(.|.|.)*#": 8}})
    with pytest.raises(JobInputError, match="not a module name"):
        read_lora(path, "s3://loras/hostile.safetensors")


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"alpha_pattern": {"to_q": "eight"}}, "not a positive number"),
        ({"alpha_pattern": {"to_q": -1}}, "not a positive number"),
        ({"rank_pattern": ["to_q"]}, "not a mapping"),
        ({"rank_pattern": {f"block{i}": 4 for i in range(5000)}}, "not a mapping of at most"),
    ],
)
def test_bad_patterns_fail_with_the_reason(tmp_path: Path, config: dict[str, Any], reason: str) -> None:
    with pytest.raises(JobInputError, match=reason):
        read_lora(write_lora_with_config(tmp_path, config), "lora")


def test_patterns_match_module_names_that_end_with_them_at_a_dot(tmp_path: Path) -> None:
    """peft's meaning: `to_q` is every module named to_q, `0.attn.add_q_proj` that one module; `q_proj`
    is not `add_q_proj` (no dot before it)."""
    config = {"alpha_pattern": {"to_q": 2, "0.attn.add_q_proj": 1, "q_proj": 100}, "rank_pattern": {"proj_out": 8}}
    scales = {
        name: update.scale for name, update in read_lora(write_lora_with_config(tmp_path, config), "lora").items()
    }
    assert scales == {
        "transformer.transformer_blocks.0.attn.to_q": 2 / 4,
        "transformer.transformer_blocks.0.attn.add_q_proj": 1 / 4,
        "transformer.single_transformer_blocks.0.proj_out": 8 / 8,
    }


def test_a_header_larger_than_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", HEADER_MAX_BYTES + 1) + b"{" * 64)
    with pytest.raises(JobInputError, match="header claims"):
        read_lora(path, "lora")


CONFIG_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=40), inner, max_size=6),
    max_leaves=20,
)
HOSTILE_PATTERNS = st.sampled_from(["(.|.|.)*#", "(a+)+$", "^.*$", "..", "", "a" * 300, "x.", ".x", "to_q"])


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "r": CONFIG_VALUES,
            "lora_alpha": CONFIG_VALUES,
            "rank_pattern": st.dictionaries(st.text(max_size=60) | HOSTILE_PATTERNS, CONFIG_VALUES, max_size=5)
            | CONFIG_VALUES,
            "alpha_pattern": st.dictionaries(st.text(max_size=60) | HOSTILE_PATTERNS, CONFIG_VALUES, max_size=5)
            | CONFIG_VALUES,
            "use_dora": CONFIG_VALUES,
        },
    )
)
def test_any_adapter_config_in_a_lora_header_is_read_or_refused_in_bounded_time(
    tmp_path_factory: pytest.TempPathFactory, config: dict[str, Any]
) -> None:
    """A LoRA's saved config is untrusted: any JSON there gives updates with finite positive scales or a
    JobInputError with a reason, within the deadline (5 s; a compiled hostile pattern took minutes)."""
    out = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        path = write_lora_with_config(out, config)
    except (TypeError, ValueError):  # diffusers' writer refuses it: nothing a trainer could ship
        return
    try:
        updates = read_lora(path, "lora")
    except JobInputError as error:
        assert str(error)
        return
    assert all(math.isfinite(update.scale) and update.scale > 0 for update in updates.values())


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_any_safetensors_header_is_read_or_refused(
    tmp_path_factory: pytest.TempPathFactory, header: bytes, claimed: int
) -> None:
    """The first 8 bytes claim the header's length; neither they nor the header are trusted."""
    out = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    path = out / "lora.safetensors"
    path.write_bytes(struct.pack("<Q", claimed) + header)
    with pytest.raises(JobInputError):
        read_lora(path, "lora")
