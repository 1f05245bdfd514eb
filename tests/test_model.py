"""The model on a real SynthPEDES batch: finite losses, gradients everywhere, learning, the fusion
score depends on the image, every ablation row makes the change it names and trains, clear
errors offline."""
import dataclasses
import shlex
import types

import pytest
import torch

import data
import mamba_triton
import train
from evaluate import RetrievalConfig
from helpers.cli import given
from helpers.encoders import ConvStem, EncoderLoadError, load_tokenizer, load_vision_encoder
from losses import GradNorm, LossConfig, compute_losses
from model import BDAM, ModelConfig, ResidualMLP, T2IReID


@pytest.fixture(autouse=True)
def scan_reference(monkeypatch):
    """The PyTorch selective scan: the Triton kernels are tested in test_mamba_triton.py, and in
    the interpreter they would take minutes here."""
    monkeypatch.setattr(mamba_triton, "_INTERPRET", False)


def tiny(**overrides) -> ModelConfig:
    """The small configuration shrunk further for tests: 2-layer ViT on 64 x 32 images (P = 8)
    and a 2-layer random BERT on the real WordPiece vocabulary."""
    shape = dict(image_size=(64, 32), vision_layers=2, vision_width=64, vision_heads=2, text_model="",
                 text_layers=2, text_width=64, text_heads=2, bdam_width=64, bdam_heads=2,
                 fusion_width=32, embed_dim=32, dropout=0.0)
    return ModelConfig.small(**{**shape, **overrides})


@pytest.fixture(scope="module")
def batch(tiny_synth):
    """4 identities x 2 images, with the generator's identity and clothing descriptions."""
    ann = data.read_annotations("synth", tiny_synth)
    texts = {r["file_path"]: (r["identity_text"], r["clothing_text"]) for r in ann.records}
    dataset = data.load_dataset("synth", tiny_synth)
    chosen, seen = [], set()
    for s in dataset.train:
        if s.pid < 4 and s.image_path not in seen and sum(c.pid == s.pid for c in chosen) < 2:
            seen.add(s.image_path)
            identity, clothing = texts[str(data.Path(s.image_path).relative_to(dataset.image_dir))]
            chosen.append(dataclasses.replace(s, identity=identity, clothing=clothing))
    items = data.TrainSet(chosen, data.eval_transform((64, 32)))
    out = data.collate([items[i] for i in range(len(items))], load_tokenizer(), max_len=48)
    assert sorted(out["pids"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    return out


def test_forward_backward_finite_losses_and_a_gradient_on_every_parameter(batch):
    torch.manual_seed(0)
    loss_cfg = LossConfig()
    model = T2IReID(tiny())
    losses = compute_losses(model(batch), batch, loss_cfg)
    assert list(losses) == loss_cfg.loss_names() == ["aln", "decouple", "info", "triplet", "fusion"]
    assert all(torch.isfinite(v) for v in losses.values())
    # the detached fusion loss is not one of GradNorm's tasks; backward adds it with weight 1
    assert model.cfg.fusion_detach and loss_cfg.balanced_names(model.cfg.fusion_detach) == [
        "aln", "decouple", "info", "triplet"]
    assert loss_cfg.balanced_names(fusion_detach=False) == loss_cfg.loss_names()  # then it reaches the shared layer
    gradnorm = GradNorm(loss_cfg.balanced_names(model.cfg.fusion_detach), loss_cfg.gradnorm_alpha, loss_cfg.weight_reg)
    stats = gradnorm.backward(losses, model.shared_parameter())
    assert (stats["grad_norms"] > 0).all()  # every balanced loss reaches GradNorm's shared layer
    assert gradnorm.log_weights.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), name
        if "embeddings" not in name:  # embedding rows of unused tokens are legitimately zero
            assert p.grad.abs().sum() > 0, f"{name} has a zero gradient"


def test_a_few_steps_on_one_batch_drive_the_loss_down(batch):
    torch.manual_seed(0)
    model = T2IReID(tiny())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        opt.zero_grad()
        loss = sum(compute_losses(model(batch), batch, LossConfig()).values())
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], history


