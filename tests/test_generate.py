"""Generation with a KV cache (pysparse.runtime.generate): the step graph of a compiled decoder against
Hugging Face ``generate`` on the same masked dense weights, token for token."""

from __future__ import annotations

import pytest
import torch
import transformers
from pysparse.passes import Compress24, Lower, MagnitudePrune, ReluSubstitution
from tiny_models import bert_with_batches, llama_config

import pysparse
from pysparse.runtime.generate import GenerationError, _mask, generate

THRESHOLD = 0.02  # FATReLU threshold of the act-sparse cases (about half the tiny FFN's neurons)


class _FATReLU(torch.nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= self.t, x, 0.0) if self.t else torch.relu(x)


CASES = {
    "dense-lowered": lambda: [Lower()],
    "2:4": lambda: [MagnitudePrune(), Compress24(), Lower()],
    "act-sparse": lambda: [ReluSubstitution(THRESHOLD), Lower()],
    "2:4+fatrelu": lambda: [ReluSubstitution(THRESHOLD), MagnitudePrune(), Compress24(), Lower()],
}


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(max_position_embeddings=256))
    return model.to(dtype).eval()


def _compiled(case: str, dtype: torch.dtype = torch.float32):
    """(compiled model, the Hugging Face model with the same masked weights and activation)."""
    ref = _model(dtype)
    example = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    passes = CASES[case]()
    # copy_model=False: the mask passes prune ``ref``'s own weights, so ``ref`` is the masked
    # dense model the compiled one must match.
    sm = pysparse.compile(ref, passes, (example,), copy_model=False, generation=True)
    relu = next((p for p in passes if isinstance(p, ReluSubstitution)), None)
    if relu is not None:
        for layer in ref.model.layers:
            layer.mlp.act_fn = _FATReLU(relu.threshold or 0.0)
    return sm, ref


def _hf_greedy(ref, ids, n, attention_mask=None):
    # eos_token_id=None: Hugging Face generates exactly n tokens, as eos_token_id=[] does here;
    # an explicit mask, or it would take every token equal to pad_token_id for padding
    return ref.generate(
        ids,
        attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )


@pytest.fixture(scope="module", params=list(CASES))
def compiled(request):
    return request.param, *_compiled(request.param)


def test_greedy_generation_equals_hugging_face_for_64_tokens(compiled):
    case, sm, ref = compiled
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(5))
    out = sm.generate(ids, max_new_tokens=64, eos_token_id=[])
    assert out.shape == (1, 11 + 64)
    assert torch.equal(out, _hf_greedy(ref, ids, 64)), case
    if case != "dense-lowered":  # the step graph really runs pysparse's kernels
        targets = {str(n.target) for n in sm.step.graph.nodes if n.op == "call_function"}
        assert any(t.startswith("pysparse.") for t in targets), targets


def test_left_padded_batch_equals_each_prompt_alone(compiled):
    case, sm, ref = compiled
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 96, (n,), generator=gen) for n in (5, 12, 1)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    out = sm.generate(ids, mask, max_new_tokens=20, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = _hf_greedy(ref, p[None], 20)[0, len(p) :]
        assert torch.equal(out[i, width:], alone), (case, i)


def test_prompt_longer_than_the_compile_example(compiled):
    case, sm, ref = compiled
    ids = torch.randint(0, 96, (2, 90), generator=torch.Generator().manual_seed(9))
    out = sm.generate(ids, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(out, _hf_greedy(ref, ids, 16)), case


def test_saved_and_loaded_model_generates_the_same(compiled, tmp_path):
    case, sm, _ = compiled
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(11))
    want = sm.generate(ids, max_new_tokens=24, eos_token_id=[])
    pysparse.save(sm, tmp_path / "a")
    assert (tmp_path / "a" / "step.pt2").is_file()
    loaded = pysparse.load(tmp_path / "a")
    assert loaded.can_generate and loaded.cache_spec == sm.cache_spec
    assert torch.equal(loaded.generate(ids, max_new_tokens=24, eos_token_id=[]), want), case
    # one copy of each weight in the file: the step graph's are aliases of the forward graph's
    aliases = loaded.manifest["weights"]["aliases"]
    assert any(k.startswith("step/") for k in aliases)
    step_weights = dict(loaded.step.named_parameters())
    forward_weights = {t.data_ptr() for t in loaded.module.parameters()}
    assert step_weights and all(t.data_ptr() in forward_weights for t in step_weights.values())


def test_eos_stops_each_row_and_pads_finished_rows():
    sm, _ = _compiled("2:4+fatrelu")
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(13))
    free = sm.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 6 + 4])  # row 0's 5th new token
    stop = sm.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    first = {r: next((j for j in range(12) if free[r, 6 + j] == eos), None) for r in (0, 1)}
    assert first[0] is not None and first[0] <= 4
    end = max(j for j in first.values() if j is not None) if None not in first.values() else 11
    assert stop.shape[1] == 6 + end + 1
    for r, j in first.items():
        if j is None:
            assert torch.equal(stop[r], free[r, : stop.shape[1]])
        else:
            assert torch.equal(stop[r, : 6 + j + 1], free[r, : 6 + j + 1])
            assert (stop[r, 6 + j + 1 :] == 0).all()  # finished: padding from then on
    assert sm.last_generation.new_tokens == end + 1


