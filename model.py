"""The network: ViT + BERT encoders, BDAM, Mamba fusion, and the two-stage retrieval model.

Paper: "Disentangling Identity from Transient Attributes: A Semantically-Supervised Decoupling
Framework for Robust Person Re-Identification", Sec. III-C (BDAM) and III-D (Mamba fusion).
Read bottom-up: config, BDAM, fusion, the model (the ViT and BERT encoders and their weights
are in helpers/encoders.py). The model serves the protocol of
docs/design.md#1-honest-retrieval-retrieve-then-re-rank: stage 1 embeds
images and texts separately (the gallery once, each query once, cosine similarity); stage 2
re-ranks a query's top-K images with the fusion module, which scores (image, text) *pairs*, so it
cannot leak the text into its own target.

Glossary of dimension letters (paper symbols in brackets):
    B  batch (images; one identity and one clothing description each)
    H, W  image height and width;  P  patches = (H / 16) * (W / 16), the image tokens
    T  text tokens;  Dv  ViT width;  Dt  text-encoder width
    D  BDAM width (768 in the paper);  d  fusion width (d_model = 256)
    E  embedding width of the retrieval space
    S  fusion queries (texts) in a batch;  Q  candidate images per text (its own + Q - 1 nearest)
    n  Mamba state size (d_state = 16)

Run: python model.py   (parameter count of each part, paper and small configurations)
Tests: pytest tests/test_model.py
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.encoders import OFFLINE_TEXT_MODEL, FrozenTextPrefix, load_text_encoder, load_vision_encoder, run_bert_layers
from mamba_triton import Mamba


# -----------------------------------------------------------------------------
# configuration

@dataclass
class ModelConfig:
    """The network's fields: paper defaults with their source; `small()` for CPU and SynthPEDES.
    The choices that are not the paper's are argued in docs/design.md#9-small-defaults-where-the-paper-is-silent."""

    # encoders: a hub name or a local folder; "" builds one from the shape fields below, randomly initialised
    vision_model: str = "google/vit-base-patch16-224"  # paper (implementation details): ViT-B/16
    text_model: str = "bert-base-uncased"  # paper (implementation details): BERT-base
    image_size: tuple[int, int] = (224, 224)  # (H, W), paper: 224 x 224
    patch_size: int = 16  # ViT-B/16
    vision_layers: int = 12  # ViT-B
    vision_width: int = 768
    vision_heads: int = 12
    text_layers: int = 12  # BERT-base
    text_width: int = 768
    text_heads: int = 12
    vocab_size: int = 30522  # the bert-base-uncased WordPiece vocabulary
    max_text_len: int = 64  # tokens per text, for data.collate (not stated)
    text_frozen_layers: int = 0  # not in the paper: the bottom N text layers frozen, so their states are cached
    # BDAM (Sec. III-C)
    bdam_width: int = 768  # paper
    bdam_depth: int = 2  # not stated; Table II's "shallow BDAM" is depth 1
    bdam_heads: int = 12  # as ViT-B at this width (not stated)
    # Mamba fusion (Sec. III-D)
    fusion_width: int = 256  # d_model, paper
    fusion_layers: int = 2  # paper
    d_state: int = 16  # paper
    d_conv: int = 4  # paper
    expand: int = 2  # Mamba default (Gu & Dao 2023)
    dropout: float = 0.1  # paper (fusion); also used in BDAM
    embed_dim: int = 256  # E: not stated; = d_model
    # how the fusion trains: docs/design.md#1-honest-retrieval-retrieve-then-re-rank
    fusion_candidates: int = 8  # Q images per text: its own and its Q - 1 nearest by stage 1
    fusion_detach: bool = True  # the fusion's loss trains the fusion alone, never the stage-1 features
    # ablation switches, Table II (BDAM)
    use_bdam: bool = True  # False: one global projection of the patch tokens, no clothing stream
    bdam_cross_attention: bool = True
    bdam_gate: bool = True  # False: f_id = f_id_hat, f_clo = f_clo_hat
    clothing_stream: bool = True  # the clothing projections that L_aln trains and beta scores (Table IV w/o L_aln: off)
    # Table III (fusion)
    use_fusion: bool = True  # False: stage 1 only
    fusion_mamba: bool = True  # False: residual MLP layers in place of the Mamba layers
    fusion_gate: bool = True  # g_fus (B x 2) per pair, as the paper; False: fixed weights 0.5 / 0.5
    fusion_align: bool = True  # False: one linear map in place of the alignment FFN
    # not in the paper, for a randomly initialised ViT on SynthPEDES (docs/design.md#9-small-defaults-where-the-paper-is-silent)
    image_bn: bool = True  # BatchNorm on f_id and f_clo before their projections ("BNNeck", Luo et al. 2019)
    conv_stem: bool = False  # stride-2 convolutions in place of the 16 x 16 patch projection (Xiao et al. 2021)
    bdam_pooling: str = "mean"  # "mean" (the paper) or "position": one D x D map per patch position, starting as the mean
    bdam_gate_norm: bool = False  # BatchNorm on the gate's input [f_id_hat; f_clo_hat]

    def __post_init__(self):
        self.image_size = tuple(self.image_size)  # a JSON round trip gives a list
        problems = []
        if self.bdam_pooling not in ("mean", "position"):
            problems.append(f"bdam_pooling must be 'mean' or 'position', got {self.bdam_pooling!r}")
        if self.conv_stem and self.vision_model:
            problems.append("conv_stem replaces the patch projection of a ViT built from its config: "
                            "set vision_model='' or conv_stem=False (a pretrained ViT keeps its own)")
        widths = [(self.bdam_width, self.bdam_heads, "bdam"), (self.text_width, self.text_heads, "text"),
                  (self.vision_width, self.vision_heads, "vision")]
        problems += [f"{name}_width {width} is not a multiple of {name}_heads {heads}"
                     for width, heads, name in widths if width % heads]
        if any(s % self.patch_size for s in self.image_size):
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.text_frozen_layers < 0 or (not self.text_model and self.text_frozen_layers > self.text_layers):
            problems.append(f"text_frozen_layers must be in 0..text_layers, got {self.text_frozen_layers}")
        if min(self.bdam_depth, self.fusion_layers) < 1:
            problems.append("bdam_depth and fusion_layers must be >= 1")
        if self.fusion_candidates < 2:
            problems.append("fusion_candidates must be >= 2 (a text's own image and one other)")
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))

    @classmethod
    def small(cls, **overrides) -> "ModelConfig":
        """CPU / SynthPEDES size: a 4-layer ViT (random init, convolutional stem) on 128 x 64
        images (P = 32) and the offline pretrained all-MiniLM-L6-v2 text encoder; BDAM (pooling by
        position) and fusion narrowed to match."""
        small = dict(vision_model="", image_size=(128, 64), vision_layers=4, vision_width=192,
                     vision_heads=3, conv_stem=True, text_model=OFFLINE_TEXT_MODEL, bdam_width=192,
                     bdam_heads=3, bdam_pooling="position", fusion_width=64, embed_dim=128)
        return cls(**{**small, **overrides})


