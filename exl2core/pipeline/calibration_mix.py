"""Versions of the built-in calibration mix: which domains, in what proportions (no torch, for the CLI).

A job records the version it started with and every version stays selectable, so a resumed job never
mixes data and an old comparison can be rerun. Domains are file-name prefixes in
``exl2core/data/calibration`` (see SOURCES.md there).

v1: literary prose, code, technical documentation, multilingual text and FAQ dialogue.
v2: adds encyclopedic articles, web-style pages, news-style reports and chat conversations rendered with
the model's own chat template (what users measure quants on and what instruct models see), with
separate proportions for measurement and quantization rows, as exllamav2 has.
v3: v2 with v1's share of code-adjacent text restored: code, Python documentation and FAQ get a third of
the quantization rows (v1 39 %, v2 21 %, and held-out code got worse with v2 than with v1), taken from news,
web pages and literary prose.
v4: v3 with more encyclopedic prose and chat (where Gemma-3-270M at 4.0 bpw gained least from v3), taken
from web pages, multilingual text, news and literary prose; code-adjacent text keeps its third of the
quantization rows. At 16 quantization rows: encyclopedic 6, chat 3, code 3, technical and FAQ 1 each; at
4 measurement rows: encyclopedic 2, chat and code 1 each.
v5: v4's quantization rows; measurement rows lean further toward chat, about as many as encyclopedic
prose (default 16 rows: chat 5, encyclopedic 4), since the measurement decides the allocation and v4's
extra chat quantization row left Gemma-3-270M's chat KL at 4.0 bpw where v3 had it. At 4 measurement
rows: chat 2, encyclopedic and code 1 each. Measured and not adopted (bench/RESULTS.md): Gemma's chat KL
moved little, SmolLM2's encyclopedic KL got worse.
v6: v4's measurement rows, and chat split between the chat conversations and a second set of shorter
everyday ones (``assistant``, more conversations and so more turns per row), one quantization row taken
from encyclopedic prose for it. At 16 quantization rows: encyclopedic 5, chat 2, assistant 2, code 3,
technical and FAQ 1 each. Measured and not adopted: Gemma-3-270M's encyclopedic KL at 4.0 bpw got worse
and its chat KL stayed above the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RowPurpose = Literal["measurement", "quantization"]


@dataclass(frozen=True)
class CalibrationMix:
    """A version of the built-in mix: the fraction of text rows per domain, in row order, for measurement
    rows and for quantization rows. A file belongs to the domain named by its prefix
    ("code-go-stdlib.txt" → code); "multilingual-shuffled" reuses the multilingual text; the chat domain's
    conversations are rendered with the model's chat template."""

    version: str
    measurement: dict[str, float]
    quantization: dict[str, float]

    def weights(self, purpose: RowPurpose) -> dict[str, float]:
        return self.measurement if purpose == "measurement" else self.quantization


_V1_WEIGHTS = {
    "prose": 0.40,
    "code": 0.15,
    "technical": 0.10,
    "multilingual": 0.12,
    "multilingual-shuffled": 0.03,
    "dialogue": 0.10,
}
# v5 keeps these quantization rows.
_V4_QUANTIZATION = {"encyclopedic": 0.39, "chat": 0.20, "code": 0.21, "technical": 0.07, "dialogue": 0.06,
                    "web": 0.02, "multilingual": 0.02, "news": 0.01, "prose": 0.01, "multilingual-shuffled": 0.01}

MIXES: dict[str, CalibrationMix] = {
    "v1": CalibrationMix("v1", _V1_WEIGHTS, _V1_WEIGHTS),
    # Informational prose (encyclopedic, web, news) is about half of the quantization rows, as Wikipedia
    # and C4 are in exllamav2's set; measurement rows are spread more evenly, as exllamav2's are.
    "v2": CalibrationMix(
        "v2",
        measurement={"encyclopedic": 0.22, "chat": 0.16, "code": 0.14, "web": 0.10, "multilingual": 0.10,
                     "technical": 0.08, "prose": 0.08, "news": 0.06, "multilingual-shuffled": 0.04,
                     "dialogue": 0.02},
        quantization={"encyclopedic": 0.32, "chat": 0.14, "code": 0.12, "web": 0.10, "multilingual": 0.09,
                      "technical": 0.06, "news": 0.06, "prose": 0.05, "dialogue": 0.03,
                      "multilingual-shuffled": 0.03},
    ),
    "v3": CalibrationMix(
        "v3",
        measurement={"encyclopedic": 0.22, "code": 0.18, "chat": 0.16, "web": 0.10, "multilingual": 0.08,
                     "technical": 0.08, "prose": 0.06, "news": 0.04, "multilingual-shuffled": 0.04,
                     "dialogue": 0.04},
        quantization={"encyclopedic": 0.32, "code": 0.20, "chat": 0.13, "technical": 0.08, "web": 0.07,
                      "multilingual": 0.07, "dialogue": 0.06, "news": 0.03, "prose": 0.02,
                      "multilingual-shuffled": 0.02},
    ),
    "v4": CalibrationMix(
        "v4",
        measurement={"encyclopedic": 0.34, "chat": 0.22, "code": 0.18, "technical": 0.07, "web": 0.06,
                     "multilingual": 0.05, "dialogue": 0.04, "prose": 0.02, "news": 0.01,
                     "multilingual-shuffled": 0.01},
        quantization=_V4_QUANTIZATION,
    ),
    "v5": CalibrationMix(
        "v5",
        measurement={"chat": 0.34, "encyclopedic": 0.32, "code": 0.20, "technical": 0.06, "dialogue": 0.04,
                     "web": 0.02, "multilingual": 0.02},
        quantization=_V4_QUANTIZATION,
    ),
    "v6": CalibrationMix(
        "v6",
        measurement={"encyclopedic": 0.34, "chat": 0.14, "code": 0.18, "assistant": 0.08, "technical": 0.07,
                     "web": 0.06, "multilingual": 0.05, "dialogue": 0.04, "prose": 0.02, "news": 0.01,
                     "multilingual-shuffled": 0.01},
        quantization={"encyclopedic": 0.34, "code": 0.21, "chat": 0.13, "assistant": 0.13, "technical": 0.07,
                      "dialogue": 0.06, "web": 0.02, "multilingual": 0.02, "news": 0.01, "prose": 0.01},
    ),
}
DEFAULT_MIX = "v4"
# Jobs whose job.json predates the mix version calibrated with this one.
LEGACY_MIX = "v1"
