"""LoRA: peft adapters on the DiT, the files diffusers and ComfyUI load, merging, training.

The exported files are checked against what users load them with: diffusers' own
``WanPipeline.load_lora_weights`` (the original-format file through diffusers' Wan LoRA
conversion) must give the output of our model with the adapter merged.
"""

import json
from pathlib import Path

import pytest
import torch
from test_dit_train import _cfg, setup  # noqa: F401  (the tiny latents fixture)
from test_latents import cached_text_encoder

from vidgen.data.video import decode_frames
from vidgen.models.dit import WanDiT, load_dit
from vidgen.models.dit.lora import (
    DIFFUSERS_FILE,
    INFO_FILE,
    WAN_FILE,
    adapted_modules,
    add_lora,
    export_lora,
    lora_tensors,
    merge_lora,
    read_lora,
)
from vidgen.run import train
from vidgen.tools import convert_dit
from vidgen.utils.checkpoint import load_checkpoint_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2)
ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2: a lost scale shows


@pytest.fixture(autouse=True)
def _one_text_encoder(monkeypatch):
    import vidgen.text

    monkeypatch.setattr(vidgen.text, "build_text_encoder", cached_text_encoder)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A tiny diffusers Wan transformer (every weight perturbed), converted, with a random LoRA
    exported to <root>/lora."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(**TINY)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(root / "diffusers")
    convert_dit.from_diffusers(str(root / "diffusers"), str(root / "base"))
    adapted = WanDiT.from_pretrained(root / "base").eval()
    names = add_lora(adapted, rank=RANK, alpha=ALPHA)
    with torch.no_grad():  # lora_B starts at zero: give the adapter an effect
        for p in lora_tensors(adapted).values():
            p.normal_(0.0, 0.3)
    export_lora(lora_tensors(adapted), root / "lora", RANK, ALPHA, dict(base=str(root / "base")))
    return root, adapted, names


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 5, 8, generator=g), torch.tensor([0.3, 0.7])


def test_default_targets_are_attention_qkvo_and_both_ffn_linears(wan):
    _, adapted, names = wan
    per_block = sorted(n.split(".", 2)[2] for n in names if n.startswith("blocks.0."))
    assert per_block == sorted([f"{a}.{p}" for a in ("self_attn", "cross_attn")
                                for p in ("to_q", "to_k", "to_v", "to_out")] + ["ffn.0", "ffn.2"])
    assert len(names) == 2 * 10 and adapted_modules(adapted) == names
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == set(lora_tensors(adapted)) and len(trainable) == 2 * len(names)


def test_merged_model_equals_the_peft_forward(wan):
    root, adapted, _ = wan
    base = WanDiT.from_pretrained(root / "base").eval()
    x, ctx, t = _inputs()
    with torch.no_grad():
        before = base(x, t, ctx)
        assert merge_lora(base, read_lora(root / "lora")) == 20
        merged, peft_out = base(x, t, ctx), adapted(x, t, ctx)
    assert (peft_out - before).abs().max() > 0.5  # the adapter matters
    torch.testing.assert_close(merged, peft_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight_name", [DIFFUSERS_FILE, WAN_FILE])
def test_wan_pipeline_loads_either_file_and_matches_our_merged_model(wan, weight_name):
    root, _, _ = wan
    transformer = diffusers.WanTransformer3DModel.from_pretrained(root / "diffusers").eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                 scheduler=diffusers.UniPCMultistepScheduler())
    pipe.load_lora_weights(str(root / "lora"), weight_name=weight_name)
    ours = load_dit(root / "base", lora=root / "lora").eval()
    x, ctx, t = _inputs(2)
    padded = torch.nn.functional.pad(ctx, (0, 0, 0, convert_dit.WAN_TEXT_LEN - ctx.shape[1]))
    with torch.no_grad():
        theirs = pipe.transformer(x, 1000 * t, padded).sample
        plain = diffusers.WanTransformer3DModel.from_pretrained(root / "diffusers").eval()(x, 1000 * t, padded).sample
        torch.testing.assert_close(ours(x, t, ctx), theirs, atol=1e-5, rtol=1e-5)
    assert (theirs - plain).abs().max() > 0.5, "diffusers ignored the LoRA"


