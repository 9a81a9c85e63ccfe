"""The model card (README.md) of a compiled model, in Hugging Face's conventions.

YAML front matter (``base_model``, ``base_model_relation: quantized``, tags ``exl2`` and ``quantized``)
then a table of what the conversion did and how to load the result with exllamav2. A README the source
ships is never lost: its front matter keys we do not set are carried over, its text follows ours under
"Original model card", and the file itself is kept verbatim beside as ``README.source.md``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from exl2core import __version__
from exl2core.pipeline.calibration import describe_dataset
from exl2core.pipeline.job import Settings, atomic_write

CARD_FILE = "README.md"
SOURCE_CARD_FILE = "README.source.md"
REPORT_IMAGE = "exl2_report.png"
OUR_KEYS = ("base_model", "base_model_relation", "tags")
OUR_TAGS = ("exl2", "quantized", "exl2core")


@dataclass(frozen=True)
class CardFacts:
    """What the card states about one conversion."""

    base_model: str
    target_bpw: float
    achieved_bpw: float
    head_bits: int
    calibration_data: str
    rows: int
    length: int
    measurement: str
    calibration_perplexity: float | None
    has_report_image: bool


def base_model_name(source_dir: Path, config: dict) -> str:
    """The source's hub id when its config.json records one (``org/name``), else its directory name."""
    name = str(config.get("_name_or_path") or "")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    return source_dir.name


def card_facts(settings: Settings, state: dict, has_report_image: bool = True) -> CardFacts:
    """The card's facts from a finished job's settings and state."""
    source = Path(settings.in_dir)
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if settings.measurement:
        measurement = f"reused from {Path(settings.measurement).name}"
    else:
        measurement = f"{settings.measurement_rows} × {settings.measurement_length} tokens"
    return CardFacts(
        base_model=base_model_name(source, config), target_bpw=float(settings.bits),
        achieved_bpw=float((state.get("optimization") or {}).get("bpw", float("nan"))),
        head_bits=int(settings.head_bits), calibration_data=describe_dataset(settings.cal_dataset),
        rows=settings.rows, length=settings.length, measurement=measurement,
        calibration_perplexity=state.get("calibration_perplexity"), has_report_image=has_report_image)


def split_front_matter(text: str) -> tuple[list[str], str]:
    """The YAML front matter lines (without the ``---`` fences) and the rest of a markdown file."""
    lines = text.splitlines(keepends=True)
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                return [line.rstrip("\n") for line in lines[1:i]], "".join(lines[i + 1:])
    return [], text


def front_matter_blocks(lines: list[str]) -> dict[str, list[str]]:
    """Top-level YAML keys with their raw lines (the key line and its indented or list continuation)."""
    blocks: dict[str, list[str]] = {}
    key = None
    for line in lines:
        match = re.match(r"^([A-Za-z_][\w.-]*)\s*:", line)
        if match:
            key = match.group(1)
            blocks[key] = [line]
        elif key is not None:
            blocks[key].append(line)
    return blocks


def block_list_items(block: list[str]) -> list[str]:
    """The items of a YAML list block (``- x`` lines or an inline ``[a, b]``)."""
    inline = re.match(r"^[^:]+:\s*\[(.*)\]\s*$", block[0])
    if inline:
        return [item.strip().strip("'\"") for item in inline.group(1).split(",") if item.strip()]
    return [m.group(1).strip().strip("'\"") for line in block[1:] if (m := re.match(r"^\s*-\s*(.+)$", line))]


def render_card(facts: CardFacts, source_card: str | None) -> str:
    source_lines, source_body = split_front_matter(source_card) if source_card else ([], "")
    inherited = front_matter_blocks(source_lines)
    tags = list(OUR_TAGS) + [t for t in block_list_items(inherited.get("tags", ["tags:"])) if t not in OUR_TAGS]
    front = [f"base_model: {facts.base_model}", "base_model_relation: quantized", "tags:",
             *[f"- {t}" for t in tags]]
    for key, block in inherited.items():
        if key not in OUR_KEYS:
            front.extend(block)
    ppl = "n/a" if facts.calibration_perplexity is None else f"{facts.calibration_perplexity:.3f}"
    out = ["---", *front, "---", "",
           f"# {facts.base_model.split('/')[-1]} — EXL2 {facts.achieved_bpw:.2f} bpw", "",
           f"An [EXL2](https://github.com/turboderp-org/exllamav2) quantization of `{facts.base_model}`, made "
           f"with exl2core {__version__}.", "",
           "| | |", "|---|---|",
           f"| target bits per weight | {facts.target_bpw:g} |",
           f"| achieved bits per weight (decoder) | {facts.achieved_bpw:.4f} |",
           f"| head bits | {facts.head_bits} |",
           f"| calibration data | {facts.calibration_data} |",
           f"| calibration rows (quantization) | {facts.rows} × {facts.length} tokens |",
           f"| measurement | {facts.measurement} |",
           f"| calibration perplexity | {ppl} |",
           f"| converter | exl2core {__version__} (EXL2 format of exllamav2 0.3.2) |", ""]
    if facts.has_report_image:
        out += [f"![Bits chosen per layer and the measured error around each choice]({REPORT_IMAGE})", ""]
    out += ["## Loading with exllamav2", "", "```python",
            "from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer",
            "from exllamav2.generator import ExLlamaV2DynamicGenerator", "",
            'config = ExLlamaV2Config("path/to/this/model")',
            "model = ExLlamaV2(config)",
            "cache = ExLlamaV2Cache(model, lazy=True)",
            "model.load_autosplit(cache)",
            "tokenizer = ExLlamaV2Tokenizer(config)",
            "generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer)",
            'print(generator.generate(prompt="Hello,", max_new_tokens=64))', "```", ""]
    text = "\n".join(out)
    if source_card is not None:
        text += (f"\n## Original model card\n\n(The source model's README, also kept verbatim as "
                 f"`{SOURCE_CARD_FILE}`.)\n\n{source_body.lstrip()}")
    return text if text.endswith("\n") else text + "\n"


def write_model_card(out_dir: Path, source_dir: Path, facts: CardFacts) -> None:
    """Write README.md (and README.source.md when the source ships a README) into ``out_dir``."""
    source_readme = source_dir / CARD_FILE
    source_card = None
    if source_readme.is_file():
        source_card = source_readme.read_text(encoding="utf-8", errors="replace")
        atomic_write(out_dir / SOURCE_CARD_FILE, lambda p: shutil.copyfile(source_readme, p))
    text = render_card(facts, source_card)
    atomic_write(out_dir / CARD_FILE, lambda p: p.write_text(text, encoding="utf-8"))
