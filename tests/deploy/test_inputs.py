"""What a deployed model takes in: files, bytes and uploads go through one decoder, which accepts image formats only."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnc_ad.deploy.inputs import Upload, check_pixels, decode
from cnc_ad.errors import DataError
from tests.helpers import EPS_FILE, write_image


def test_a_format_not_accepted_is_refused_from_files_bytes_and_uploads(
    tmp_path: Path, ghostscript_calls: list[str]
) -> None:
    path = tmp_path / "x.png"  # PostScript under an image name
    path.write_bytes(EPS_FILE)
    for item, name in ((path, str(path)), (EPS_FILE, "bytes"), (Upload(EPS_FILE, "cam.png"), "cam.png")):
        for max_pixels in (None, 10_000):  # with a pixel limit the header is read first (check_pixels)
            with pytest.raises(DataError) as err:
                decode(item, target=32, max_pixels=max_pixels)
            message = str(err.value)
            assert "\n" not in message and name in message and "in EPS format, which is not accepted" in message
        check_pixels(item, 1)  # not an accepted image: left to the decoder to name
    assert ghostscript_calls == []


def test_accepted_files_and_bytes_decode_alike(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", (20, 12))
    from_file, from_bytes = decode(path), decode(path.read_bytes())
    assert from_file.size == from_bytes.size == (12, 20)
    assert from_file.image.tobytes() == from_bytes.image.tobytes()
