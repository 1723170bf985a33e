"""Generation: token-exact with transformers' generate (greedy, beam search, logits processors, sampling with
the same RNG stream), cached decoding equal to full recomputation for every position encoding and both caches.
Tiny random models on CPU, fp32."""

import argparse
import json

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from fat5 import FAT5Config, FAT5ForConditionalGeneration
from fat5.cache import DynamicCache, StaticCache
from fat5.generation import add_generate_command, generate
from fat5.hf import load_hf_t5

VOCAB, EOS, PAD = 96, 1, 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: intra-op threads only add overhead (10x slower on a busy 2-core CI box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_hf(variant: str) -> T5ForConditionalGeneration:
    tied = variant == "t5-v1.0"
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        feed_forward_proj="relu" if tied else "gated-gelu",
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        if not tied:  # transformers >= 5 ties lm_head at init; real v1.1 checkpoints are untied
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
            # tied random models mostly copy their input token: let the decoder layers dominate the residual
            if tied and n.startswith("decoder") and n.endswith((".o.weight", ".wo.weight")):
                p.mul_(6.0)
        out = model.shared.weight if tied else model.lm_head.weight
        out[EOS] *= 2.0  # EOS now and then, so per-sequence stopping is exercised
        if not tied:
            out[PAD] *= 0.0  # and no runs of the pad token
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (6, 13), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 7), (2, 3), (4, 10), (5, 1)):  # different lengths, one of a single token
        mask[row, n:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.fixture(scope="module", params=["t5-v1.0", "t5-v1.1"])
def pair(request, tmp_path_factory):
    hf = make_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_hf_t5(path).eval()


CASES = [
    dict(),
    dict(num_beams=4),
    dict(num_beams=4, length_penalty=0.6, early_stopping=True),
    dict(num_beams=4, length_penalty=0.6, early_stopping=False),
    dict(num_beams=4, early_stopping=True),
    dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=3),
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    dict(min_new_tokens=6),
    dict(num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=3),
    dict(max_length=7),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "greedy")
def test_token_exact_with_transformers(pair, kw):
    hf, ours = pair
    ids, mask = inputs()
    kw = {"max_new_tokens": 14, **kw} if "max_length" not in kw else kw
    expected = hf.generate(input_ids=ids, attention_mask=mask, **kw)
    for cache in ("dynamic", "static"):
        got = generate(ours, ids, mask, cache_implementation=cache, **kw)
        assert torch.equal(got, expected), (cache, got, expected)


def test_models_stop_at_eos_sometimes(pair):
    hf, _ = pair
    ids, mask = inputs()
    for kw in (dict(), dict(num_beams=4)):
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, **kw)
        stopped = (out == EOS).any(dim=1)
        assert stopped.any() and not stopped.all(), out  # the parity tests see both kinds of rows


def test_model_method_and_return_dict(pair):
    hf, ours = pair
    ids, mask = inputs()
    out = ours.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        num_beams=2,
        num_return_sequences=2,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[0] == 12 and out.sequences_scores.shape == (12,)
    ref = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, num_return_sequences=2
    )
    assert torch.equal(out.sequences, ref)


def test_sampling_matches_transformers_rng_stream(pair):
    """Same global seed, same torch.multinomial calls: sampling with warpers is token-exact too."""
    hf, ours = pair
    ids, mask = inputs()
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, num_return_sequences=2)
    torch.manual_seed(123)
    expected = hf.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(123)
    got = generate(ours, ids, mask, **kw)
    assert torch.equal(got, expected)
    # beam sampling draws from renormalised beam scores, where last-bit differences between two fp32
    # implementations can flip a draw: check it is reproducible and well-formed rather than HF-exact
    torch.manual_seed(7)
    a = generate(ours, ids, mask, max_new_tokens=6, do_sample=True, num_beams=3)
    torch.manual_seed(7)
    b = generate(ours, ids, mask, max_new_tokens=6, do_sample=True, num_beams=3)
    assert torch.equal(a, b) and a.shape[0] == ids.shape[0]