def test_files_use_each_tools_keys_without_peft_default(wan):
    from safetensors.torch import load_file

    root, _, _ = wan
    d, w = load_file(root / "lora" / DIFFUSERS_FILE), load_file(root / "lora" / WAN_FILE)
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in d
    assert "transformer.blocks.1.attn2.to_out.0.lora_B.weight" in d
    assert "transformer.blocks.0.ffn.net.0.proj.lora_A.weight" in d
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in w
    assert "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in w
    assert float(w["diffusion_model.blocks.0.ffn.2.alpha"]) == ALPHA
    assert not [k for k in (*d, *w) if ".default" in k]
    # the scale survives in both: folded into diffusers' lora_B, stored as alpha in Wan's
    key = "blocks.0.self_attn.to_q"
    torch.testing.assert_close(d["transformer.blocks.0.attn1.to_q.lora_B.weight"],
                               w["diffusion_model.blocks.0.self_attn.q.lora_B.weight"] * ALPHA / RANK)
    torch.testing.assert_close(read_lora(root / "lora" / WAN_FILE)[key][1], read_lora(root / "lora")[key][1])
    info = json.loads((root / "lora" / INFO_FILE).read_text())
    assert (info["rank"], info["alpha"], info["modules"]) == (RANK, ALPHA, 20)


