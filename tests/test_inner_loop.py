
import pytest
import torch

from seal_agent.config import LoraConfig, TrainConfig
from seal_agent.errors import TrainingDiverged
from seal_agent.model import inner_loop
from seal_agent.model.inner_loop import Example, Merged, attach_lora, repeated_blocks, tokenize, train
from seal_agent.model.loader import load_model, load_tokenizer

EXAMPLES = [
    Example("Normans\n", "Rollo led the Norse raiders who settled in Normandy."),
    Example("Normans\n", "The Normans spoke a dialect of Old French."),
    Example("Normans\n", "In 1066 the Normans conquered England."),
]


def eager(**kwargs) -> TrainConfig:
    """A recipe trained without compiling (compiled training has its own tests)."""
    return TrainConfig(compile=False, **kwargs)


@pytest.fixture
def tiny(tiny_model_dir, tiny_cfg):
    return load_model(tiny_model_dir, tiny_cfg), load_tokenizer(tiny_model_dir)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def lora_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_training_lowers_the_loss_and_leaves_base_weights_alone(tiny):
    model, tok = tiny
    before = weights(model)
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = attach_lora(model, LoraConfig(r=8, alpha=16, target_modules=all_linear), seed=0)
    stats = train(peft_model, tok, EXAMPLES, eager(epochs=8, lr=1e-2, seed=0, batch_size=1, pack_tokens=0))
    assert stats.steps == 24 and len(stats.epoch_losses) == 8
    assert stats.epoch_losses[-1] < 0.7 * stats.epoch_losses[0]
    assert stats.tokens > 0 and stats.seconds > 0
    restored = peft_model.unload()
    for k, v in weights(restored).items():
        assert torch.equal(v, before[k]), k


def test_same_seed_same_adapter(tiny):
    model, tok = tiny
    results = []
    for _ in range(2):
        pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=3)
        train(pm, tok, EXAMPLES, eager(epochs=2, lr=1e-3, seed=7, batch_size=1, pack_tokens=0), compute_dtype=torch.float32)
        results.append(lora_weights(pm))
        model = pm.unload()
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_merged_adapter_discards_exactly_and_keeps_what_merge_and_unload_gives(tiny):
    """Merged for checking: the weights are what merge_and_unload makes; discard()
    restores the originals bit for bit (not by subtracting the update)."""
    model, tok = tiny
    before = weights(model)

    def trained():
        pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=3)
        train(pm, tok, EXAMPLES, eager(epochs=2, lr=1e-2, seed=7, batch_size=1, pack_tokens=0),
              compute_dtype=torch.float32)
        return pm

    merged = Merged(trained())
    checked = {k.replace("base_layer.", ""): v.clone()
               for k, v in merged.peft_model.get_base_model().state_dict().items() if "lora_" not in k}
    model = merged.discard()
    assert type(model).__name__ == "LlamaForCausalLM" and not merged.kept
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())
    reference = weights(trained().merge_and_unload())
    assert checked.keys() == reference.keys() and any(not torch.equal(before[k], reference[k]) for k in reference)
    assert all(torch.equal(checked[k], reference[k]) for k in reference)
    model.load_state_dict(before)
    kept = Merged(trained())
    assert all(torch.equal(v, reference[k]) for k, v in weights(kept.keep()).items()) and kept.kept


def test_nan_loss_aborts(tiny):
    model, tok = tiny
    before = weights(model)
    pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    with pytest.raises(TrainingDiverged, match="abandoned"):
        train(pm, tok, EXAMPLES, eager(epochs=3, lr=float("inf"), max_grad_norm=0.0))
    restored = pm.unload()
    assert all(torch.equal(v, before[k]) for k, v in weights(restored).items())