def test_bdam_gate_scales_tokens_and_pools_to_f_id():
    torch.manual_seed(0)
    cfg = tiny()
    bdam = BDAM(cfg, vision_width=48)
    out = bdam(torch.randn(3, 8, 48))
    assert torch.allclose(out["tokens"].mean(1), out["f_id"], atol=1e-6)  # docs/design.md#2-mamba-runs-over-a-sequence
    g = out["gate"]
    assert ((g > 0) & (g < 1)).all() and g.shape == (3, 64)
    # f_id = g * f_id_hat, f_clo = (1 - g) * f_clo_hat: the hats are means of LayerNorm-ed
    # tokens (weight 1, bias 0 at init), so each has zero mean over its D features
    assert torch.allclose((out["f_id"] / g).mean(-1), torch.zeros(3), atol=1e-4)
    assert torch.allclose((out["f_clo"] / (1 - g)).mean(-1), torch.zeros(3), atol=1e-4)


def test_gate_norm_lets_small_differences_between_images_reach_the_gate():
    """Patches that differ little between images (a shared component plus 1% noise): the paper's
    gate gives them nearly the same g; with BatchNorm on its input the gate spreads them."""
    torch.manual_seed(0)
    patches = torch.randn(1, 8, 48) + 0.01 * torch.randn(16, 8, 48)  # (B, P, Dv)
    plain, normed = BDAM(tiny(), 48), BDAM(tiny(bdam_gate_norm=True), 48)
    normed.load_state_dict(plain.state_dict(), strict=False)  # the same layers and gate weights
    spread = lambda bdam: bdam(patches)["gate"].std(0).mean().item()  # noqa: E731  per channel, over images
    assert spread(normed) > 20 * spread(plain)
    assert isinstance(plain.gate_norm, torch.nn.Identity) and isinstance(normed.gate_norm, torch.nn.BatchNorm1d)


def test_position_pooling_starts_as_the_mean_and_then_weighs_positions():
    torch.manual_seed(0)
    patches = torch.randn(3, 8, 48)
    by_position, by_mean = BDAM(tiny(bdam_pooling="position"), 48), BDAM(tiny(bdam_pooling="mean"), 48)
    by_mean.load_state_dict(by_position.state_dict(), strict=False)  # the same layers and gate
    before = by_position(patches)
    for key in ("f_id", "f_clo"):
        assert torch.allclose(before[key], by_mean(patches)[key], atol=1e-6)
    # one position weighted twice: f_id_hat moves by exactly that position's token / P
    with torch.no_grad():
        by_position.pool_id.weight[:, 64 * 5:64 * 6] *= 2
    after = by_position(patches)
    z_id = before["tokens"] / before["gate"][:, None, :]  # the LayerNorm-ed identity tokens
    assert torch.allclose(after["f_id"] / after["gate"], z_id.mean(1) + z_id[:, 5] / 8, atol=1e-5)
    f_clo_hat = before["f_clo"] / (1 - before["gate"])  # the clothing stream's pooling is untouched
    assert torch.allclose(after["f_clo"] / (1 - after["gate"]), f_clo_hat, atol=1e-5)


def test_conv_stem_replaces_the_patch_projection_with_the_same_token_grid():
    torch.manual_seed(0)
    vit = load_vision_encoder(tiny(conv_stem=True, patch_size=8))
    stem = vit.embeddings.patch_embeddings.projection
    assert isinstance(stem, ConvStem)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in stem) == 3  # log2(8)
    assert vit(pixel_values=torch.randn(2, 3, 64, 32)).last_hidden_state.shape == (2, 1 + 8 * 4, 64)
    plain = load_vision_encoder(tiny(conv_stem=False))
    assert isinstance(plain.embeddings.patch_embeddings.projection, torch.nn.Conv2d)
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(12, 64)


