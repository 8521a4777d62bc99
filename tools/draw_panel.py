"""Draw the Slicer module's panel from its Qt Designer file, for the README, and the Extensions
Index screenshot: that panel beside the demo's result.

    .venv/bin/python tools/draw_panel.py

Reads LiverTumorDARN/Resources/UI/LiverTumorDARN.ui and lays it out the way Qt would, simplified:
collapsible sections one under the other, form rows as label | field (or one field across both
columns), and each widget in its state from the .ui file (a disabled one greyed), in the colours of
Slicer's light theme. The 3D Slicer application cannot run on the development machine, so this is a
drawing of the .ui file, not a screenshot: it shows which controls there are, in which order, with
which texts. Re-run it after every change of the .ui file (Resources/panel.png) or of the demo's
picture (Resources/Screenshot.png); layout tests check that both are current. Pillow (from highdicom) and matplotlib's
DejaVu font (matplotlib comes with vtk) are in the environment already: nothing new to install.
"""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "LiverTumorDARN" / "Resources" / "UI" / "LiverTumorDARN.ui"
SCENE_LOGIC = ROOT / "LiverTumorDARN" / "LiverTumorDARNSceneLib" / "scene.py"
OUTPUT = ROOT / "Resources" / "panel.png"
DEMO_PICTURE = ROOT / "Resources" / "demo.png"
SCREENSHOT = ROOT / "Resources" / "Screenshot.png"

WIDTH = 440  # a module panel's usual width in Slicer, in pixels
SCALE = 2  # drawn at twice the size, then shrunk: smooth edges
MARGIN, SPACING, FIELD_HEIGHT, HEADER_HEIGHT, TABLE_ROWS = 8, 6, 24, 26, 3
FONT_SIZE = 12

BACKGROUND = (246, 246, 246)
FIELD = (255, 255, 255)
BUTTON = (232, 232, 232)
HEADER = (225, 225, 225)
BORDER = (170, 170, 170)
TEXT = (30, 30, 30)
DISABLED_TEXT = (160, 160, 160)
DISABLED_FIELD = (238, 238, 238)
PROGRESS_TEXT = "0%"


class Painter:
    """Draws on a canvas in panel pixels, or only measures (``canvas`` None): the layout runs twice,
    once to find the panel's height, once to draw."""

    def __init__(self, canvas: Image.Image | None):
        self.draw = ImageDraw.Draw(canvas) if canvas else None
        self.fonts = {bold: ImageFont.truetype(font_manager.findfont("DejaVu Sans" + (":bold" if bold else "")),
                                               FONT_SIZE * SCALE) for bold in (False, True)}

    def text_width(self, text: str, bold: bool = False) -> int:
        return round(self.fonts[bold].getlength(text) / SCALE)

    def box(self, x, y, w, h, fill, outline=BORDER, radius=3) -> None:
        if self.draw:
            self.draw.rounded_rectangle([x * SCALE, y * SCALE, (x + w) * SCALE, (y + h) * SCALE], radius * SCALE,
                                        fill=fill, outline=outline, width=SCALE)

    def text(self, x, y, text: str, color=TEXT, bold=False, anchor="lm") -> None:
        if self.draw:
            self.draw.text((x * SCALE, y * SCALE), text, fill=color, font=self.fonts[bold], anchor=anchor)

    def triangle(self, x, y, size, color=TEXT, down=True) -> None:
        """A small arrow: pointing down (a combo box, an open section) or up."""
        if self.draw:
            tip = y + size / 2 if down else y - size / 2
            base = y - size / 2 if down else y + size / 2
            points = [(x - size, base), (x + size, base), (x, tip)]
            self.draw.polygon([(px * SCALE, py * SCALE) for px, py in points], fill=color)


# ------------------------------------------------------------------------------ reading the .ui file


def prop(element, name: str, default=None):
    """A widget's property from the .ui file: str, bool or int; ``default`` when it is not set."""
    found = element.find(f"property[@name='{name}']")
    if found is None or len(found) == 0:
        return default
    value = found[0]
    if value.tag == "bool":
        return value.text == "true"
    if value.tag == "number":
        return int(value.text)
    if value.tag == "stringlist":
        return [item.text or "" for item in value]
    return value.text or ""


def combo_items(element) -> list[str]:
    return [prop(item, "text", "") for item in element.findall("item")]


def result_columns() -> list[str]:
    """The results table's column names, read from the scene logic's source (no slicer import)."""
    for node in ast.parse(SCENE_LOGIC.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "RESULT_COLUMNS" for t in node.targets):
            return [name for name, _kind in ast.literal_eval(node.value)]
    raise ValueError(f"no RESULT_COLUMNS in {SCENE_LOGIC}")