def test_completion_loss_masks_the_prompt(tiny):
    _, tok = tiny
    [(ids_all, labels_all)] = tokenize(tok, EXAMPLES[:1], 2048, "all")
    [(ids_c, labels_c)] = tokenize(tok, EXAMPLES[:1], 2048, "completion")
    assert torch.equal(ids_all, ids_c) and torch.equal(labels_all, ids_all)
    n_prompt = len(tok("Normans\n")["input_ids"])
    assert (labels_c[:n_prompt] == -100).all() and (labels_c[n_prompt:] == ids_c[n_prompt:]).all()
    [(ids_t, _)] = tokenize(tok, EXAMPLES[:1], 5, "all")
    assert len(ids_t) == 5  # truncated to max_length
    [(ids_e, _)] = tokenize(tok, EXAMPLES[:1], 2048, "all", append_eos=True)
    assert ids_e[-1].item() == tok.eos_token_id


def test_batches_pad_without_learning_padding(tiny):
    model, tok = tiny
    pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    stats = train(pm, tok, EXAMPLES, eager(epochs=2, batch_size=2, lr=1e-3, pack_tokens=0))
    assert stats.steps == 4  # ceil(3 / 2) per epoch
    true_tokens = sum(len(t) for t, _ in tokenize(tok, EXAMPLES, 2048, "all"))
    assert stats.tokens == 2 * true_tokens  # padding not counted
    assert all(torch.isfinite(torch.tensor(stats.epoch_losses)))


def test_packing_rows_reset_positions_and_mask_boundaries(tiny):
    from seal_agent.model.inner_loop import _rows

    _, tok = tiny
    data = tokenize(tok, EXAMPLES, 2048, "all")
    lengths = [len(ids) for ids, _ in data]
    rows = list(_rows(data, [0, 1, 2], pack_tokens=lengths[0] + lengths[1]))
    assert len(rows) == 2
    ids, labels, pos = rows[0]
    assert torch.equal(ids, torch.cat([data[0][0], data[1][0]]))
    assert pos.tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    assert labels[lengths[0]] == -100 and labels[0] == data[0][1][0]  # no cross-example prediction
    assert [len(r[0]) for r in _rows(data, [0, 1, 2], pack_tokens=1)] == lengths  # too long: alone
    assert all(r[2] is None for r in _rows(data, [2, 0, 1], pack_tokens=0))


def test_packed_examples_cannot_see_each_other(tiny):
    """What packing relies on: reset position ids give block-diagonal attention."""
    model, tok = tiny
    data = tokenize(tok, EXAMPLES[:2], 2048, "all")
    (a, _), (b, _) = data
    with torch.no_grad():
        la = model(input_ids=a[None], use_cache=False).logits[0]
        lb = model(input_ids=b[None], use_cache=False).logits[0]
        pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
        lp = model(input_ids=torch.cat([a, b])[None], position_ids=pos, use_cache=False).logits[0]
    assert torch.allclose(lp[: len(a)], la, atol=1e-4) and torch.allclose(lp[len(a):], lb, atol=1e-4)


def test_packed_training_takes_fewer_steps_and_learns(tiny):
    model, tok = tiny
    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = attach_lora(model, LoraConfig(r=8, alpha=16, target_modules=all_linear), seed=0)
    stats = train(pm, tok, EXAMPLES, eager(epochs=8, lr=2e-2, pack_tokens=4096, batch_size=1, seed=0))
    assert stats.steps == 8  # one packed row per epoch
    assert stats.tokens == 8 * sum(len(t) for t, _ in tokenize(tok, EXAMPLES, 2048, "all"))
    assert stats.epoch_losses[-1] < 0.7 * stats.epoch_losses[0]
    model = pm.unload()
    pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    stats = train(pm, tok, EXAMPLES, eager(epochs=1, pack_tokens=30, batch_size=2, seed=0))
    assert stats.steps >= 1 and all(torch.isfinite(torch.tensor(stats.epoch_losses)))


def test_bf16_training_holds_frozen_weights_in_bf16_and_restores_them_exactly(tiny):
    from seal_agent.model.precision import weights_in

    model, tok = tiny
    before = weights(model)
    pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    embedding = pm.get_input_embeddings().weight
    with weights_in(pm, torch.bfloat16, training=True):
        assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A["default"].weight.dtype == torch.float32
        assert pm.get_input_embeddings().weight.dtype == torch.float32  # the lookup stays fp32...
        assert pm.get_output_embeddings().weight.dtype == torch.bfloat16  # ...the tied head is held in bf16
    assert q.base_layer.weight.dtype == torch.float32
    assert pm.get_output_embeddings().weight is embedding  # tied again
    stats = train(pm, tok, EXAMPLES, eager(epochs=2, lr=1e-2, seed=0), compute_dtype=torch.bfloat16)
    assert stats.steps > 0 and all(torch.isfinite(torch.tensor(stats.epoch_losses)))
    model = pm.unload()
    after = weights(model)
    assert all(after[k].dtype == torch.float32 and torch.equal(before[k], after[k]) for k in before)