def test_bnneck_standardises_both_streams_as_the_losses_see_them(batch):
    torch.manual_seed(0)
    model = T2IReID(tiny()).train()
    out = model(batch)
    for key in ("f_id", "f_clo"):  # batch statistics in training: each feature mean 0, variance 1
        assert torch.allclose(out[key].mean(0), torch.zeros(64), atol=1e-5)
        assert torch.allclose(out[key].var(0, unbiased=False), torch.ones(64), atol=1e-2)
    # the stage-1 embedding of training is the one encode_images gives, on the same statistics
    assert torch.allclose(out["image_emb"], model.encode_images(batch["images"])["emb"], atol=1e-5)


def pair_scores(model, images, input_ids, attention_mask, tokens=None):
    """model.pair_score of (image s, text s) from images (S, 3, H, W), or from cached tokens (S, P, d)."""
    if tokens is None:
        tokens = model.encode_images(images)["tokens"]
    return model.pair_score(tokens, model.text_features(input_ids, attention_mask))[0]


def test_fusion_score_depends_on_the_image_and_matches_training_pairs(batch):
    torch.manual_seed(0)
    model = T2IReID(tiny()).eval()
    images, caption = batch["images"], batch["identity"]
    with torch.no_grad():
        # the same text against two different images
        ids, mask = caption["input_ids"][:1].repeat(2, 1), caption["attention_mask"][:1].repeat(2, 1)
        two = pair_scores(model, images[[0, 2]], ids, mask)
        assert (two[0] - two[1]).abs() > 1e-4
        # cached tokens give the same scores as images
        cached = model.encode_images(images[[0, 2]])
        assert torch.allclose(pair_scores(model, None, ids, mask, cached["tokens"]), two, atol=1e-5)
        # column 0 of the training scores is the pair (own image, its identity description)
        out = model(batch)
        own = pair_scores(model, images, caption["input_ids"], caption["attention_mask"])
        assert torch.allclose(out["fusion_scores"][:8, 0], own, atol=1e-5)


def test_fusion_gate_is_one_pair_of_weights_per_pair(batch):
    """g_fus in R^{S x 2} (the paper's instance-level gate): W_img + W_txt = 1 for each pair, and
    every token of a pair is mixed with the same W_img."""
    torch.manual_seed(0)
    model = T2IReID(tiny()).eval()
    tokens = model.encode_images(batch["images"])["tokens"]  # (8, P, d)
    text = model.text_features(**batch["identity"])  # (8, Dt)
    seen = {}
    model.fusion.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        _, w_image = model.fusion(tokens, text)
        t = model.fusion.align_text(text)
        logits = model.fusion.gate(torch.cat([tokens.mean(1), t], dim=-1))  # (8, 2)
    assert w_image.shape == (8,)
    torch.testing.assert_close(w_image, logits.softmax(-1)[:, 0])
    mixed = w_image[:, None, None] * tokens + (1 - w_image)[:, None, None] * t[:, None, :]
    torch.testing.assert_close(seen["x"], mixed)
    fixed = T2IReID(tiny(fusion_gate=False)).eval()
    assert torch.all(fixed.fusion(tokens, text)[1] == 0.5)


@pytest.mark.parametrize("detach", [True, False])
def test_the_fusion_loss_moves_stage_one_only_when_not_detached(batch, detach):
    """fusion_detach: the fusion loss trains the fusion alone, so it cannot fall by moving the
    stage-1 embeddings; without it, its gradient reaches the encoders and the projections."""
    torch.manual_seed(0)
    model = T2IReID(tiny(fusion_detach=detach)).train()
    loss = compute_losses(model(batch), batch, LossConfig())["fusion"]
    loss.backward()
    outside = {name: p.grad for name, p in model.named_parameters() if not name.startswith("fusion.")}
    inside = [p.grad for name, p in model.named_parameters() if name.startswith("fusion.") and "align_image" not in name]
    assert all(g is not None and g.abs().sum() > 0 for g in inside)
    reached = [name for name, g in outside.items() if g is not None and g.abs().sum() > 0]
    if detach:
        assert reached == []
    else:
        assert any(name.startswith("text_proj") for name in reached) and any(name.startswith("bdam") for name in reached)


