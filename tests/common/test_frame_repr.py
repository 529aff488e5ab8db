"""The bridge's replacement for hyperframe's DATA frame text gives the same text, reading only
the first bytes (h2 builds that text for every frame it receives, logged or not)."""

from __future__ import annotations

import hyperframe.frame
import pytest

from common.grpc_bridge import _HYPERFRAME_DATA_REPR, _cheap_data_repr


@pytest.mark.parametrize(
    "data", [None, b"", b"\x00", b"0123456789", b"0123456789a", bytes(range(256)) * 64]
)
def test_same_text_as_hyperframe(data: bytes | None) -> None:
    assert _HYPERFRAME_DATA_REPR is not _cheap_data_repr
    assert _cheap_data_repr(data) == _HYPERFRAME_DATA_REPR(data)


def test_a_data_frame_still_shows_its_first_bytes() -> None:
    frame = hyperframe.frame.DataFrame(1, data=b"hello, world" * 2000)
    hyperframe.frame._raw_data_repr, saved = _cheap_data_repr, hyperframe.frame._raw_data_repr
    try:
        assert repr(frame) == "DataFrame(stream_id=1, flags=[]): <hex:68656c6c6f2c20776f72...>"
    finally:
        hyperframe.frame._raw_data_repr = saved