def test_a_lora_for_another_base_is_an_error_naming_the_module_and_both_shapes(wan, tmp_path):
    root, _, _ = wan
    other = WanDiT(**{**WanDiT.from_pretrained(root / "base").config, "ffn_dim": 40})
    with pytest.raises(ValueError, match=r"'blocks.0.ffn.0': lora_B \(32, 4\) @ lora_A \(4, 24\) "
                                         r"does not fit the base weight \(40, 24\)"):
        merge_lora(other, read_lora(root / "lora"))
    deeper = read_lora(root / "lora")
    deeper["blocks.5.self_attn.to_q"] = deeper["blocks.0.self_attn.to_q"]
    base = WanDiT.from_pretrained(root / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="'blocks.5.self_attn.to_q' is not a linear layer of this base DiT"):
        merge_lora(base, deeper)
    for k, v in base.state_dict().items():  # checked before any change: nothing half-merged
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds no adapter"):
        merge_lora(base, {})
    from safetensors.torch import save_file

    save_file({"transformer.blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="is not a LoRA tensor"):
        read_lora(tmp_path / "full.safetensors")
    with pytest.raises(FileNotFoundError, match="neither a .safetensors file nor a folder holding"):
        read_lora(tmp_path)


def test_peft_default_keys_read_like_diffusers_ones(wan, tmp_path):
    from safetensors.torch import save_file

    root, adapted, _ = wan
    save_file({k: v.detach().contiguous() for k, v in lora_tensors(adapted).items()}, tmp_path / "peft.safetensors")
    ours, peft_keys = read_lora(root / "lora"), read_lora(tmp_path / "peft.safetensors")
    assert sorted(ours) == sorted(peft_keys)
    # peft's raw file has no alpha: its B is unscaled (the scale lives in peft's config)
    torch.testing.assert_close(peft_keys["blocks.0.ffn.2"][1] * ALPHA / RANK, ours["blocks.0.ffn.2"][1])


# ---------------------------------------------------------------- training


LORA = f"model.lora={{rank: {RANK}, alpha: {ALPHA}}}"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, setup):  # noqa: F811
    run = tmp_path_factory.mktemp("lora_base") / "s1"
    train(_cfg(run, setup, "demo/dit_stage1", "trainer.max_steps=20", "optim.lr=3e-3",
               "optim.warmup_steps=2", "trainer.limit_val_batches=0"))
    return run


def test_lora_run_trains_the_adapters_only_and_exports_them(tmp_path, setup, base_run):  # noqa: F811
    run = tmp_path / "lora"
    train(_cfg(run, setup, "demo/dit_stage1", f"model.init_from={base_run}", LORA, "model.ema=null",
               "trainer.max_steps=4", "optim.lr=1e-2"))
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    keys = sorted(ckpt["state_dict"])
    assert keys and all(".lora_A.default." in k or ".lora_B.default." in k for k in keys), keys[:4]
    assert len(keys) == 2 * 2 * 10  # 2 blocks x 10 linears x (A, B): no base weight saved
    assert len(ckpt["optimizer_states"][0]["state"]) == len(keys)  # only the adapters optimised
    assert not (run / "dit").exists() and (run / "lora" / DIFFUSERS_FILE).is_file()
    info = json.loads((run / "lora" / INFO_FILE).read_text())
    assert info["base"] == str(base_run) and info["steps"] == 4 and info["pipeline"]["text_encoder"] == "minilm"
    # the export is the trained adapter: merged into the base it predicts as the trained module
    from hydra.utils import instantiate

    module = instantiate(_cfg(run, setup, "demo/dit_stage1", f"model.init_from={base_run}", LORA,
                              "model.ema=null").model)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    base, merged = load_dit(base_run), load_dit(base_run, lora=run / "lora")
    for name, p in module.dit.named_parameters():  # the base stayed as it was
        if ".base_layer." in name:
            torch.testing.assert_close(p, base.state_dict()[name.replace(".base_layer", "")], rtol=0, atol=0)
    x, ctx, t = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 6, 384), torch.tensor([0.5])
    with torch.no_grad():
        expected = module.dit.eval()(x, t, ctx)
        scale = expected.abs().max()
        torch.testing.assert_close(merged(x, t, ctx), expected, atol=1e-5 * scale, rtol=0)
        moved = (base(x, t, ctx) - expected).abs().max() / scale
        assert moved > 1e-3, moved  # training moved the adapters, 100x more than the rounding above
    with pytest.raises(ValueError, match="is a LoRA run: it exported adapters"):
        load_dit(run)
    with pytest.raises(ValueError, match="LoRA run's checkpoint: it holds the adapters"):
        load_dit(run / "checkpoints" / "last.ckpt")