def test_frozen_text_layers_are_cached_and_equal_the_whole_encoder(batch):
    """The bottom text layer frozen: its states come from the cache in training and equal a full
    pass of the same BERT; only the layers above it learn."""
    torch.manual_seed(0)
    model = T2IReID(tiny(text_frozen_layers=1, text_layers=2))
    # no dropout from the start (a BERT built from its config is in training mode): train.py
    # fills the cache before its first model.train()
    assert not any(m.training for m in (model.frozen_text.embeddings, *model.frozen_text.layers))
    caption = batch["identity"]
    model.eval()
    with torch.no_grad():
        hidden = model.text(**caption).last_hidden_state  # (B, T, Dt): the whole encoder, one pass
        mask = caption["attention_mask"][..., None].float()
        whole = (hidden * mask).sum(1) / mask.sum(1)
        assert torch.allclose(model.text_features(**caption), whole, atol=1e-5)
    model.train()
    model.text.eval()  # no dropout in the top layer either, to compare values
    first = model.text_features(**caption)
    distinct = len({tuple(row[m.bool()].tolist()) for row, m in zip(caption["input_ids"], caption["attention_mask"])})
    assert len(model.frozen_text.cache) == distinct
    # the longest caption alone (padded differently) is served from the cache, unchanged
    longest = caption["attention_mask"].sum(1).argmax()
    n = int(caption["attention_mask"][longest].sum())
    alone = model.text_features(caption["input_ids"][longest:longest + 1, :n], caption["attention_mask"][longest:longest + 1, :n])
    assert len(model.frozen_text.cache) == distinct
    assert torch.allclose(alone[0], first[longest], atol=1e-5) and torch.allclose(first, whole, atol=1e-5)
    first.sum().backward()
    for name, p in model.text.named_parameters():
        frozen = name.startswith(("embeddings.", "encoder.layer.0."))
        assert p.requires_grad != frozen and (p.grad is None) == frozen, name
    assert not model.frozen_text.embeddings.training  # model.train() keeps the frozen part in eval mode
    with pytest.raises(ValueError, match="text_frozen_layers"):
        tiny(text_frozen_layers=3, text_layers=2)


def test_clothing_text_never_reaches_the_identity_path(batch):
    """Only the textual identity meets the visual identity
    (docs/design.md#5-text-side-only-identity-text-meets-the-identity-path): with other clothing
    descriptions, stage 1's embeddings, the fusion's scores and every loss but L_aln are the same;
    only the clothing side moves."""
    torch.manual_seed(0)
    model = T2IReID(tiny()).eval()
    swapped = {**batch, "clothing": {k: v.roll(1, dims=0) for k, v in batch["clothing"].items()}}
    with torch.no_grad():
        out, other = model(batch), model(swapped)
        losses, other_losses = (compute_losses(o, b, LossConfig()) for o, b in ((out, batch), (other, swapped)))
    for key in ("identity_emb", "image_emb", "fusion_scores"):
        torch.testing.assert_close(out[key], other[key])
    assert not torch.allclose(out["clo_text"], other["clo_text"])
    assert out["fusion_scores"].shape[0] == 8 and out["fusion_query_pids"].tolist() == batch["pids"].tolist()
    assert {k for k in losses if losses[k] != other_losses[k]} == {"aln"}


def test_fusion_candidates_are_the_nearest_images_own_first(batch):
    """Each text meets its own image and the Q - 1 in-batch images nearest to it by stage 1,
    its own person's other images included (they count as positives), as at test."""
    torch.manual_seed(0)
    model = T2IReID(tiny(fusion_candidates=4)).eval()
    with torch.no_grad():
        out = model(batch)
    pids = batch["pids"]
    sim = out["identity_emb"] @ out["image_emb"].T  # (8, 8)
    for s in range(8):
        rest = sorted((sim[s, j].item(), pids[j].item()) for j in range(8) if j != s)[::-1][:3]
        assert out["fusion_pids"][s, 0] == pids[s] == out["fusion_query_pids"][s]
        assert sorted(out["fusion_pids"][s, 1:].tolist()) == sorted(p for _, p in rest)
    assert out["fusion_scores"].shape == (8, 4) and out["fusion_gate"].shape == (8,)


