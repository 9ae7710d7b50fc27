"""DICOM display pipeline (engine.data.image.read_dicom): modality LUT then the first VOI transform, on small CR/DX
files built here with pydicom, against expected images computed by hand from the standard's formulas."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from engine.data import load_dataset
from engine.data.image import read_dicom

PIXELS = np.array([[0, 95, 100, 101], [150, 227, 300, 355], [356, 400, 1000, 4095]], dtype=np.uint16)  # 12-bit
CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"


def _dataset(pixels: np.ndarray, sop_class: str, modality: str, photometric: str = "MONOCHROME2") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _voi_lut(first_mapped: int, bits: int, entries: list[int]) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries), first_mapped, bits])  # LUT Descriptor
    item.add_new(0x00283006, "US", entries)  # LUT Data
    return item


def _write(ds: Dataset, path) -> str:
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_cr_with_an_8_bit_voi_lut_sequence(tmp_path):
    """LUT of 256 entries from stored value 100, entry i = min(255, 2 i): below 100 -> entry 0, above 355 -> last."""
    ds = _dataset(PIXELS, CR, "CR")
    ds.VOILUTSequence = [_voi_lut(100, 8, [min(255, 2 * i) for i in range(256)])]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096  # present too: the VOI LUT Sequence takes precedence
    expected = np.array([[0, 0, 0, 2], [100, 254, 255, 255], [255, 255, 255, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(read_dicom(_write(ds, tmp_path / "cr.dcm")), expected)


def test_the_first_of_two_voi_luts_with_a_16_bit_descriptor(tmp_path):
    """16-bit entries scale by 65535: entry i of the first LUT is 257 * i (-> i in 8 bits); the second LUT is not
    used. A rescale (slope 1, intercept 0, common in CR) goes through the modality LUT first."""
    ds = _dataset(PIXELS, CR, "CR")
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    first = _voi_lut(0, 16, [257 * i for i in range(256)])
    second = _voi_lut(0, 16, [65535 - 257 * i for i in range(256)])
    ds.VOILUTSequence = [first, second]
    expected = np.minimum(PIXELS, 255).astype(np.uint8)  # values past the last entry take the last entry
    np.testing.assert_array_equal(read_dicom(_write(ds, tmp_path / "cr16.dcm")), expected)


def test_an_8_bit_voi_lut_of_4096_entries(tmp_path):
    """The usual CR LUT (one entry per 12-bit value, 8-bit entries): entry i = i // 16."""
    ds = _dataset(PIXELS, CR, "CR")
    ds.VOILUTSequence = [_voi_lut(0, 8, [i // 16 for i in range(4096)])]
    np.testing.assert_array_equal(read_dicom(_write(ds, tmp_path / "cr4096.dcm")), (PIXELS // 16).astype(np.uint8))


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) to [0, 1], then 8 bits."""
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, (x - (center - 0.5)) / (width - 1) + 0.5)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 1.0, y)
    return np.rint(y * 255).astype(np.uint8)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dx_with_two_windows_uses_the_first_after_the_rescale(tmp_path, photometric):
    """Stored values through the rescale (2 p - 100), then the first window (centre 600, width 401), not the second."""
    ds = _dataset(PIXELS, DX, "DX", photometric)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = [600, 3000], [401, 2000]
    modality = 2.0 * PIXELS - 100
    expected = _linear_window(modality, 600, 401)
    # by hand: 2*227-100 = 354 -> below the window (<= 399.5) -> 0; 2*300-100 = 500 -> (500-599.5)/400+0.5 = 0.25125
    assert expected[1, 1] == 0 and expected[1, 2] == 64 and expected[2, 2] == 255
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    got = read_dicom(_write(ds, tmp_path / "dx.dcm"))
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, _linear_window(modality, 3000, 2000))


def test_no_voi_transform_is_min_max_and_a_refused_window_warns(tmp_path):
    ds = _dataset(PIXELS, DX, "DX")
    expected = np.rint(PIXELS / 4095 * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_dicom(_write(ds, tmp_path / "plain.dcm")), expected)
    ds.WindowCenter, ds.WindowWidth = 600, 0  # LINEAR needs width >= 1
    with pytest.warns(UserWarning, match="Window Width"):
        got = read_dicom(_write(ds, tmp_path / "bad.dcm"))
    np.testing.assert_array_equal(got, expected)


def test_a_dicom_folder_loads_through_the_pipeline(tmp_path):
    for cls in ("normal", "finding"):
        (tmp_path / cls).mkdir()
        ds = _dataset(PIXELS, CR, "CR")
        ds.VOILUTSequence = [_voi_lut(100, 8, [min(255, 2 * i) for i in range(256)])]
        _write(ds, tmp_path / cls / "a.dcm")
    data = load_dataset(f"dicom:{tmp_path}")
    image, _ = data[0]
    assert data.classes == ["finding", "normal"] and image.shape == (1, *PIXELS.shape)
    np.testing.assert_allclose(image[0].numpy() * 255, read_dicom(tmp_path / "normal" / "a.dcm"), atol=1e-4)