def test_bf16_generation_matches_autocast_and_restores_the_weights(tiny):
    """Generation holds every weight in bf16 for the call: the same tokens as
    autocast casting them at each step, and the fp32 weights untouched after."""
    from seal_agent.model.generation import Sampling, generate

    model, tok = tiny
    before = weights(model)
    prompts = ["The Normans were", "In 1066 the", "Rollo led"]
    sampling = Sampling(max_new_tokens=12)
    ours = generate(model, tok, prompts, sampling, compute_dtype=torch.bfloat16, batch_size=3)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # casts the fp32 weights at every step
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    reference = [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]
    assert ours == reference
    after = weights(model)
    assert all(after[k].dtype == torch.float32 and torch.equal(before[k], after[k]) for k in before)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_compiled_training_matches_eager_compiles_once_and_restores_the_blocks(tiny):
    """Compiled blocks (the default) train the same adapter as eager, up to
    float rounding; a second update with a fresh adapter reuses the compiled
    graphs; afterwards the blocks run their own forward again."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    before = weights(model)
    recipe = {"epochs": 3, "lr": 1e-2, "seed": 0, "batch_size": 2, "pack_tokens": 40}  # packed rows of varying length
    runs = {}
    for compiled in (False, True, True):
        graphs = counters["stats"]["unique_graphs"]
        pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
        stats = train(pm, tok, EXAMPLES, TrainConfig(compile=compiled, **recipe))
        runs.setdefault(compiled, []).append((stats.epoch_losses, lora_weights(pm), counters["stats"]["unique_graphs"] - graphs))
        assert not any("forward" in vars(block) for block in repeated_blocks(pm))
        model = pm.unload()
    assert inner_loop.compile_failure() is None
    [(eager_losses, eager_lora, eager_graphs)] = runs[False]
    (first_losses, first_lora, first_graphs), (second_losses, second_lora, second_graphs) = runs[True]
    assert eager_graphs == 0 and first_graphs >= 1 and second_graphs == 0
    assert first_losses == pytest.approx(eager_losses, rel=1e-4) and second_losses == first_losses
    for k in eager_lora:
        torch.testing.assert_close(first_lora[k], eager_lora[k], rtol=1e-3, atol=1e-5)
        assert torch.equal(second_lora[k], first_lora[k])
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())


def test_training_falls_back_to_eager_when_compiling_fails(tiny, monkeypatch, caplog):
    """No working C++ compiler: a warning, the same adapter as eager training,
    and no further attempts in this process."""
    monkeypatch.setattr(inner_loop.COMPILATION, "failure", None)  # the process-wide fact, restored after
    model, tok = tiny
    recipe = {"epochs": 2, "lr": 1e-2, "seed": 0, "batch_size": 1, "pack_tokens": 0}
    pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    train(pm, tok, EXAMPLES, eager(**recipe))
    reference = lora_weights(pm)
    model = pm.unload()

    torch._dynamo.reset()  # forget graphs compiled by earlier tests
    try:
        with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++",), "force_disable_caches": True}):
            pm = attach_lora(model, LoraConfig(r=4, alpha=8), seed=0)
            stats = train(pm, tok, EXAMPLES, TrainConfig(**recipe))
    finally:
        torch._dynamo.reset()
    assert "compiling the training step failed" in caplog.text and "C++" in inner_loop.compile_failure()
    assert not inner_loop.compiles_next(TrainConfig())  # later updates train eagerly without trying
    assert stats.steps == 6 and len(stats.epoch_losses) == 2
    ours = lora_weights(pm)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert not any("forward" in vars(block) for block in repeated_blocks(pm))
    pm.unload()