def test_stage_one_embeddings_are_unit_vectors(batch):
    torch.manual_seed(0)
    model = T2IReID(tiny()).eval()
    with torch.no_grad():
        image = model.encode_images(batch["images"])["emb"]
        text = model.encode_texts(**batch["identity"])
    assert image.shape == text.shape == (8, 32)
    assert torch.allclose(image.norm(dim=-1), torch.ones(8)) and torch.allclose(text.norm(dim=-1), torch.ones(8))


ALL_LOSSES = ("aln", "decouple", "info", "triplet", "fusion")  # compute_losses' order, fusion last


def clothing_reads_identity(bdam: BDAM) -> bool:
    """Whether the clothing tokens out of BDAM's layers change when only the identity tokens going
    in change: the cross-attention is the only path from one stream to the other."""
    z_clo = torch.randn(2, 8, bdam.norm_clo.normalized_shape[0])  # (B, P, D)

    def clothing_out(z_id):
        streams = (z_id, z_clo)
        for layer in bdam.layers:
            streams = layer(*streams)
        return streams[1]

    with torch.no_grad():
        return not torch.allclose(clothing_out(torch.randn_like(z_clo)), clothing_out(torch.randn_like(z_clo)))


def fusion_mixes_equally(model: T2IReID) -> bool:
    """Whether what the fusion's first layer receives is x_p = (v_p + t) / 2 for every token,
    i.e. the gate's weights are the fixed 0.5 / 0.5."""
    v = torch.randn(2, 8, model.cfg.fusion_width)  # (S, P, d) aligned image tokens
    text = torch.randn(2, model.text.config.hidden_size)  # (S, Dt)
    seen = []
    hook = model.fusion.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model.fusion(v, text)
        t = model.fusion.align_text(text)[:, None, :]  # (S, 1, d)
    hook.remove()
    return torch.allclose(seen[0], (v + t) / 2, atol=1e-6)


def regulariser(gradnorm: GradNorm) -> float:
    """Eq. 6's lambda sum_k (log w_k)^2 at every s_k = 1 (and every loss 0)."""
    with torch.no_grad():
        gradnorm.log_weights.fill_(1.0)
        return gradnorm.regulariser().item()


def without_loss(r, name: str) -> dict:
    """The claims of a "w/o L_name" row: the loss is gone, and GradNorm has one task fewer (the
    detached fusion loss is never one of its tasks)."""
    rest = tuple(t for t in ALL_LOSSES if t not in (name, "fusion"))
    return {f"no {name} loss": name not in r.losses, f"GradNorm's tasks are {rest}": r.gradnorm.tasks == rest}


def everything_present(r) -> dict:
    """The claims of the "full" row: the opposite of every other row's."""
    bdam, fusion = r.model.bdam, r.model.fusion
    return {"BDAM, 2 layers, gate": bdam is not None and len(bdam.layers) == 2 and bdam.gate is not None,
            "clothing stream reads identity": clothing_reads_identity(bdam),
            "fusion with Mamba": any(isinstance(m, mamba_triton.Mamba) for m in fusion.modules()),
            "fusion gate learned": not fusion_mixes_equally(r.model),
            "alignment FFNs": all(isinstance(a, torch.nn.Sequential) for a in (fusion.align_image, fusion.align_text)),
            "every loss, GradNorm's tasks all but the fusion": list(r.losses) == list(ALL_LOSSES)
            and list(r.gradnorm.tasks) == list(ALL_LOSSES[:-1]),
            "weights learned": any(w != 1 for w in r.weights),
            "regulariser": regulariser(r.gradnorm) == pytest.approx(r.loss_cfg.weight_reg * len(r.gradnorm.tasks))}