def test_overflowing_the_cache_names_the_limit_and_the_option():
    sm, _ = _compiled("2:4")
    ids = torch.zeros(1, 200, dtype=torch.long)
    with pytest.raises(GenerationError, match=r"over the limit of 256.*max_cache_len=264"):
        sm.generate(ids, max_new_tokens=64)
    with pytest.raises(GenerationError, match=r"--max-cache-len 30"):
        sm.generate(ids[:, :10], max_new_tokens=20, max_cache_len=16)
    out = sm.generate(ids, max_new_tokens=64, max_cache_len=264, eos_token_id=[])
    assert out.shape == (1, 264)


def test_bad_inputs_are_refused_with_the_reason():
    sm, _ = _compiled("2:4")
    with pytest.raises(GenerationError, match="integer token ids"):
        sm.generate(torch.zeros(1, 4), max_new_tokens=2)
    with pytest.raises(GenerationError, match="empty"):
        sm.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(GenerationError, match="attention_mask"):
        sm.generate(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3), max_new_tokens=2)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    sm, _ = _compiled("2:4+fatrelu")
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(17))

    def sample(seed: int, **kw):
        g = torch.Generator().manual_seed(seed)
        return sm.generate(
            ids, max_new_tokens=24, do_sample=True, generator=g, eos_token_id=[], **kw
        )

    a, b, c = sample(0, temperature=1.5), sample(0, temperature=1.5), sample(1, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = sm.generate(ids, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(sample(2, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)  # the nucleus keeps only the top token


def test_streamer_gets_the_prompt_then_every_new_token():
    sm, _ = _compiled("act-sparse")
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(19))

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t.tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = sm.generate(ids, max_new_tokens=9, eos_token_id=[], streamer=rec)
    assert rec.ended and rec.puts[0] == ids.tolist()
    assert [p[0] for p in rec.puts[1:]] == out[0, 4:].tolist()


def test_bf16_step_logits_follow_hugging_face():
    sm, ref = _compiled("2:4+fatrelu", torch.bfloat16)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(23))
    out = sm.generate(ids, max_new_tokens=16, eos_token_id=[])
    spec = sm.cache_spec
    n = out.shape[1] - 1
    shape = (1, spec.kv_heads, n, spec.head_dim)
    keys = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(spec.n_layers)]
    values = [torch.zeros_like(k) for k in keys]
    with torch.no_grad():
        want = ref(out[:, :n]).logits.float()
        worst = 0.0
        for i in range(n):  # the step graph, one token at a time over the same sequence
            pos = torch.tensor([i])
            mask = _mask(torch.ones(1, i + 1, dtype=torch.bool), pos)
            got = sm.step(out[:, i : i + 1], pos[None], pos, mask, keys, values)
            worst = max(worst, (got[0, -1].float() - want[0, i]).abs().max().item())
    # bf16 keeps 8 bits of mantissa: the kernels' fp32 accumulation vs torch's differ by a few
    # bf16 steps of the logits (scale ~1 here), never more than 0.05 measured over seeds
    assert worst < 0.08, worst


def test_encoders_compile_without_generation():
    model, batches = bert_with_batches()
    sm = pysparse.compile(model, ["magnitude", "compress24", "lower"], *batches[0])
    assert not sm.can_generate
    with pytest.raises(GenerationError, match="no generation step graph"):
        sm.generate(torch.zeros(1, 3, dtype=torch.long))


def test_pass_mirror_keeps_one_copy_of_each_weight():
    sm, _ = _compiled("2:4+fatrelu")
    forward = {t.data_ptr() for t in (*sm.gm.parameters(), *sm.gm.buffers())}
    step = [t for t in (*sm.step.parameters(), *sm.step.buffers()) if t.numel() > 1]
    assert step and all(t.data_ptr() in forward for t in step)


