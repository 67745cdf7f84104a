"""Text in images, read with Tesseract through pytesseract."""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

Ocr = Callable[[bytes], str]

INSTALL_HINT = (
    "Text spotting needs the Tesseract OCR engine and its Python wrapper:\n"
    "    apt-get install tesseract-ocr      (Debian/Ubuntu; brew install tesseract on macOS)\n"
    "    python -m pip install pytesseract"
)


class TesseractMissing(RuntimeError):
    """pytesseract or the tesseract binary is not installed."""


class UnreadableImage(ValueError):
    """The image bytes cannot be decoded, or Tesseract rejects the decoded image."""


def check_tesseract() -> None:
    try:
        import pytesseract
    except ImportError:
        raise TesseractMissing(f"pytesseract is not installed.\n{INSTALL_HINT}") from None
    try:
        pytesseract.get_tesseract_version()
    except pytesseract.TesseractNotFoundError:
        raise TesseractMissing(f"the tesseract binary is not on PATH.\n{INSTALL_HINT}") from None


def tesseract_ocr(image_bytes: bytes) -> str:
    """All text Tesseract reads in the image (grayscale: colour adds nothing to its binarisation)."""
    import pytesseract

    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            gray = img.convert("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises on bad data
        raise UnreadableImage(str(err)) from err
    try:
        return pytesseract.image_to_string(gray)
    except pytesseract.TesseractError as err:
        raise UnreadableImage(str(err)) from err