# What each ablation row changes, as {claim: holds}: a new row of train.ABLATIONS is a KeyError
# here until it has its check. Each claim fails when the row's switch is ignored.
ROW_CHECKS = {
    "full": everything_present,
    "w/o BDAM": lambda r: {"no BDAM": r.model.bdam is None, "no clothing feature": r.out["f_clo"] is None,
                           "GradNorm's tasks": r.gradnorm.tasks == ("info", "triplet")},
    "w/o cross-attention": lambda r: {
        "no cross-attention modules": all(layer.cross_id is layer.cross_clo is None for layer in r.model.bdam.layers),
        "clothing stream ignores identity": not clothing_reads_identity(r.model.bdam)},
    "w/o BDAM gate": lambda r: {"no gate": r.model.bdam.gate is None and r.out["bdam_gate"] is None},
    "shallow BDAM": lambda r: {"one BDAM layer": len(r.model.bdam.layers) == 1},
    "w/o fusion": lambda r: {"no fusion": r.model.fusion is None and "fusion_scores" not in r.out,
                             **without_loss(r, "fusion")},
    "w/o Mamba": lambda r: {"no Mamba": not any(isinstance(m, mamba_triton.Mamba) for m in r.model.modules()),
                            "MLP layers": all(isinstance(m, ResidualMLP) for m in r.model.fusion.layers)},
    "w/o fusion gate": lambda r: {"no gate": r.model.fusion.gate is None,
                                  "x_p = (v_p + t) / 2": fusion_mixes_equally(r.model),
                                  "W_img = 0.5": bool((r.out["fusion_gate"] == 0.5).all())},
    "w/o alignment": lambda r: {"one linear map each": all(isinstance(a, torch.nn.Linear) for a in (
                                    r.model.fusion.align_image, r.model.fusion.align_text))},
    "w/o L_aln": lambda r: {**without_loss(r, "aln"), "no clothing projections": r.model.clothing_image_proj is None
                            and r.model.clothing_text_proj is None and "clo_image" not in r.out},
    "w/o L_decouple": lambda r: without_loss(r, "decouple"),
    "w/o L_info": lambda r: without_loss(r, "info"),
    "w/o L_tri": lambda r: without_loss(r, "triplet"),
    "w/o GradNorm": lambda r: {"every weight stays 1": all(w == 1 for w in r.weights)},
    "w/o weight regulariser": lambda r: {"no regulariser": r.gradnorm.reg_lambda == 0 and regulariser(r.gradnorm) == 0,
                                         "weights learned": any(w != 1 for w in r.weights)},
}


def row_configs(row: str, model_cfg: ModelConfig) -> train.Configs:
    """A row of train.ABLATIONS on `model_cfg` and the paper's losses: its flags read by train.py's
    parser (each field to the config that owns it), checked as train.py checks them."""
    _, args = train.parse_config(shlex.split(train.ABLATIONS[row]))
    assert not given(args, "train") and not given(args, "retrieval"), row  # a row changes the model and losses
    cfgs = train.Configs(train.TrainConfig(weight_decay=0.0, amp="off"),
                         dataclasses.replace(model_cfg, **given(args, "model")),
                         dataclasses.replace(LossConfig(), **given(args, "loss")), RetrievalConfig())
    train.check_configs(cfgs)
    return cfgs


