import io

import numpy as np
from PIL import Image

from cxrbase import write_png


def _pil_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def test_bytes_equal_pil_with_the_generate_settings(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(24, 32), dtype=np.uint8)
    path = write_png(tmp_path / "a" / "b" / "img.png", arr)  # parents created
    assert path.read_bytes() == _pil_bytes(arr)
    back = np.asarray(Image.open(path))
    assert back.dtype == np.uint8 and back.shape == (24, 32)
    np.testing.assert_array_equal(back, arr)


def test_atomic_write_leaves_no_tmp_and_same_bytes(tmp_path):
    arr = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).astype(np.uint8)
    target = tmp_path / "out" / "m.png"
    write_png(target, np.zeros((8, 8), np.uint8), atomic=True)
    write_png(target, arr, atomic=True)  # replaces the existing file
    assert target.read_bytes() == _pil_bytes(arr)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.png"]
