"""Text encoders: MiniLM offline from its package, a tiny local umT5, caption dropout."""

import pytest
import torch

from vidgen.text import MiniLMEncoder, T5Encoder, build_text_encoder, drop_captions, trim_padding


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def test_minilm_gives_384d_token_embeddings_offline(minilm):
    assert isinstance(minilm, MiniLMEncoder) and minilm.dim == 384
    emb, mask = minilm.encode(["a red car drives on the road at night", "a cat", ""])
    assert emb.shape[0] == 3 and emb.shape[2] == 384 and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.shape == emb.shape[:2]
    assert mask.sum(1).tolist()[2] >= 1  # the empty caption still has [CLS] [SEP]
    assert (emb[~mask] == 0).all() and emb[mask].abs().sum() > 0
    assert not any(p.requires_grad for p in minilm.model.parameters())
    # a caption's embedding does not depend on what it was batched with
    alone, alone_mask = minilm.encode(["a cat"])
    torch.testing.assert_close(
        trim_padding(emb, mask)[1], trim_padding(alone, alone_mask)[0], atol=1e-5, rtol=1e-5
    )


@pytest.fixture(scope="module")
def tiny_umt5_dir(tmp_path_factory):
    """A random 2-layer umT5 encoder plus a Unigram tokenizer, both built offline."""
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    words = ["a", "cat", "dog", "runs", "on", "the", "grass", "red", "car"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(words)]
    vocab += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    path = tmp_path_factory.mktemp("umt5")
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(path)
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4
    )
    UMT5EncoderModel(config).save_pretrained(path)
    return path


def test_t5_encoder_loads_a_local_umt5(tiny_umt5_dir):
    enc = build_text_encoder(str(tiny_umt5_dir), max_length=6)
    assert isinstance(enc, T5Encoder) and enc.dim == 16 and enc.max_length == 6
    emb, mask = enc.encode(["a cat runs on the grass", "a dog", ""])
    assert emb.shape == (3, 6, 16) and mask.sum(1).tolist() == [6, 3, 1]  # truncated, ends in </s>
    assert (emb[~mask] == 0).all() and torch.isfinite(emb).all()


def test_missing_and_unknown_encoders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="T5 encoder directory .*nope.* not found"):
        T5Encoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        build_text_encoder("umt5-xxl")


def test_drop_captions():
    captions = [f"caption {i}" for i in range(200)]
    assert drop_captions(captions, 0.0) == captions
    assert drop_captions(captions, 1.0) == [""] * 200
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert dropped == drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert 5 < dropped.count("") < 40
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    with pytest.raises(ValueError, match=r"caption dropout p must be in \[0, 1\], got 1.5"):
        drop_captions(captions, 1.5)


def test_a_diffusers_pipeline_text_encoder_folder_embeds_as_wan_pipeline(tiny_umt5_dir, tmp_path):
    """Wan2.1-T2V-*-Diffusers keeps text_encoder/ and tokenizer/ apart: our encoder finds the
    tokenizer, and its real tokens zero-padded to 512 are WanPipeline's prompt embeddings."""
    import shutil

    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer, UMT5EncoderModel

    for sub, pattern in (("text_encoder", "*.json"), ("tokenizer", "*")):
        (tmp_path / sub).mkdir()
        for f in tiny_umt5_dir.glob(pattern):
            if sub == "tokenizer" or f.name == "config.json":
                shutil.copy(f, tmp_path / sub / f.name)
    for f in tiny_umt5_dir.glob("*.safetensors"):
        shutil.copy(f, tmp_path / "text_encoder" / f.name)
    ours = build_text_encoder(str(tmp_path / "text_encoder"))
    pipe = diffusers.WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(tmp_path / "text_encoder").eval(),
        transformer=None, vae=None, scheduler=diffusers.UniPCMultistepScheduler())
    captions = ["a red car on the grass", "a dog"]
    theirs = pipe._get_t5_prompt_embeds(captions, max_sequence_length=512, dtype=torch.float32)
    texts = trim_padding(*ours.encode(captions))
    assert [len(t) for t in texts] == [7, 3] and theirs.shape == (2, 512, 16)
    for t, padded in zip(texts, theirs):
        torch.testing.assert_close(t, padded[: len(t)], atol=1e-6, rtol=1e-5)
        assert (padded[len(t):] == 0).all()