@pytest.mark.parametrize("row", list(train.ABLATIONS))
@pytest.mark.parametrize("synth_preset", [False, True], ids=["paper switches", "synth preset switches"])
def test_every_ablation_row_makes_its_change_and_trains(row, synth_preset, batch):
    """Each row on the paper's switches, and on the SynthPEDES preset's (frozen, cached text
    layers): the change it makes (ROW_CHECKS), finite losses, and one step of
    train.py's (GradNorm and the regulariser are applied there) that moves the vision encoder."""
    torch.manual_seed(0)
    preset = dict(text_frozen_layers=1) if synth_preset else {}
    cfgs = row_configs(row, tiny(**preset))
    state = train.State.create(cfgs, torch.device("cpu"), total_steps=1)
    vision = [p.detach().clone() for p in state.model.vision.parameters()]
    out = state.model(batch)
    losses = compute_losses(out, batch, cfgs.loss)
    assert list(losses) == cfgs.loss.loss_names() and all(torch.isfinite(v) for v in losses.values())
    assert "fusion" not in losses or list(losses)[-1] == "fusion"  # GradNorm.backward's subtraction
    log_row = train.train_step(state, batch)
    weights = [log_row[f"w_{task}"] for task in state.gradnorm.tasks]
    r = types.SimpleNamespace(loss_cfg=cfgs.loss, model=state.model, out=out, losses=losses, gradnorm=state.gradnorm,
                              weights=weights)
    claims = ROW_CHECKS[row](r)
    assert all(claims.values()), {claim: holds for claim, holds in claims.items() if not holds}
    assert any(not torch.equal(a, b) for a, b in zip(vision, state.model.vision.parameters()))


def test_small_configuration_with_minilm_runs(batch):
    torch.manual_seed(0)
    model = T2IReID(ModelConfig.small(image_size=(64, 32))).eval()
    assert model.text.config.hidden_size == 384  # the real all-MiniLM-L6-v2
    with torch.no_grad():
        losses = compute_losses(model(batch), batch, LossConfig())
    assert all(torch.isfinite(v) for v in losses.values())


def test_hub_name_offline_fails_with_a_clear_message():
    with pytest.raises(EncoderLoadError, match="vision_model.*google/vit-base-patch16-224.*local folder"):
        T2IReID(tiny(vision_model="google/vit-base-patch16-224", conv_stem=False))
    with pytest.raises(EncoderLoadError, match="text_model: the folder ./no/such/bert does not exist"):
        T2IReID(tiny(text_model="./no/such/bert"))


def test_config_rejects_inconsistent_switches(capsys):
    def check(model_cfg, **loss_fields):
        train.check_configs(train.Configs(train.TrainConfig(), model_cfg, LossConfig(**loss_fields), RetrievalConfig()))

    # the paper's losses train the clothing stream
    with pytest.raises(ValueError, match="loss_aln needs the clothing stream .*: set loss_aln=False"):
        check(tiny(use_bdam=False))
    with pytest.raises(ValueError, match="loss_aln needs the clothing stream .*: set loss_aln=False"):
        check(tiny(clothing_stream=False))
    with pytest.raises(ValueError, match="use_bdam=False leaves no clothing feature: set loss_aln=False"):
        check(tiny(use_bdam=False), loss_aln=False)
    with pytest.raises(ValueError, match="use_fusion=False: set loss_fusion=False too"):
        check(tiny(use_fusion=False))
    check(tiny(use_bdam=False), loss_aln=False, loss_decouple=False)  # "w/o BDAM": consistent
    with pytest.raises(SystemExit):
        train.parse_config(["--use-fusion", "false"])  # a row must switch both
    assert "use_fusion=False: set loss_fusion=False too" in capsys.readouterr().err
    cfgs, _ = train.parse_config(["--ablation", "w/o fusion"])  # each field to its owner
    assert cfgs.model.use_fusion is False and cfgs.loss.loss_fusion is False and not hasattr(cfgs.model, "loss_fusion")
    with pytest.raises(ValueError, match="hsic_kernel"):
        LossConfig(hsic_kernel="gaussian")
    with pytest.raises(ValueError, match="every loss is switched off"):
        LossConfig(loss_aln=False, loss_decouple=False, loss_info=False, loss_triplet=False, loss_fusion=False)
    with pytest.raises(ValueError, match="bdam_pooling"):
        tiny(bdam_pooling="max")
    with pytest.raises(ValueError, match="conv_stem"):
        ModelConfig(conv_stem=True)  # the paper's pretrained ViT-B/16 keeps its patch projection
    assert tiny(image_size=[64, 32]).image_size == (64, 32)  # from a JSON config


def test_images_of_the_wrong_size_are_a_clear_error():
    model = T2IReID(tiny())
    with pytest.raises(ValueError, match="image_size"):
        model.encode_images(torch.randn(1, 3, 128, 64))