def test_sampling_with_generator_is_reproducible(pair):
    _, ours = pair
    ids, mask = inputs()

    def run(seed, **kw):
        return generate(
            ours,
            ids,
            mask,
            max_new_tokens=12,
            do_sample=True,
            num_return_sequences=3,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )

    a, b = run(5), run(5, cache_implementation="static")
    assert torch.equal(a, b) and a.shape[0] == 18
    assert not torch.equal(a, run(6))
    assert not torch.equal(a[0::3], a[1::3])  # return sequences of one input differ
    # degenerate warpers are greedy
    greedy = generate(ours, ids, mask, max_new_tokens=12)
    for kw in (dict(top_k=1), dict(top_p=1e-9), dict(temperature=1e-4)):
        out = generate(
            ours,
            ids,
            mask,
            max_new_tokens=12,
            do_sample=True,
            generator=torch.Generator().manual_seed(0),
            **kw,
        )
        assert torch.equal(out, greedy), kw


def test_top_k_samples_only_top_tokens(pair):
    _, ours = pair
    ids, mask = inputs()
    out = generate(
        ours,
        ids,
        mask,
        max_new_tokens=1,
        do_sample=True,
        top_k=3,
        num_return_sequences=50,
        generator=torch.Generator().manual_seed(0),
    )
    logits = ours(
        input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(6, 1, dtype=torch.long)
    ).logits
    top3 = logits[:, 0].topk(3).indices
    picked = out[:, 1].view(6, 50)
    assert all(set(picked[i].tolist()) <= set(top3[i].tolist()) for i in range(6))
    assert len(set(picked[0].tolist())) > 1


def test_min_new_tokens_and_pad_after_eos(pair):
    _, ours = pair
    ids, mask = inputs()
    out = generate(ours, ids, mask, max_new_tokens=8, min_new_tokens=8)
    assert out.shape == (6, 9) and not (out[:, 1:] == EOS).any()
    out = generate(ours, ids, mask, max_new_tokens=14)
    for row in out.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])


@pytest.mark.parametrize("pe", ["t5", "rope", "alibi", "fire", "none"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_decoding_equals_full_recompute(pe, cache_kind):
    torch.manual_seed(0)
    cfg = FAT5Config.from_preset(
        "tiny",
        vocab_size=80,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        position_encoding=pe,
        fire_init_threshold=4.0,
    )
    model = FAT5ForConditionalGeneration(cfg).eval()
    ids, mask = inputs()
    ids = ids % 80
    dec = torch.randint(2, 80, (6, 9))
    dec[:, 0] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        cache = DynamicCache() if cache_kind == "dynamic" else StaticCache.for_model(model, 6, 12)
        enc = model.encode(ids, mask)
        from fat5.model import BaseModelOutput

        parts, start = [], 0
        for stop in (3, 4, 5, 6, 7, 8, 9):  # a 3-token prefill, then one token at a time
            out = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                attention_mask=mask,
                decoder_input_ids=dec[:, start:stop],
                past_key_values=cache,
            )
            parts.append(out.logits)
            start = stop
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=0), (
        (torch.cat(parts, 1) - full).abs().max()
    )
    # and generate's two caches agree on these models (the cross K/V path of generation.py)
    a = generate(model, ids, mask, max_new_tokens=6, num_beams=2, cache_implementation="dynamic")
    b = generate(model, ids, mask, max_new_tokens=6, num_beams=2, cache_implementation="static")
    assert torch.equal(a, b)


