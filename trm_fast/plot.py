"""Line plots written as PNG with nothing but the standard library (no matplotlib needed)."""
from __future__ import annotations

import struct
import zlib
from typing import Dict, List, Sequence, Tuple

# 3x5 digit glyphs for the axis labels, rows top to bottom, 3 bits per row.
GLYPHS = {"0": "75557", "1": "26227", "2": "71747", "3": "71717", "4": "55711", "5": "74717", "6": "74757",
          "7": "71111", "8": "75757", "9": "75717", ".": "00002", "-": "00700", "k": "45654"}
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _png(pixels: List[bytearray], width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _label(value: float) -> str:
    """An axis label in the glyphs there are (no exponent: 2790 -> 2.8k, 11000 -> 11k)."""
    if abs(value) >= 10000:
        return f"{value / 1000:.0f}k"
    return f"{value / 1000:.2g}k" if abs(value) >= 1000 else f"{value:.3g}"


def line_plot(path: str, series: Dict[str, Sequence[Tuple[float, float]]], width: int = 640,
              height: int = 400) -> None:
    """Each series (a list of (x, y) points) as a line on shared axes with tick labels; the colours follow
    COLORS in series order (blue, red, green, ...), shown as a key at the top right."""
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("nothing to plot: every series is empty")
    pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    left, right, top, bottom = 48, width - 12, 12, height - 24
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def put(px: int, py: int, color) -> None:
        if 0 <= px < width and 0 <= py < height:
            pixels[py][3 * px: 3 * px + 3] = bytes(color)

    def to_screen(x: float, y: float) -> Tuple[int, int]:
        return (round(left + (x - x0) / (x1 - x0) * (right - left)),
                round(bottom - (y - y0) / (y1 - y0) * (bottom - top)))

    def text(px: int, py: int, string: str) -> None:
        for i, char in enumerate(string):
            for row, bits in enumerate(GLYPHS.get(char, "00000")):
                for col in range(3):
                    if int(bits) >> (2 - col) & 1:
                        for dx in range(2):
                            for dy in range(2):
                                put(px + 8 * i + 2 * col + dx, py + 2 * row + dy, (0, 0, 0))

    for k in range(5):  # grid and tick labels
        fx = k / 4
        gx, gy = round(left + fx * (right - left)), round(bottom - fx * (bottom - top))
        for py in range(top, bottom + 1):
            put(gx, py, (225, 225, 225))
        for px in range(left, right + 1):
            put(px, gy, (225, 225, 225))
        label = _label(x0 + fx * (x1 - x0))
        text(min(gx - 8, width - 8 * len(label)), bottom + 8, label)
        text(2, gy - 5, _label(y0 + fx * (y1 - y0)))
    for index, values in enumerate(series.values()):
        color = COLORS[index % len(COLORS)]
        screen = [to_screen(x, y) for x, y in sorted(values)]
        for (ax, ay), (bx, by) in zip(screen, screen[1:] or screen):
            steps = max(abs(bx - ax), abs(by - ay), 1)
            for s in range(steps + 1):
                px, py = round(ax + (bx - ax) * s / steps), round(ay + (by - ay) * s / steps)
                for d in (-1, 0, 1):
                    put(px, py + d, color)
        for dx in range(16):  # colour key, top right
            for dy in range(4):
                put(right - 20 + dx, top + 4 + 8 * index + dy, color)
    with open(path, "wb") as f:
        f.write(_png(pixels, width, height))