@pytest.mark.parametrize("frozen", [0, 1])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(batch, frozen):
    """--grad-checkpoint (devices.checkpoint_activations): the ViT's, the text encoder's and
    BDAM's layers recomputed in the backward give the same losses and the same gradient on every
    parameter, dropout on (0.1, the same seed: the recomputation restores the RNG state), with
    and without frozen text layers (model.text_features runs the layers above them itself).
    Tolerances: fp32, the same arithmetic in the same order; 1e-6 relative, 1e-7 absolute."""
    from helpers.devices import checkpoint_activations
    loss_cfg, results = LossConfig(), []
    for checkpointed in (False, True):
        torch.manual_seed(0)  # fusion_candidates 2: the fusion's pairs are not checkpointed
        model = T2IReID(tiny(dropout=0.1, text_frozen_layers=frozen, fusion_candidates=2)).train()
        if checkpointed:
            checkpoint_activations(model)
        torch.manual_seed(1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            losses = compute_losses(model(batch), batch, loss_cfg)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sum(saved)))
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7)
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 50
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert ckpt_saved < 0.6 * plain_saved  # the layers' activations were not kept


def attention_by_hand(layer, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """x + softmax(Q K^T / sqrt(d)) V W_o + b_o per head, Q, K, V from the packed in-projection of
    the normalised x and context (Vaswani et al. 2017, Eq. 1), written with einsum."""
    a = layer.attn
    q = layer.norm(x)
    kv = q if context is None else layer.norm_context(context)
    w_q, w_k, w_v = a.in_proj_weight.chunk(3)
    b_q, b_k, b_v = a.in_proj_bias.chunk(3)
    split = lambda t: t.unflatten(-1, (a.num_heads, a.head_dim))  # noqa: E731  (B, L, H, d)
    queries, keys, values = split(q @ w_q.T + b_q), split(kv @ w_k.T + b_k), split(kv @ w_v.T + b_v)
    weights = torch.einsum("bphd,bqhd->bhpq", queries, keys).div(a.head_dim ** 0.5).softmax(-1)  # (B, H, P, P')
    heads = torch.einsum("bhpq,bqhd->bphd", weights, values).flatten(2)  # (B, P, D)
    return x + heads @ a.out_proj.weight.T + a.out_proj.bias


@pytest.mark.parametrize("cross", [False, True])
def test_bdam_attention_is_multi_head_attention_by_hand_in_eval_mode(cross):
    """model.Attention (nn.MultiheadAttention) against the formula, with and without a context;
    fp32, 1e-5. Dropout is on (0.1) but inactive in eval mode."""
    from model import Attention
    torch.manual_seed(0)
    layer = Attention(48, 4, dropout=0.1, cross=cross).eval()
    x, context = torch.randn(3, 7, 48), torch.randn(3, 5, 48) if cross else None
    torch.testing.assert_close(layer(x, context), attention_by_hand(layer, x, context), rtol=1e-5, atol=1e-5)


def test_bdam_layer_state_dict_names_are_those_of_the_saved_checkpoints():
    """The parameter names of a BDAM layer as checkpoints before issue 37 hold them."""
    from model import BDAMLayer
    attention = lambda name, cross: [f"{name}.norm.weight", f"{name}.norm.bias"] + (  # noqa: E731
        [f"{name}.norm_context.weight", f"{name}.norm_context.bias"] if cross else []) + [
        f"{name}.attn.in_proj_weight", f"{name}.attn.in_proj_bias", f"{name}.attn.out_proj.weight",
        f"{name}.attn.out_proj.bias"]
    ffn = lambda name: [f"{name}.net.{i}.{p}" for i in (0, 1, 4) for p in ("weight", "bias")]  # noqa: E731
    saved = [*attention("self_id", False), *attention("self_clo", False), *attention("cross_id", True),
             *attention("cross_clo", True), *ffn("ffn_id"), *ffn("ffn_clo")]
    assert list(BDAMLayer(8, 2, 0.1, cross=True).state_dict()) == saved