def test_static_cache_reorder_and_bounds():
    c = StaticCache(batch=3, num_layers=1, num_heads=2, head_dim=4, max_len=2)
    k = torch.arange(3.0)[:, None, None, None].expand(3, 2, 1, 4)
    keys, _, valid = c.update(0, k, k, None)
    c.advance(1)
    assert valid[:, 0].all() and not valid[:, 1].any() and int(c.offset) == 1
    ptr = keys.data_ptr()
    c.reorder(torch.tensor([2, 2, 0]))
    assert c.keys[0].data_ptr() == ptr and c.keys[0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    c.update(0, k, k, None)
    c.advance(1)
    with pytest.raises(ValueError, match="holds 2 decoder tokens"):
        c.update(0, k, k, None)


def test_bad_arguments_are_named(pair):
    _, ours = pair
    ids, mask = inputs()
    with pytest.raises(TypeError, match="num_beam_groups, typo_kwarg"):
        generate(ours, ids, mask, typo_kwarg=1, num_beam_groups=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(ours, ids, mask, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="greedy"):
        generate(ours, ids, mask, num_return_sequences=2)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(ours, ids, mask[:, :3])
    with pytest.raises(ValueError, match="early_stopping"):
        generate(ours, ids, mask, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="use_cuda_graph"):
        generate(ours, ids, mask, use_cuda_graph=True)


class _CharTokenizer:
    """Stands in for AutoTokenizer in the CLI test (no tokenizer files offline): one id per character."""

    def __len__(self):
        return 50

    def get_vocab(self):
        return {chr(40 + i): i for i in range(50)}

    def __call__(self, texts, return_tensors=None, padding=False, truncation=False, max_length=None):
        if isinstance(texts, str):
            return argparse.Namespace(input_ids=[2 + ord(c) % 40 for c in texts])
        rows = [[2 + ord(c) % 40 for c in t][:max_length] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return argparse.Namespace(
            input_ids=ids,
            attention_mask=(torch.arange(n) < torch.tensor([len(r) for r in rows])[:, None]).long(),
        )

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_cli_writes_json_lines(tmp_path, monkeypatch, capsys):
    import transformers

    model = FAT5ForConditionalGeneration(
        FAT5Config.from_preset("tiny", vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4)
    )
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: _CharTokenizer())
    )
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers(dest="cmd"))
    (tmp_path / "in.txt").write_text("hello world\n\nsecond line\n")
    args = parser.parse_args(
        [
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--file",
            str(tmp_path / "in.txt"),
            "--max-new-tokens",
            "4",
            "--num-beams",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["input"] for x in lines] == ["hello world", "second line"] and all("output" in x for x in lines)
    args = parser.parse_args(["generate", "--model", str(tmp_path / "m"), "--demo", "--device", "cpu"])
    args.func(args)
    assert capsys.readouterr().out.count("output:") == 3


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_per_input_cross_kv_equals_repeated(cache_kind):
    """Cross K/V and encoder mask once per input (r decoder rows each: queries grouped in Attention) give
    the logits of K/V and mask repeated per row, for a multi-token pass and single-token steps."""
    from fat5.model import BaseModelOutput

    torch.manual_seed(0)
    cfg = FAT5Config.from_preset("tiny", vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_heads=4)
    model = FAT5ForConditionalGeneration(cfg).eval()
    ids, mask = inputs()
    ids, r = ids % 80, 3
    dec = torch.randint(2, 80, (6 * r, 5))
    dec[:, 0] = 0

    def run(per_input: bool):
        enc = model.encode(ids, mask)
        m = mask
        if not per_input:
            enc, m = enc.repeat_interleave(r, 0), mask.repeat_interleave(r, 0)
        cache = DynamicCache() if cache_kind == "dynamic" else StaticCache.for_model(model, 6 * r, 8)
        for i, layer in enumerate(model.decoder.layers):
            cache.set_cross(i, *layer.cross_attn.cross_kv(enc))
        assert cache.get_cross(0)[0].shape[0] == (6 if per_input else 6 * r)
        parts = []
        for start, stop in ((0, 3), (3, 4), (4, 5)):
            out = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                attention_mask=m,
                decoder_input_ids=dec[:, start:stop],
                past_key_values=cache,
            )
            parts.append(out.logits)
        return torch.cat(parts, 1)

    with torch.no_grad():
        grouped, repeated = run(True), run(False)
        full = model(
            input_ids=ids.repeat_interleave(r, 0),
            attention_mask=mask.repeat_interleave(r, 0),
            decoder_input_ids=dec,
        ).logits
    assert (grouped - repeated).abs().max() <= 1e-6
    assert torch.allclose(grouped, full, atol=1e-5, rtol=0)