# ------------------------------------------------------------------------------ layouts


def lay_out(painter: Painter, layout, x: int, y: int, width: int) -> int:
    """Draw a layout element's items from (x, y) across ``width``; returns the height used."""
    if layout.get("class") == "QFormLayout":
        return lay_out_form(painter, layout, x, y, width)
    top = y
    for item in layout.findall("item"):
        child = item.find("widget")
        if child is not None and is_shown(child):
            y += draw_widget(painter, child, x, y, width) + SPACING
    return max(0, y - top - SPACING)


def lay_out_form(painter: Painter, layout, x: int, y: int, width: int) -> int:
    """Rows of label | field; an item spanning both columns takes the whole row."""
    rows: dict[int, dict[int, ElementTree.Element]] = {}
    for item in layout.findall("item"):
        child = item.find("widget")
        if child is not None and is_shown(child):
            rows.setdefault(int(item.get("row")), {})[int(item.get("column"))] = child
    labels = [cells[0] for cells in rows.values() if 0 in cells and 1 in cells]
    label_width = max((painter.text_width(prop(label, "text", "")) for label in labels), default=0) + 10
    top = y
    for _row, cells in sorted(rows.items()):
        if 1 in cells:
            height = draw_widget(painter, cells[1], x + label_width, y, width - label_width)
            if 0 in cells:
                draw_widget(painter, cells[0], x, y, label_width, height)
        else:
            height = draw_widget(painter, cells[0], x, y, width)
        y += height + SPACING
    return y - top - SPACING


def is_shown(widget) -> bool:
    """Qt draws an empty label as nothing."""
    return not (widget.get("class") == "QLabel" and not prop(widget, "text", ""))


# ------------------------------------------------------------------------------ widgets


def draw_widget(painter: Painter, widget, x: int, y: int, width: int, row_height: int = FIELD_HEIGHT) -> int:
    """Draw one widget of the .ui file; returns its height."""
    return WIDGETS[widget.get("class")](painter, widget, x, y, width, row_height)


def collapsible_section(painter, widget, x, y, width, _row_height) -> int:
    painter.box(x, y, width, HEADER_HEIGHT, HEADER)
    painter.triangle(x + 12, y + HEADER_HEIGHT / 2, 4)
    painter.text(x + 22, y + HEADER_HEIGHT / 2, prop(widget, "text", ""), bold=True)
    content = lay_out(painter, widget.find("layout"), x + MARGIN, y + HEADER_HEIGHT + MARGIN, width - 2 * MARGIN)
    return HEADER_HEIGHT + content + 2 * MARGIN


def label(painter, widget, x, y, width, row_height) -> int:
    lines = wrap(painter, prop(widget, "text", ""), width) if prop(widget, "wordWrap", False) else [prop(widget, "text")]
    height = max(row_height, 16 * len(lines)) if len(lines) > 1 else row_height
    for n, line in enumerate(lines):
        painter.text(x, y + (height / 2 if len(lines) == 1 else 8 + 16 * n), line, enabled_color(widget))
    return height


def node_combo_box(painter, widget, x, y, width, _row_height) -> int:
    shown = prop(widget, "noneDisplay", "None") if prop(widget, "noneEnabled", False) else "None"
    return field_with_arrow(painter, widget, x, y, width, shown)


def combo_box(painter, widget, x, y, width, _row_height) -> int:
    return field_with_arrow(painter, widget, x, y, width, (combo_items(widget) or [""])[0])


def field_with_arrow(painter, widget, x, y, width, text: str) -> int:
    painter.box(x, y, width, FIELD_HEIGHT, field_color(widget))
    painter.text(x + 6, y + FIELD_HEIGHT / 2, text, enabled_color(widget))
    painter.triangle(x + width - 12, y + FIELD_HEIGHT / 2, 4, enabled_color(widget))
    return FIELD_HEIGHT


def path_line_edit(painter, widget, x, y, width, _row_height) -> int:
    painter.box(x, y, width - 30, FIELD_HEIGHT, field_color(widget))
    painter.box(x + width - 26, y, 26, FIELD_HEIGHT, BUTTON)
    painter.text(x + width - 13, y + FIELD_HEIGHT / 2, "...", enabled_color(widget), anchor="mm")
    return FIELD_HEIGHT


def push_button(painter, widget, x, y, width, _row_height) -> int:
    height = FIELD_HEIGHT + 4
    painter.box(x, y, width, height, BUTTON, radius=4)
    painter.text(x + width / 2, y + height / 2, prop(widget, "text", ""), enabled_color(widget), anchor="mm")
    return height


