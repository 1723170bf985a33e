"""Text generation for FAT5 encoder-decoders: greedy, sampling and beam search with a KV cache.

``generate(model, input_ids, ...)`` takes the Hugging Face keyword names and reproduces ``transformers``'
``generate`` token for token (greedy, beam search and their logits processors: repetition penalty, no-repeat
n-grams, min_new_tokens; sampling warpers temperature / top-k / top-p in HF's order). The encoder runs once;
the cross-attention keys/values are computed once per input and stored once per input (not repeated per beam
or returned sequence: the decoder's cross-attention stacks the queries of an input's rows against them, and
beam reordering leaves them alone) in the cache before the first decoder step, so every decoder step has the
same shape.

Speed on CUDA: a ``StaticCache`` (preallocated buffers, offset as a device tensor) and the whole decoder step
(embedding -> decoder -> logits, plus the beam reorder of the cache) captured once in a CUDA graph and
replayed per token, so a step costs one graph launch instead of ~1000 kernel launches. Token selection and
the beam bookkeeping run eagerly on the device between replays; the "all finished?" host check runs every
few steps and the output is trimmed to the length HF would return. The last captured graph is kept on the
model and reused by calls with the same shapes (its memory stays allocated until the next capture).

Beam search is a transcription of ``transformers.GenerationMixin._beam_search`` (5.x, vectorised): top
``2 * num_beams`` candidates over ``num_beams * vocab``, the same length penalty, ``early_stopping``
True / False / "never" heuristics, and HF's padding of finished beams (``pad_token_id or eos``: with T5's pad
id 0 that is the EOS id).
Limits: decoder prompts are the start token only; no constrained/contrastive/assisted decoding, no streaming;
``return_dict_in_generate`` returns only ``sequences`` (and ``sequences_scores`` for beams).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from .cache import DynamicCache, StaticCache

_EARLY_STOPPING = (True, False, "never")


# ---------------------------------------------------------------- logits processors (HF semantics)


def _repetition_penalty(ids: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    score = torch.gather(scores, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, ids, score)


def _no_repeat_ngram(ids: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    cur_len = ids.shape[-1]
    if cur_len < n:
        return scores
    # a window whose first n-1 tokens equal the current suffix bans its last token
    prefix = ids[:, cur_len + 1 - n :]
    windows = ids.unfold(dimension=1, size=n, step=1)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    vocab = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def _top_k(scores: torch.Tensor, k: int, min_keep: int) -> torch.Tensor:
    k = min(max(k, min_keep), scores.size(-1))
    return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))


def _top_p(scores: torch.Tensor, p: float, min_keep: int) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -min_keep:] = 0
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))


class _Processors:
    """The logits processors HF builds for these settings, applied in HF's order."""

    def __init__(self, s: dict, eos: torch.Tensor | None, min_keep: int):
        self.s, self.eos, self.min_keep = s, eos, min_keep

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.s
        if s["repetition_penalty"] != 1.0:
            scores = _repetition_penalty(ids, scores, s["repetition_penalty"])
        if s["no_repeat_ngram_size"] > 0:
            scores = _no_repeat_ngram(ids, scores, s["no_repeat_ngram_size"])
        # decoder prompt is one token (the start token): new tokens so far = ids.shape[1] - 1
        if s["min_new_tokens"] > 0 and self.eos is not None and ids.shape[1] - 1 < s["min_new_tokens"]:
            scores = scores.index_fill(1, self.eos, -math.inf)
        if s["do_sample"]:
            if s["temperature"] != 1.0:
                scores = scores / s["temperature"]
            if s["top_k"]:
                scores = _top_k(scores, s["top_k"], self.min_keep)
            if s["top_p"] is not None and s["top_p"] < 1.0:
                scores = _top_p(scores, s["top_p"], self.min_keep)
        return scores


# ---------------------------------------------------------------- one decoder step, eager or CUDA graph