def test_lora_resume_equals_uninterrupted_run_with_ema_of_the_adapters(tmp_path, setup, base_run):  # noqa: F811
    common = [f"model.init_from={base_run}", LORA, "trainer.limit_val_batches=0",
              "data.train.batches_per_epoch=3", "model.ema.warmup_steps=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(full, setup, "demo/dit_stage1", "trainer.max_steps=6", *common))
    train(_cfg(part, setup, "demo/dit_stage1", "trainer.max_steps=3", *common))
    train(_cfg(part, setup, "demo/dit_stage1", "trainer.max_steps=6", "ckpt_path=last", *common))
    a = load_checkpoint_file(full / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(part / "checkpoints" / "last.ckpt")
    assert sorted(a["vidgen"]["ema"]["shadow"]) == sorted(k[len("dit."):] for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs after resume")
    for k, v in a["vidgen"]["ema"]["shadow"].items():
        torch.testing.assert_close(v, b["vidgen"]["ema"]["shadow"][k], rtol=0, atol=0)
    # a full run cannot resume from a LoRA checkpoint (nor the other way round)
    with pytest.raises(ValueError, match="checkpoint is from a LoRA run and this run is a full run"):
        train(_cfg(part, setup, "demo/dit_stage1", "trainer.max_steps=7", "ckpt_path=last",
                   f"model.init_from={base_run}", "trainer.limit_val_batches=0"))


def test_sample_and_merge_tool_use_the_lora(tmp_path, setup, base_run):  # noqa: F811
    from hydra import compose, initialize_config_dir

    from vidgen.sample import run as sample_run
    from vidgen.tools import merge_lora as tool

    run = tmp_path / "lora"
    train(_cfg(run, setup, "demo/dit_stage1", f"model.init_from={base_run}", LORA, "model.ema=null",
               "trainer.max_steps=3", "optim.lr=1e-2", "trainer.limit_val_batches=0"))
    merged = tmp_path / "merged"
    tool.main(["--base", str(base_run), "--lora", str(run / "lora"), "--out", str(merged)])
    expected = load_dit(base_run, lora=run / "lora").state_dict()
    for k, v in WanDiT.from_pretrained(merged).state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    pipeline = json.loads((merged / "pipeline.json").read_text())
    assert pipeline["vae"] == str(setup / "vae") and pipeline["merged_lora"]["scale"] == 1.0

    def sample(out, ckpt=base_run, *extra):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("sample", overrides=[f"ckpt={ckpt}", "prompt=a red circle moves left",
                                               "num_frames=9", "height=32", "width=32", "steps=2",
                                               "device=cpu", f"out={out}", *extra])
        (path,) = sample_run(cfg)
        return decode_frames(Path(path).read_bytes(), list(range(9))), path

    a, path = sample(tmp_path / "a", base_run, f"lora={run / 'lora'}", "lora_scale=1.0")
    sidecar = json.loads(Path(path).with_suffix(".json").read_text())
    assert sidecar["lora"] == str((run / "lora").resolve()) and sidecar["lora_scale"] == 1.0
    b, _ = sample(tmp_path / "b", merged)  # the merged folder samples the same
    c, _ = sample(tmp_path / "c")  # the base alone
    assert (a == b).all() and (a != c).any()


def _adapters(run):
    return load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]


def test_lora_composes_with_compiled_blocks_and_activation_checkpointing(tmp_path, setup, base_run):  # noqa: F811
    common = [f"model.init_from={base_run}", LORA, "model.ema=null", "trainer.max_steps=2",
              "trainer.limit_val_batches=0", "data.train.batches_per_epoch=2", "optim.lr=1e-2"]
    train(_cfg(tmp_path / "eager", setup, "demo/dit_stage1", *common))
    train(_cfg(tmp_path / "both", setup, "demo/dit_stage1", "model.compile=true",
               "model.activation_checkpointing=true", *common))
    a, b = _adapters(tmp_path / "eager"), _adapters(tmp_path / "both")
    assert a.keys() == b.keys()
    assert max(v.abs().max() for k, v in a.items() if ".lora_B." in k) > 1e-3  # B left zero
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_lora_on_a_bf16_base_under_mixed_precision(tmp_path, setup, base_run):  # noqa: F811
    common = [f"model.init_from={base_run}", "model.ema=null", "trainer.max_steps=2",
              "trainer.limit_val_batches=0", "data.train.batches_per_epoch=2", "optim.lr=1e-2"]
    bf16 = f"model.lora={{rank: {RANK}, alpha: {ALPHA}, base_dtype: bfloat16}}"
    with pytest.raises(Exception, match="base_dtype=bfloat16 needs autocast: set trainer.precision=bf16-mixed"):
        train(_cfg(tmp_path / "fp32", setup, "demo/dit_stage1", bf16, "trainer.precision=32-true", *common))
    metrics = train(_cfg(tmp_path / "bf16", setup, "demo/dit_stage1", bf16, "trainer.precision=bf16-mixed", *common))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    adapters = _adapters(tmp_path / "bf16")
    assert {v.dtype for v in adapters.values()} == {torch.float32}  # the adapters stay fp32
    assert max(v.abs().max() for k, v in adapters.items() if ".lora_B." in k) > 1e-3
    lora = read_lora(tmp_path / "bf16" / "lora")
    assert len(lora) == 20