def test_step_graph_exports_as_pt2_and_runs_a_generation(tmp_path):
    sm, _ = _compiled("2:4+fatrelu")
    path = pysparse.export(sm, tmp_path / "step.pt2", part="step")
    step = torch.export.load(path).module()
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(29))
    want = sm.generate(ids, max_new_tokens=12, eos_token_id=[])
    got = generate(step, sm.cache_spec, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="pt2 only"):
        pysparse.export(sm, tmp_path / "step.onnx", format="onnx", part="step")
    bert, batches = bert_with_batches()
    encoder = pysparse.compile(bert, ["magnitude", "compress24", "lower"], *batches[0])
    with pytest.raises(ValueError, match="no generation step graph"):
        pysparse.export(encoder, tmp_path / "e.pt2", part="step")


def test_lower_puts_the_step_graphs_attention_and_linears_on_pysparse_ops(compiled):
    """Every linear a decoder keeps dense (the lm_head) runs pysparse::dense_linear, and the step
    graph's attention pysparse::attention; the forward graph keeps torch's attention (its ONNX and
    TorchScript exports translate it)."""
    _, sm, _ = compiled

    def targets(gm):
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]

    step, forward = targets(sm.step), targets(sm.gm)
    p, aten = torch.ops.pysparse, torch.ops.aten
    assert p.dense_linear.default in step and aten.linear.default not in step
    assert p.attention.default in step
    assert aten.scaled_dot_product_attention.default not in step
    assert p.attention.default not in forward
    assert sm.report[-1]["step_attention_lowered"] == sm.cache_spec.n_layers


def test_lower_fuses_sibling_linears_without_changing_a_token(compiled):
    """q, k and v (and a SiLU FFN's gate and up, which no FFN op takes) read one input: Lower
    runs each such set as one op over their stacked weights, in both graphs, with the same
    products as separate ops: the same greedy tokens, the same logits to fp32 rounding."""
    case, sm, _ = compiled
    n_layers = sm.cache_spec.n_layers
    ffn_op = case in ("act-sparse", "2:4+fatrelu")  # a ReLU FFN goes to the FFN op instead
    per_layer = 2 + (0 if ffn_op else 1)  # k and v into q; up into gate
    assert sm.report[-1]["sibling_linears_fused"] == n_layers * per_layer
    p = torch.ops.pysparse
    linears = {p.dense_linear.default, p.sparse24_linear.default}
    for gm in (sm.gm, sm.step):
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in linears]
        # per layer: [q; k; v], o, and [gate; up] + down unless an FFN op took them; the lm_head
        assert len(calls) == n_layers * (2 + (0 if ffn_op else 2)) + 1, case
    # the step graph holds the forward graph's stacked weights, not copies
    stacked = {n: t for n, t in sm.gm.named_buffers() if n.startswith("pysparse__fused__")}
    in_step = {n: t for n, t in sm.step.named_buffers() if n.startswith("pysparse__fused__")}
    assert stacked and in_step.keys() == stacked.keys()
    assert all(t is stacked[n] for n, t in in_step.items())
    torch.manual_seed(0)
    unfused_passes = CASES[case]()
    unfused_passes[-1] = Lower(fuse=False)
    ref = _model()
    example = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    separate = pysparse.compile(ref, unfused_passes, (example,), generation=True)
    assert "sibling_linears_fused" not in separate.report[-1]
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        torch.testing.assert_close(sm(ids).logits, separate(ids).logits, rtol=1e-5, atol=1e-5)
    want = separate.generate(ids, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(sm.generate(ids, max_new_tokens=16, eos_token_id=[]), want)


def test_a_decode_steps_mask_is_the_valid_keys_up_to_its_position():
    """A one-token step's mask is a view of ``valid`` (no ops): the mask the general rule gives,
    left padding included; a query whose own slot is not marked valid takes the general rule."""
    gen = torch.Generator().manual_seed(2)
    for batch, start in ((1, 0), (1, 9), (3, 5), (4, 12)):
        valid = torch.rand(batch, 16, generator=gen) > 0.3
        valid[:, start] = True  # the step before marked the new token's slot
        got = _mask(valid[:, : start + 1], torch.tensor([start]))
        want = valid[:, None, None, : start + 1].clone()  # the valid keys up to and with itself
        assert got.shape == want.shape and torch.equal(got, want), (batch, start)
        if batch == 1:
            assert got.data_ptr() == valid.data_ptr()  # a view, no copy
        valid[0, start] = False  # (a padding query: it still sees itself)
        got = _mask(valid[:, : start + 1], torch.tensor([start]))
        assert bool(got[0, 0, 0, start]) and torch.equal(got[1:], want[1:]), (batch, start)