def test_per_input_cross_attention_with_segments():
    """The grouped-query cross-attention keeps per-row decoder segment ids against per-input encoder ones."""
    from fat5.model import Attention, AttentionContext

    torch.manual_seed(0)
    cfg = FAT5Config.from_preset("tiny", vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_heads=4)
    att = Attention(cfg, causal=False, cross=True).eval()
    b, r, m, n = 3, 2, 4, 7
    x, enc = torch.randn(b * r, m, 32), torch.randn(b, n, 32)
    kpm = torch.rand(b, n) > 0.3
    kpm[:, 0] = True
    enc_seg = torch.randint(0, 2, (b, n))
    dec_seg = torch.randint(0, 2, (b * r, m))
    with torch.no_grad():
        grouped_cache, rep_cache = DynamicCache(), DynamicCache()
        grouped_cache.set_cross(0, *att.cross_kv(enc))
        rep_cache.set_cross(0, *(t.repeat_interleave(r, 0) for t in att.cross_kv(enc)))
        ctx = AttentionContext(segment_ids=dec_seg, enc_key_padding_mask=kpm, enc_segment_ids=enc_seg)
        grouped = att(x, ctx, cache=grouped_cache)
        ctx = AttentionContext(
            segment_ids=dec_seg,
            enc_key_padding_mask=kpm.repeat_interleave(r, 0),
            enc_segment_ids=enc_seg.repeat_interleave(r, 0),
        )
        repeated = att(x, ctx, cache=rep_cache)
        direct = att(x, ctx, kv_input=enc.repeat_interleave(r, 0))
    assert (grouped - repeated).abs().max() <= 1e-6 and torch.equal(repeated, direct)


def test_generate_keeps_cross_kv_per_input(pair, monkeypatch):
    """generate stores cross K/V once per input, and beam reordering never moves a row to another input."""
    _, ours = pair
    ids, mask = inputs()
    seen = []
    for cls in (DynamicCache, StaticCache):
        orig = cls.reorder

        def spy(self, index, cross=True, _orig=orig):
            seen.append((index.clone(), self.cross_kv[0][0].shape[0]))
            return _orig(self, index, cross)

        monkeypatch.setattr(cls, "reorder", spy)
    for cache in ("dynamic", "static"):
        generate(ours, ids, mask, max_new_tokens=6, num_beams=3, cache_implementation=cache)
    assert seen
    rows = torch.arange(6 * 3)
    for index, cross_rows in seen:
        assert cross_rows == 6
        assert torch.equal(index // 3, rows // 3), index


def test_cache_reorder_leaves_per_input_cross_kv():
    k_row = torch.arange(4.0)[:, None, None, None].expand(4, 2, 3, 4)
    k_in = torch.arange(2.0)[:, None, None, None].expand(2, 2, 3, 4)
    index = torch.tensor([1, 1, 2, 3])
    for c in (DynamicCache(), StaticCache(batch=4, num_layers=2, num_heads=2, head_dim=4, max_len=2)):
        c.set_cross(0, k_row.clone(), k_row.clone())
        c.set_cross(1, k_in.clone(), k_in.clone())
        c.reorder(index)
        assert c.get_cross(0)[0][:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 3.0]  # per row: follows the rows
        assert c.get_cross(1)[0][:, 0, 0, 0].tolist() == [0.0, 1.0]  # per input: untouched
