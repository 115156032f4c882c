"""Caption checks shared by ``data build`` and ``data filter``: decoding, length rules, blocklist.

Every rejected caption raises ``SampleError`` with a kind counted in ``_stats.json``:

    missing_caption, empty_caption, bad_caption_encoding      (decoding, as in the loader)
    caption_too_short, caption_too_long, caption_blocked      (CaptionRules)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from clipkit.data.decode import SampleError, decode_caption
from clipkit.data.sources import Caption


def read_caption(raw: Caption) -> str:
    """A raw caption (text, sidecar bytes or path, None) -> stripped text, or ``SampleError``."""
    if raw is None:
        raise SampleError("missing_caption", "the source gives no caption")
    if isinstance(raw, Path):
        try:
            raw = raw.read_bytes()
        except FileNotFoundError:
            raise SampleError("missing_caption", f"no caption file '{raw.name}'") from None
        except OSError as e:
            raise SampleError("missing_caption", f"cannot read '{raw.name}': {e}") from None
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    return decode_caption(raw)


def load_blocklist(path: str | Path) -> frozenset[str]:
    """One word or phrase per line (case-insensitive); blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip().lower() for w in lines if w.strip() and not w.lstrip().startswith("#"))


@dataclass(frozen=True)
class CaptionRules:
    """Length limits (0 = no limit) and a blocklist of words / phrases matched as whole words."""

    min_chars: int = 0
    max_chars: int = 0
    min_words: int = 0
    max_words: int = 0
    blocklist: frozenset[str] = frozenset()
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.blocklist:
            alternatives = "|".join(re.escape(w) for w in sorted(self.blocklist, key=len, reverse=True))
            pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
            object.__setattr__(self, "_pattern", pattern)

    @property
    def active(self) -> bool:
        return bool(self.min_chars or self.max_chars or self.min_words or self.max_words or self.blocklist)

    def check(self, text: str) -> None:
        """Raise ``SampleError`` naming the first rule ``text`` breaks."""
        n_chars, n_words = len(text), len(text.split())
        if n_chars < self.min_chars or n_words < self.min_words:
            raise SampleError("caption_too_short", f"{n_chars} chars / {n_words} words")
        if (self.max_chars and n_chars > self.max_chars) or (self.max_words and n_words > self.max_words):
            raise SampleError("caption_too_long", f"{n_chars} chars / {n_words} words")
        if self._pattern is not None:
            hit = self._pattern.search(text)
            if hit:
                raise SampleError("caption_blocked", f"contains blocked term '{hit.group(0).lower()}'")

    def to_dict(self) -> dict[str, object]:
        return {
            "min_chars": self.min_chars, "max_chars": self.max_chars, "min_words": self.min_words,
            "max_words": self.max_words, "blocklist": sorted(self.blocklist),
        }  # fmt: skip


def usable_captions(raws: tuple[Caption, ...], rules: CaptionRules) -> list[str]:
    """Decoded captions that pass ``rules``; when none does, raise the first caption's error."""
    kept: list[str] = []
    first_error: SampleError | None = None
    for raw in raws:
        try:
            text = read_caption(raw)
            rules.check(text)
        except SampleError as err:
            first_error = first_error or err
            continue
        kept.append(text)
    if kept:
        return kept
    raise first_error or SampleError("missing_caption", "no caption")