# -----------------------------------------------------------------------------
# BDAM: Bidirectional Decoupled Alignment Module (Sec. III-C)


class Attention(nn.Module):
    """Pre-norm residual multi-head attention: x + Attn(LN(x), LN(context)) (self-attention
    when there is no context), dropout on the attention weights (Vaswani et al. 2017)."""

    def __init__(self, width: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width) if cross else None
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, P, D), context (B, P', D) or None -> (B, P, D)."""
        q = self.norm(x)
        kv = q if self.norm_context is None else self.norm_context(context)  # (B, P', D)
        return x + self.attn(q, kv, kv, need_weights=False)[0]  # (B, P, D)


class FeedForward(nn.Module):
    """Pre-norm residual MLP, width -> 4 width -> width (Vaswani et al. 2017)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)  # (..., width)


class BDAMLayer(nn.Module):
    """Self-attention within each stream, cross-attention between the streams (each stream
    queries the other, both reading the streams as they entered), then an FFN per stream. The
    FFN is ours: the paper names only the attentions; it is the standard transformer layer."""

    def __init__(self, width: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.self_id, self.self_clo = (Attention(width, heads, dropout, cross=False) for _ in range(2))
        self.cross_id, self.cross_clo = (
            (Attention(width, heads, dropout, cross=True) for _ in range(2)) if cross else (None, None))
        self.ffn_id, self.ffn_clo = FeedForward(width, dropout), FeedForward(width, dropout)

    def forward(self, z_id: torch.Tensor, z_clo: torch.Tensor):
        """z_id, z_clo (B, P, D) -> the same shapes."""
        z_id, z_clo = self.self_id(z_id), self.self_clo(z_clo)
        if self.cross_id is not None:
            z_id, z_clo = self.cross_id(z_id, z_clo), self.cross_clo(z_clo, z_id)
        return self.ffn_id(z_id), self.ffn_clo(z_clo)


class BDAM(nn.Module):
    """Patch tokens -> identity and clothing streams -> pooled, gated features.

        f_id_hat = mean_p Z_id,  f_clo_hat = mean_p Z_clo
        g = sigmoid(W_g [f_id_hat; f_clo_hat] + b_g)             (B, D), element-wise gate
        f_id = g * f_id_hat,     f_clo = (1 - g) * f_clo_hat
    The gate also scales every identity token (tokens = g * Z_id), whose mean is exactly f_id:
    the fusion module reads that token sequence (docs/design.md#2-mamba-runs-over-a-sequence).
    With bdam_pooling="position", f_hat = sum_p W_p Z_p + b (W_p = I / P, b = 0 at the start,
    i.e. the mean) for each stream.
    """

    def __init__(self, cfg: ModelConfig, vision_width: int):
        super().__init__()
        width = cfg.bdam_width
        self.to_id, self.to_clo = nn.Linear(vision_width, width), nn.Linear(vision_width, width)
        self.layers = nn.ModuleList(BDAMLayer(width, cfg.bdam_heads, cfg.dropout, cfg.bdam_cross_attention)
                                    for _ in range(cfg.bdam_depth))
        self.norm_id, self.norm_clo = nn.LayerNorm(width), nn.LayerNorm(width)
        self.gate = nn.Linear(2 * width, width) if cfg.bdam_gate else None
        self.gate_norm = nn.BatchNorm1d(2 * width) if cfg.bdam_gate and cfg.bdam_gate_norm else nn.Identity()
        self.pool_id = self.pool_clo = None
        if cfg.bdam_pooling == "position":
            positions = (cfg.image_size[0] // cfg.patch_size) * (cfg.image_size[1] // cfg.patch_size)
            self.pool_id, self.pool_clo = position_pooling(positions, width), position_pooling(positions, width)

    def forward(self, patches: torch.Tensor) -> dict:
        """patches (B, P, Dv) -> dict(tokens (B, P, D), f_id (B, D), f_clo (B, D), gate (B, D) or None)."""
        z_id, z_clo = self.to_id(patches), self.to_clo(patches)  # (B, P, D) each
        for layer in self.layers:
            z_id, z_clo = layer(z_id, z_clo)
        z_id, z_clo = self.norm_id(z_id), self.norm_clo(z_clo)
        if self.pool_id is None:
            f_id_hat, f_clo_hat = z_id.mean(1), z_clo.mean(1)  # (B, D) each
        else:
            # fp32 under autocast: B rows times (P D, D) cost less than casting the weight to bf16
            with torch.autocast(patches.device.type, enabled=False):
                f_id_hat, f_clo_hat = (pool(z.flatten(1).float()) for pool, z in
                                       ((self.pool_id, z_id), (self.pool_clo, z_clo)))
        if self.gate is None:
            return dict(tokens=z_id, f_id=f_id_hat, f_clo=f_clo_hat, gate=None)
        g = torch.sigmoid(self.gate(self.gate_norm(torch.cat([f_id_hat, f_clo_hat], dim=-1))))  # (B, D)
        return dict(tokens=g[:, None, :] * z_id, f_id=g * f_id_hat, f_clo=(1 - g) * f_clo_hat, gate=g)


def position_pooling(positions: int, width: int) -> nn.Linear:
    """(B, P * D) flattened tokens -> (B, D), initialised to the mean over the P positions."""
    pool = nn.Linear(positions * width, width)
    with torch.no_grad():
        pool.weight.copy_(torch.eye(width).repeat(1, positions) / positions)
        pool.bias.zero_()
    return pool


# -----------------------------------------------------------------------------
# Mamba fusion (Sec. III-D, docs/design.md#2-mamba-runs-over-a-sequence)


def aligner(d_in: int, d: int, cfg: ModelConfig) -> nn.Module:
    """The alignment FFN (Sec. III-D), or one linear map for the "w/o alignment" row."""
    if not cfg.fusion_align:
        return nn.Linear(d_in, d)
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d),
                         nn.LayerNorm(d))


class ResidualMamba(nn.Module):
    """x = x + Dropout(Mamba(LN(x))): the paper's x = Mamba(x) + x with Mamba's pre-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.fusion_width)
        self.mamba = Mamba(cfg.fusion_width, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.mamba(self.norm(x)))  # (S, P, d)


class ResidualMLP(nn.Module):
    """The "w/o Mamba" row: a per-token MLP of the same depth, no mixing along the sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn = FeedForward(cfg.fusion_width, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)  # (S, P, d)


class MambaFusion(nn.Module):
    """(identity tokens of an image, identity feature of a text) -> f_final.

        v_p = FFN_img(tokens_p),  t = FFN_txt(f_id^t)                     (d,)
        [W_img, W_txt] = softmax(W_g [mean_p v_p; t])                     g_fus, one pair per row
        x_p = W_img v_p + W_txt t                                         (W_img + W_txt = 1)
        x = x + Mamba(x)  (fusion_layers times);  f_final = W_o mean_p LN(x)_p   (E,)
    The visual clothing feature is not used here, on purpose (Sec. III-D). The gate is
    instance-level as the paper's g_fus in R^{B x 2}; the token sequence is ours
    (docs/design.md#2-mamba-runs-over-a-sequence).
    """

    def __init__(self, cfg: ModelConfig, image_width: int, text_width: int):
        super().__init__()
        self.align_image = aligner(image_width, cfg.fusion_width, cfg)
        self.align_text = aligner(text_width, cfg.fusion_width, cfg)
        self.gate = nn.Linear(2 * cfg.fusion_width, 2) if cfg.fusion_gate else None
        block = ResidualMamba if cfg.fusion_mamba else ResidualMLP
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.fusion_layers))
        self.norm = nn.LayerNorm(cfg.fusion_width)
        self.proj = nn.Linear(cfg.fusion_width, cfg.embed_dim)

    def forward(self, image_tokens: torch.Tensor, text_features: torch.Tensor):
        """image_tokens (S, P, d) from align_image (cacheable per image), text_features (S, Dt)
        -> f_final (S, E), W_img (S,)."""
        v = image_tokens
        t = self.align_text(text_features)  # (S, d)
        if self.gate is None:
            w = v.new_full((len(v), 2), 0.5)  # (S, 2)
        else:
            w = torch.softmax(self.gate(torch.cat([v.mean(1), t], dim=-1)), dim=-1)  # (S, 2)
        x = w[:, :1, None] * v + w[:, 1:, None] * t[:, None, :]  # (S, P, d)
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.norm(x).mean(1)), w[:, 0]  # (S, E), (S,)


# -----------------------------------------------------------------------------
# the model


class T2IReID(nn.Module):
    """Stage 1: encode_images (one vision pass: the gallery embedding, the fusion tokens and the
    gate) / encode_texts. Stage 2: pair_score on encode_images' tokens. Training: forward(batch)
    -> everything losses.compute_losses needs, through the same two methods."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision, self.text = load_vision_encoder(cfg), load_text_encoder(cfg)
        dv, dt, d = self.vision.config.hidden_size, self.text.config.hidden_size, cfg.bdam_width
        self.bdam = BDAM(cfg, dv) if cfg.use_bdam else None
        self.global_proj = None if cfg.use_bdam else nn.Linear(dv, d)  # "w/o BDAM": one global feature
        self.image_proj, self.text_proj = nn.Linear(d, cfg.embed_dim), nn.Linear(dt, cfg.embed_dim)
        self.image_bn = nn.BatchNorm1d(d) if cfg.image_bn else nn.Identity()
        self.clothing_bn = nn.BatchNorm1d(d) if cfg.image_bn and cfg.use_bdam else nn.Identity()
        clothing = cfg.use_bdam and cfg.clothing_stream  # the pair that L_aln trains
        self.clothing_image_proj = nn.Linear(d, cfg.embed_dim) if clothing else None
        self.clothing_text_proj = nn.Linear(dt, cfg.embed_dim) if clothing else None
        self.fusion = MambaFusion(cfg, d, dt) if cfg.use_fusion else None
        self.frozen_text = FrozenTextPrefix(self.text, cfg.text_frozen_layers) if cfg.text_frozen_layers else None

    def train(self, mode: bool = True) -> "T2IReID":
        super().train(mode)
        if self.frozen_text is not None:  # frozen layers never drop out: cached == recomputed
            self.frozen_text.eval()
        return self

    # --- images -----------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) -> dict(tokens (B, P, D), f_id (B, D), f_clo, gate (B, D) or None)."""
        size, patch = self.vision.config.image_size, self.vision.config.patch_size
        native = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        hw = tuple(images.shape[-2:])
        # a pretrained (square) ViT takes any multiple of its patch size by interpolating its
        # position embeddings; a ViT built from ModelConfig takes exactly cfg.image_size
        resize = hw != native
        if resize and (native[0] != native[1] or hw[0] % patch or hw[1] % patch):
            raise ValueError(f"images are {hw} but the ViT was built for {native}: set "
                             f"ModelConfig.image_size and the data transform's size to the same (H, W)")
        hidden = self.vision(pixel_values=images, interpolate_pos_encoding=resize).last_hidden_state
        patches = hidden[:, 1:]  # (B, P, Dv) without [CLS]
        if self.bdam is not None:
            return self.bdam(patches)
        tokens = self.global_proj(patches)  # (B, P, D)
        return dict(tokens=tokens, f_id=tokens.mean(1), f_clo=None, gate=None)

    def encode_images(self, images: torch.Tensor, align: bool = True) -> dict:
        """The vision pass of both stages: images (B, 3, H, W) -> dict(
            emb (B, E): the stage-1 (gallery) embedding, L2-normalised;
            tokens (B, P, d): the identity tokens aligned for the fusion (cache them for the
                gallery; align=False: BDAM's (B, P, D) tokens), None without fusion;
            gate (B, D) or None: BDAM's g;  f_id, f_clo (B, D): after the BNNeck, as the losses
                see them (f_clo None without BDAM);
            clo_emb (B, E): the clothing embedding that L_aln trains, L2-normalised, or None)."""
        vis = self.image_features(images)
        f_id = self.image_bn(vis["f_id"])  # (B, D)
        f_clo = self.clothing_bn(vis["f_clo"]) if vis["f_clo"] is not None else None  # (B, D)
        tokens = vis["tokens"] if self.fusion is not None else None  # (B, P, D)
        if align and tokens is not None:
            tokens = self.fusion.align_image(tokens)  # (B, P, d)
        clo_emb = None if self.clothing_image_proj is None else F.normalize(self.clothing_image_proj(f_clo), dim=-1)
        return dict(emb=F.normalize(self.image_proj(f_id), dim=-1), tokens=tokens, gate=vis["gate"],
                    f_id=f_id, f_clo=f_clo, clo_emb=clo_emb)

    # --- texts ------------------------------------------------------------------
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, Dt): the mean of the token states over the mask (MiniLM's pooling)."""
        if self.frozen_text is None:
            hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, Dt)
        else:
            hidden = self.frozen_text(input_ids, attention_mask, cache=self.training)  # (B, T, Dt)
            hidden = run_bert_layers(self.text.encoder.layer[self.cfg.text_frozen_layers:], hidden, attention_mask)
        mask = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def text_embedding(self, text_features: torch.Tensor) -> torch.Tensor:
        """(B, Dt) text features -> (B, E) stage-1 (query) embedding t(query), L2-normalised."""
        return F.normalize(self.text_proj(text_features), dim=-1)

    def clothing_embedding(self, text_features: torch.Tensor) -> torch.Tensor:
        """(B, Dt) features of clothing texts -> (B, E), L2-normalised: the text side of L_aln."""
        if self.clothing_text_proj is None:
            raise RuntimeError("this model has no clothing stream (clothing_stream=False): it cannot score clothing text")
        return F.normalize(self.clothing_text_proj(text_features), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query embedding from the text alone: (B, T) -> (B, E), L2-normalised."""
        return self.text_embedding(self.text_features(input_ids, attention_mask))

    # --- fusion re-ranking (stage 2) --------------------------------------------
    def pair_score(self, tokens: torch.Tensor, text_features: torch.Tensor, query_emb: torch.Tensor | None = None):
        """The fusion's score of each pair (image s, text s): cos(f_final(image, text), t(text)).

        tokens (S, P, d) aligned (encode_images), text_features (S, Dt), query_emb (S, E) = t(text)
        when already computed -> scores (S,), W_img (S,).
        """
        if self.fusion is None:
            raise RuntimeError("this model has no fusion module (use_fusion=False): rank with stage 1 only")
        f_final, w_image = self.fusion(tokens, text_features)  # (S, E), (S,)
        query = self.text_embedding(text_features) if query_emb is None else query_emb  # (S, E)
        return (F.normalize(f_final, dim=-1) * query).sum(-1), w_image

    # --- training -----------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        """batch from data.collate -> the features and scores named in losses.compute_losses,
        plus the gate values (Fig. 5): bdam_gate (B, D) or None, fusion_gate (S,)."""
        images, pids = batch["images"], batch["pids"]
        img = self.encode_images(images, align=False)
        # only the textual identity meets the visual identity (stage 1 and the fusion; the
        # paper's Fig. 2 and 4); the clothing text meets f_clo in L_aln alone
        identity = self.text_features(**batch["identity"])  # (B, Dt)
        f_id, f_clo = img["f_id"], img["f_clo"]  # (B, D), (B, D) or None, after the BNNeck
        out = dict(f_id=f_id, f_clo=f_clo, bdam_gate=img["gate"], image_emb=img["emb"],  # (B, E)
                   identity_emb=self.text_embedding(identity))  # (B, E)
        if self.clothing_image_proj is not None:
            clothing = self.text_features(**batch["clothing"])  # (B, Dt)
            out["clo_image"] = img["clo_emb"]  # (B, E)
            out["clo_text"] = self.clothing_embedding(clothing)  # (B, E)
        if self.fusion is not None:
            out.update(self.fusion_pairs(img["tokens"], out["image_emb"], pids, identity, out["identity_emb"]))
        return out

    def fusion_pairs(self, tokens, image_emb, pids, texts, text_emb) -> dict:
        """Score each text against the Q in-batch images nearest to it by stage 1, its own image
        always among them: the task stage 2 does at test, where the top K of a query hold its
        person's other images (other outfits too) beside look-alikes.

        tokens (B, P, D), image_emb (B, E), pids (B,), texts (S, Dt) and text_emb (S, E) with text
        s describing image s mod B -> fusion_scores (S, Q), fusion_pids (S, Q) the candidates'
        identities (the loss counts every candidate of the text's identity as a positive),
        fusion_query_pids (S,), fusion_gate (S,) W_img on the text's own image. With
        cfg.fusion_detach every input is detached: the fusion loss cannot move stage 1.
        """
        if self.cfg.fusion_detach:
            tokens, image_emb, texts, text_emb = (x.detach() for x in (tokens, image_emb, texts, text_emb))
        b, s = len(tokens), len(texts)
        q = min(self.cfg.fusion_candidates, b)
        own = torch.arange(s, device=pids.device) % b  # (S,)
        sim = (text_emb @ image_emb.T).detach()  # (S, B) stage-1 similarity
        sim[torch.arange(s, device=pids.device), own] = float("inf")  # the own image comes first
        candidates = sim.topk(q, dim=1).indices  # (S, Q)
        aligned = self.fusion.align_image(tokens)  # (B, P, d)
        scores, w_image = self.pair_score(aligned[candidates.flatten()],  # (S * Q, P, d)
                                          texts.repeat_interleave(q, dim=0),  # (S * Q, Dt)
                                          text_emb.repeat_interleave(q, dim=0))  # (S * Q, E) t(query)
        return dict(fusion_scores=scores.view(s, q), fusion_pids=pids[candidates],
                    fusion_query_pids=pids.repeat(s // b),
                    fusion_gate=w_image.view(s, q)[:, 0].detach())  # (S,) on the own image

    def shared_parameter(self) -> nn.Parameter:
        """The last layer that every loss passes through, for GradNorm's norms (Eq. 5): the BDAM
        gate, or the ViT's final LayerNorm when there is no gate."""
        if self.bdam is not None and self.bdam.gate is not None:
            return self.bdam.gate.weight
        return self.vision.layernorm.weight


# -----------------------------------------------------------------------------


def parameter_table(model: T2IReID) -> list[tuple[str, int]]:
    """(part, parameter count) for each child of the model, with BDAM's and fusion's parts."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    rows = []
    for name, child in model.named_children():
        rows.append((name, count(child)))
        if name in ("bdam", "fusion"):
            rows += [(f"  {name}.{sub}", count(grandchild)) for sub, grandchild in child.named_children()]
    return [*rows, ("total", count(model))]


if __name__ == "__main__":
    configs = {"paper (ViT-B/16, BERT-base)": ModelConfig(vision_model="", text_model=""),  # shapes only
               "small (4-layer ViT, MiniLM)": ModelConfig.small()}
    tables = {title: dict(parameter_table(T2IReID(cfg))) for title, cfg in configs.items()}
    names = list(next(iter(tables.values())))
    print(f"{'part':24s}" + "".join(f"{title:>30s}" for title in tables))
    for name in names:
        print(f"{name:24s}" + "".join(f"{table.get(name, 0):>30,d}" for table in tables.values()))
    for title, cfg in configs.items():
        p = (cfg.image_size[0] // cfg.patch_size) * (cfg.image_size[1] // cfg.patch_size)
        print(f"{title}: images {cfg.image_size} -> P = {p} tokens; BDAM width {cfg.bdam_width}, depth "
              f"{cfg.bdam_depth}; fusion d_model {cfg.fusion_width} x {cfg.fusion_layers} Mamba layers; "
              f"E {cfg.embed_dim}")