def check_box(painter, widget, x, y, _width, row_height) -> int:
    painter.box(x + 1, y + row_height / 2 - 7, 14, 14, field_color(widget), radius=2)
    painter.text(x + 22, y + row_height / 2, prop(widget, "text", ""), enabled_color(widget))
    return row_height


def spin_box(painter, widget, x, y, width, _row_height) -> int:
    painter.box(x, y, width, FIELD_HEIGHT, field_color(widget))
    painter.text(x + 6, y + FIELD_HEIGHT / 2, str(prop(widget, "value", 0)), enabled_color(widget))
    painter.triangle(x + width - 12, y + FIELD_HEIGHT / 2 - 5, 3, down=False)
    painter.triangle(x + width - 12, y + FIELD_HEIGHT / 2 + 5, 3)
    return FIELD_HEIGHT


def progress_bar(painter, widget, x, y, width, _row_height) -> int:
    painter.box(x, y, width, 18, FIELD)
    painter.text(x + width / 2, y + 9, PROGRESS_TEXT, anchor="mm")
    return 18


def table_view(painter, widget, x, y, width, _row_height) -> int:
    """The results table: its header (the scene logic's column names, as many as fit) and empty rows."""
    row = 22
    painter.box(x, y, width, row * (TABLE_ROWS + 1), FIELD, radius=0)
    painter.box(x, y, width, row, HEADER, radius=0)
    column_x = x
    for name in result_columns():
        column_width = painter.text_width(name) + 12
        if column_x + column_width > x + width:
            break
        painter.text(column_x + 6, y + row / 2, name)
        painter.box(column_x + column_width, y, 0, row * (TABLE_ROWS + 1), None, radius=0)
        column_x += column_width
    for n in range(1, TABLE_ROWS + 1):
        painter.box(x, y + row * n, width, 0, None, outline=(215, 215, 215), radius=0)
    return row * (TABLE_ROWS + 1)


WIDGETS = {
    "ctkCollapsibleButton": collapsible_section,
    "QLabel": label,
    "qMRMLNodeComboBox": node_combo_box,
    "QComboBox": combo_box,
    "ctkPathLineEdit": path_line_edit,
    "QPushButton": push_button,
    "QCheckBox": check_box,
    "QSpinBox": spin_box,
    "QProgressBar": progress_bar,
    "qMRMLTableView": table_view,
}


def enabled_color(widget) -> tuple[int, int, int]:
    return TEXT if prop(widget, "enabled", True) else DISABLED_TEXT


def field_color(widget) -> tuple[int, int, int]:
    return FIELD if prop(widget, "enabled", True) else DISABLED_FIELD


def wrap(painter: Painter, text: str, width: int) -> list[str]:
    """Words of ``text`` in lines no wider than ``width``."""
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and painter.text_width(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


# ------------------------------------------------------------------------------ the picture


def draw_panel(ui_file: Path = UI_FILE) -> Image.Image:
    """The panel of ``ui_file``, WIDTH pixels wide."""
    top_layout = ElementTree.parse(ui_file).getroot().find("widget/layout")
    height = lay_out(Painter(None), top_layout, MARGIN, MARGIN, WIDTH - 2 * MARGIN) + 2 * MARGIN
    canvas = Image.new("RGB", (WIDTH * SCALE, height * SCALE), BACKGROUND)
    lay_out(Painter(canvas), top_layout, MARGIN, MARGIN, WIDTH - 2 * MARGIN)
    return canvas.resize((WIDTH, height), Image.LANCZOS)


def screenshot(panel: Image.Image, result: Image.Image) -> Image.Image:
    """The panel with the demo's result (truth left, segmentation right) to its right, scaled to
    the panel's height, as the module looks beside the slice view. A composite of two drawings,
    not a capture of the application, which cannot run on the development machine."""
    result = result.convert("RGB").resize((round(result.width * panel.height / result.height), panel.height), Image.LANCZOS)
    canvas = Image.new("RGB", (panel.width + result.width, panel.height), BACKGROUND)
    canvas.paste(panel.convert("RGB"), (0, 0))
    canvas.paste(result, (panel.width, 0))
    return canvas


if __name__ == "__main__":
    panel = draw_panel()
    panel.save(OUTPUT)
    with Image.open(DEMO_PICTURE) as result:
        screenshot(panel, result).save(SCREENSHOT)
    print(f"wrote {OUTPUT} and {SCREENSHOT}")