def _attention_upcasts(t: torch.Tensor) -> bool:
    """True when ops.attention runs the plain-PyTorch reference for ``t`` (it computes in fp32, converting K
    and V on every call)."""
    from . import ops

    return not ops.use_kernels(t)


def _cross_kv(model, enc: torch.Tensor):
    """Per layer (K, V) (B, H, N, D) of the cross-attention, once per input: the decoder rows of one input
    (its beams / returned sequences, consecutive) share them (``Attention``'s cross branch groups their
    queries). For the reference attention on CUDA they are stored in fp32: it would upcast them anyway (so
    the numbers are identical), and converting them twice per layer per step shows in a large-batch step."""
    out = []
    upcast = _attention_upcasts(enc) and enc.is_cuda
    for layer in model.decoder.layers:
        k, v = layer.cross_attn.cross_kv(enc)
        if upcast:
            k, v = k.float(), v.float()
        out.append((k, v))
    return out


class _Step:
    """tokens (R,) [+ beam reorder index (R,)] -> next-token logits (R, V) in float32. The R = B * r rows are
    r consecutive rows per input; cross K/V and the encoder mask (B, N) are per input."""

    def __init__(self, model, rows: int, max_len: int, static: bool, enc_mask: torch.Tensor | None):
        self.model, self.rows, self.max_len = model, rows, max_len
        self.cache = StaticCache.for_model(model, rows, max_len) if static else DynamicCache()
        self.enc_mask = enc_mask

    def load(self, cross_kv, enc_mask) -> None:
        if isinstance(self.cache, StaticCache):
            self.cache.reset()
        for i, (k, v) in enumerate(cross_kv):
            self.cache.set_cross(i, k, v)
        if enc_mask is not None and self.enc_mask is not None and self.enc_mask is not enc_mask:
            self.enc_mask.copy_(enc_mask)
        else:
            self.enc_mask = enc_mask

    def body(self, tokens: torch.Tensor, reorder: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        if reorder is not None:
            # beam search: row i takes a row of its own input (index // r == i // r), so the per-input
            # cross K/V (which reorder never touches) stay right
            self.cache.reorder(reorder)
        # encoder_hidden_states=None: the cross K/V are always cached already
        h = m.decoder(
            m.shared(tokens[:, None]),
            None,
            None,
            encoder_hidden_states=None,
            encoder_attention_mask=self.enc_mask,
            cache=self.cache,
        )
        return F.linear(m._decoder_output(h[:, -1]), m._output_weight()).float()

    def __call__(self, tokens, reorder=None):
        return self.body(tokens, reorder)


class _GraphStep(_Step):
    """The step captured in a CUDA graph: static token / index buffers in, a static logits buffer out."""

    def __init__(self, model, rows, max_len, enc_mask, beams: bool):
        super().__init__(model, rows, max_len, True, None if enc_mask is None else enc_mask.clone())
        dev = model.shared.weight.device
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.idx = torch.arange(rows, device=dev) if beams else None
        self.graph = None

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: cuBLAS handles and workspaces outside the capture
            for _ in range(2):
                self.body(self.tok, self.idx)
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.body(self.tok, self.idx)
        self.cache.reset()  # the capture ran the Python side of advance() once

    def __call__(self, tokens, reorder=None):
        self.tok.copy_(tokens)
        if self.idx is not None:
            if reorder is None:
                torch.arange(self.rows, out=self.idx)
            else:
                self.idx.copy_(reorder)
        if self.cache.host_offset + 1 > self.max_len:
            raise ValueError(f"decoder step past the static cache's {self.max_len} slots")
        self.graph.replay()
        self.cache.host_advance(1)
        return self.out


def _make_step(model, enc, enc_mask, expand, max_len, cache_impl, use_graph, beams):
    rows = enc.shape[0] * expand
    cross = _cross_kv(model, enc)
    if not use_graph:
        step = _Step(model, rows, max_len, cache_impl == "static", None)
        step.load(cross, enc_mask)
        return step
    from . import ops

    key = (
        rows,
        max_len,
        enc.shape[0],  # the cross K/V and encoder mask buffers are per input: (B, H, N, D), (B, N)
        enc.shape[1],
        enc_mask is not None,
        beams,
        enc.dtype,
        enc.device,
        ops.get_backend(),
        tuple(p.data_ptr() for p in model.parameters()),
    )
    cached = getattr(model, "_fat5_graph_step", None)
    if cached is not None and cached[0] == key:
        step = cached[1]
        step.load(cross, enc_mask)
        return step
    model._fat5_graph_step = None  # free the previous graph's memory before capturing a new one
    step = _GraphStep(model, rows, max_len, enc_mask, beams)
    step.load(cross, enc_mask)
    step.capture()
    model._fat5_graph_step = (key, step)
    return step


# ---------------------------------------------------------------- decoding loops


def _greedy_or_sample(step, rows, max_length, start, pad, eos, processors, do_sample, generator, check_every):
    dev = step.model.shared.weight.device
    seqs = torch.full((rows, max_length), pad if pad is not None else 0, dtype=torch.long, device=dev)
    seqs[:, 0] = start
    unfinished = torch.ones(rows, dtype=torch.bool, device=dev)
    n_steps = torch.zeros((), dtype=torch.long, device=dev)  # steps HF would run (it stops when all finished)
    tokens = seqs[:, 0]
    for t in range(1, max_length):
        scores = processors(seqs[:, :t], step(tokens))
        if do_sample:
            nxt = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        n_steps += unfinished.any()
        if eos is not None:
            nxt = torch.where(unfinished, nxt, pad)
            unfinished &= ~torch.isin(nxt, eos)
        seqs[:, t] = nxt
        tokens = nxt
        if eos is not None and t % check_every == 0 and not bool(unfinished.any()):
            break
    return seqs[:, : 1 + int(n_steps)], None


def _gather_beams(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def _beam_search(step, batch, K, max_length, start, pad, eos, processors, s, generator):
    """transformers' ``_beam_search`` with decoder prompt length 1 (see its helper methods for the why)."""
    dev = step.model.shared.weight.device
    lp, early = s["length_penalty"], s["early_stopping"]
    n_eos = eos.shape[0] if eos is not None else 0
    keep = max(2, 1 + n_eos) * K
    top_mask = torch.cat((torch.ones(K, dtype=torch.bool), torch.zeros(keep - K, dtype=torch.bool))).to(dev)
    # HF: ``pad_token_id or eos_token_id[0]``: a pad id of 0 counts as missing
    fill = (pad if pad else int(eos[0])) if eos is not None else -1
    running = torch.full((batch, K, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, 0] = start
    sequences = running.clone()
    running_scores = torch.zeros((batch, K), dtype=torch.float, device=dev)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, K), -1e9, dtype=torch.float, device=dev)
    finished = torch.zeros((batch, K), dtype=torch.bool, device=dev)
    unsatisfied = torch.ones((batch, 1), dtype=torch.bool, device=dev)
    running_bi = torch.full((batch, K, max_length - 1), -1, dtype=torch.int32, device=dev)
    beam_indices = running_bi.clone()
    offsets = torch.arange(batch, device=dev).view(-1, 1) * K
    cur_len, reorder = 1, None
    while True:
        flat = running[:, :, :cur_len].reshape(batch * K, cur_len)
        logits = step(flat[:, -1], reorder)
        vocab = logits.shape[-1]
        log_probs = processors(flat, F.log_softmax(logits, dim=-1))
        log_probs = (log_probs.view(batch, K, vocab) + running_scores[:, :, None]).reshape(batch, K * vocab)
        # c. top `keep` continuations over all beams
        if s["do_sample"]:
            topk_idx = torch.multinomial(F.softmax(log_probs, dim=-1), num_samples=keep, generator=generator)
            topk_lp = torch.gather(log_probs, 1, topk_idx)
        else:
            topk_lp, topk_idx = torch.topk(log_probs, k=keep)
        src_beam = topk_idx // vocab
        topk_bi = _gather_beams(running_bi, src_beam)
        topk_seq = _gather_beams(running, src_beam)
        topk_ids = topk_idx % vocab
        topk_seq[:, :, cur_len] = topk_ids
        topk_bi[:, :, cur_len - 1] = (src_beam + offsets).to(topk_bi.dtype)
        # d. stopping criteria: max length or EOS
        hits = torch.full_like(topk_ids, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos is not None:
            hits = hits | torch.isin(topk_ids, eos)
        # e. the best unfinished continuations keep running
        topk_running_lp = topk_lp + hits.to(torch.float32) * -1.0e9
        nxt = torch.topk(topk_running_lp, k=K)[1]
        running = _gather_beams(topk_seq, nxt)
        running_scores = _gather_beams(topk_running_lp, nxt)
        running_bi = _gather_beams(topk_bi, nxt)
        # f. merge newly finished hypotheses into the finished set
        just_finished = hits & top_mask[None, :]
        cand = topk_lp / (cur_len**lp)
        full = torch.all(finished, dim=-1, keepdim=True) & (early is True)
        cand += full.to(torch.float32) * -1.0e9
        cand += (~unsatisfied).to(torch.float32) * -1.0e9
        cand += (~just_finished) * -1.0e9
        merged_idx = torch.topk(torch.cat((beam_scores, cand), dim=1), k=K)[1]
        sequences = _gather_beams(torch.cat((sequences, topk_seq), dim=1), merged_idx)
        beam_scores = _gather_beams(torch.cat((beam_scores, cand), dim=1), merged_idx)
        beam_indices = _gather_beams(torch.cat((beam_indices, topk_bi), dim=1), merged_idx)
        finished = _gather_beams(torch.cat((finished, just_finished), dim=1), merged_idx)
        # g. cache rows for the next step, and the stopping condition of the whole search
        reorder = running_bi[..., cur_len - 1].reshape(batch * K).long()
        cur_len += 1
        best_len = (max_length - 1) if (early == "never" and lp > 0.0) else (cur_len - 1)
        best_running = running_scores[:, :1] / (best_len**lp)
        worst_done = torch.where(finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        unsatisfied = unsatisfied & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        go_on = torch.any(unsatisfied) & ~(torch.all(finished) & (early is True)) & ~torch.all(hits)
        if not bool(go_on):
            break
    n = s["num_return_sequences"]
    sequences = sequences[:, :n].reshape(batch * n, max_length)
    scores = beam_scores[:, :n].reshape(batch * n)
    beam_indices = beam_indices[:, :n].reshape(batch * n, -1)
    gen_len = int((beam_indices + 1).bool().sum(dim=1).max())
    return sequences[:, : 1 + gen_len], scores


# ---------------------------------------------------------------- public entry point


def _token_ids(value, name) -> list[int] | None:
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else list(value)
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return ids


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_return_sequences: int = 1,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool | None = None,
    cache_implementation: str | None = None,
    return_dict_in_generate: bool = False,
    **unknown,
):
    """Generate decoder tokens for a batch of (padded) inputs; returns (B * num_return_sequences, L) ids
    starting with the decoder start token, like ``transformers``' ``generate`` for T5.

    ``max_new_tokens`` wins over ``max_length`` (which counts the start token); the default is the model's
    ``generation_config.max_length`` (20). ``cache_implementation``: "static" (default on CUDA) or "dynamic"
    (default on CPU). ``use_cuda_graph`` (default: on for CUDA) needs the static cache. As in transformers,
    sampling uses top_k=50 unless ``top_k`` is given (0 disables it).
    """
    if unknown:
        raise TypeError(
            f"generate() got unsupported keyword argument(s): {', '.join(sorted(unknown))}. Supported: "
            "max_new_tokens, max_length, min_new_tokens, num_beams, length_penalty, early_stopping, do_sample, "
            "temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, num_return_sequences, "
            "eos_token_id, pad_token_id, decoder_start_token_id, generator, use_cuda_graph, cache_implementation, "
            "return_dict_in_generate"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got {got}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    c = model.config
    gc = getattr(model, "generation_config", None)
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        max_length = 1 + max_new_tokens
    elif max_length is None:
        max_length = getattr(gc, "max_length", None) or 20
    if max_length < 2:
        raise ValueError(f"max_length counts the decoder start token and must be >= 2, got {max_length}")
    if num_beams < 1 or num_return_sequences < 1:
        raise ValueError(
            f"num_beams and num_return_sequences must be >= 1, got {num_beams}, {num_return_sequences}"
        )
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError("greedy search returns one sequence per input: use do_sample=True or num_beams > 1")
    if early_stopping not in _EARLY_STOPPING:
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if top_k is None:  # transformers' default when sampling is 50 (0 disables)
        top_k = getattr(gc, "top_k", None)
        top_k = 50 if top_k is None else top_k
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if cache_implementation not in (None, "static", "dynamic"):
        raise ValueError(f"cache_implementation must be 'static' or 'dynamic', got {cache_implementation!r}")

    dev = model.shared.weight.device
    input_ids = input_ids.to(dev)
    attention_mask = None if attention_mask is None else attention_mask.to(dev)
    eos = _token_ids(eos_token_id if eos_token_id is not None else c.eos_token_id, "eos_token_id")
    pad = pad_token_id if pad_token_id is not None else c.pad_token_id
    if pad is None and eos is not None:
        pad = eos[0]  # as HF does (with a warning there)
    start = decoder_start_token_id if decoder_start_token_id is not None else c.decoder_start_token_id
    if start is None:
        raise ValueError("no decoder_start_token_id: give one or set it in the model config")
    eos_t = None if eos is None else torch.tensor(eos, dtype=torch.long, device=dev)

    cuda = dev.type == "cuda"
    if cache_implementation is None:
        cache_implementation = "static" if cuda else "dynamic"
    if use_cuda_graph is None:
        use_cuda_graph = cuda and cache_implementation == "static"
    if use_cuda_graph and (not cuda or cache_implementation != "static"):
        raise ValueError("use_cuda_graph=True needs a CUDA model and cache_implementation='static'")

    settings = dict(
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
    )
    # beams keep at least one non-EOS token when warping (HF's min_tokens_to_keep)
    processors = _Processors(settings, eos_t, (len(eos) + 1 if eos else 2) if num_beams > 1 else 1)

    was_training = model.training
    model.eval()
    try:
        enc = model.encode(input_ids, attention_mask)
        expand = num_beams if num_beams > 1 else num_return_sequences
        enc_mask = None if attention_mask is None else attention_mask.bool()  # (B, N): per input, like enc
        step = _make_step(
            model,
            enc,
            enc_mask,
            expand,
            max_length,
            cache_implementation,
            use_cuda_graph,
            beams=num_beams > 1,
        )
        if num_beams > 1:
            seqs, scores = _beam_search(
                step,
                input_ids.shape[0],
                num_beams,
                max_length,
                start,
                pad,
                eos_t,
                processors,
                settings,
                generator,
            )
        else:
            seqs, scores = _greedy_or_sample(
                step,
                enc.shape[0] * expand,
                max_length,
                start,
                pad,
                eos_t,
                processors,
                do_sample,
                generator,
                check_every=8 if cuda else 1,
            )
    finally:
        model.train(was_training)
    if not return_dict_in_generate:
        return seqs
    from transformers.generation.utils import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput

    if num_beams > 1:
        return GenerateBeamEncoderDecoderOutput(sequences=seqs, sequences_scores=scores)
    return GenerateEncoderDecoderOutput(sequences=seqs)


# ---------------------------------------------------------------- command line: fat5 generate

_DEMO_PLAIN = [
    "translate English to German: The house is wonderful.",
    "summarize: The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris.",
    "question: What is the capital of France? context: Paris is the capital and largest city of France.",
]
_DEMO_SPANS = [
    "The <extra_id_0> walks in <extra_id_1> park.",
    "Thank you <extra_id_0> me to your party <extra_id_1> week.",
    "The capital of France is <extra_id_0>, a city famous for <extra_id_1>.",
]


# UL2-pretrained models (mode tokens in the vocabulary) see inputs like their pretraining ones; the
# built-in corpus is Python source, so the demo asks for Python.
_DEMO_UL2 = [
    "[S] import os\nimport sys\n\n\ndef main(",
    "[R] class Point:\n    def __init__(self, x, y):\n        self.<extra_id_0> = x\n        self.y = <extra_id_1>",
    "[R] for i in range(<extra_id_0>):\n    print(<extra_id_1>)",
    "[X] def read(path):\n    <extra_id_0> open(path) as f:\n        return f.<extra_id_1>()",
]


def add_generate_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a fat5 model",
        description="Reads inputs from the arguments, --file (one per line) or stdin; writes JSON lines "
        '{"input": ..., "output": ...} to stdout (--demo: a few built-in inputs, printed readably).',
    )
    p.add_argument("--model", required=True, help="fat5 model folder (save_pretrained / fat5 convert)")
    p.add_argument("--tokenizer", help="tokenizer folder or name (default: the model folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--max-input-length", type=int, default=512, help="longer inputs are truncated (with a warning)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on CUDA")
    p.add_argument("--file", help="input file, one input per line ('-' = stdin)")
    p.add_argument("--demo", action="store_true", help="run on a few built-in inputs and print them readably")
    p.add_argument("texts", nargs="*", help="input texts (default: --file or stdin)")
    p.set_defaults(func=_run_generate)
    return p


def _read_inputs(args) -> list[str]:
    if args.texts:
        return list(args.texts)
    if args.file and args.file != "-":
        with open(args.file, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def _run_generate(args) -> int:
    from transformers import AutoTokenizer

    from .model import FAT5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else None)
    )
    model = FAT5ForConditionalGeneration.from_pretrained(args.model)
    model = model.to(device=args.device, dtype=dtype).eval()
    if len(tok) > model.config.vocab_size:
        raise SystemExit(
            f"tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}: "
            "wrong --tokenizer for this model?"
        )
    if args.demo:
        vocab = tok.get_vocab()
        texts = _DEMO_UL2 if "[R]" in vocab else _DEMO_SPANS if "<extra_id_0>" in vocab else _DEMO_PLAIN
    else:
        texts = _read_inputs(args)
        if not texts:
            raise SystemExit("no inputs: give texts, --file F, or lines on stdin (or --demo)")
    gen = torch.Generator(device=args.device).manual_seed(args.seed) if args.do_sample else None
    drop = {i for i in (model.config.pad_token_id, model.config.eos_token_id) if isinstance(i, int)}
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        generator=gen,
    )
    for i in range(0, len(texts), args.batch_size):
        chunk = texts[i : i + args.batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=args.max_input_length)
        n_cut = sum(len(tok(t).input_ids) > args.max_input_length for t in chunk)
        if n_cut:
            print(f"warning: {n_cut} input(s) truncated to {args.max_input_length} tokens", file=sys.stderr)
        out = generate(model, enc.input_ids.to(args.device), enc.attention_mask.to(args.device), **kw)
        for text, ids in zip(chunk, out.tolist()):
            # keep sentinels (<extra_id_n>) visible: drop only pad / EOS
            decoded = tok.decode([t for t in ids if t not in drop], skip_special_tokens=False)
            if args.demo:
                print(f"input:  {text}\noutput: {decoded}\n")
            else:
                print(json.dumps({"input": text, "output": decoded}, ensure_ascii=False), flush=True)
    return 0
