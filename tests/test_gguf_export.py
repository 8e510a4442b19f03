"""merge.gguf: GGUF files that transformers (and so llama.cpp's readers) load back as the merged model.

Bounds on logits, relative to the largest logit: float32 is exact up to float32 arithmetic; the other
types round every weight once with unit roundoff u (bf16 2^-8, f16 2^-11, Q8_0 half a step of a
block's 127 levels, 1/254), and a logit sums those errors over three layers, the embedding and the
head with mixed signs: 8u bounds what we see (about 1 to 2u) with room to spare.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models as tm
import torch
from abliterate import (
    ablation,
    architecture,
    editors,
    gguf_convert,
    gguf_export,
    gguf_patch,
    loading,
    merging,
)
from abliterate.errors import ConfigError
from tiny_tokenizer import CHATML
from transformers import AutoModelForCausalLM, AutoTokenizer

ROUNDOFF = {"f32": 1e-6, "f16": 2**-11, "bf16": 2**-8, "q8_0": 1 / 254}
PROMPTS = ["hello world, how are you today?", "the quick brown fox", "jumps over the lazy dog"]
PARAMS = ablation.AblationParams(direction_index=1.3, kernels={
    "attn_out": ablation.Kernel(1.2, 1.0, 0.3, 1.5), "mlp_down": ablation.Kernel(0.9, 2.0, 0.1, 2.0)})


def bpe_tokenizer():
    """A byte-level BPE tokenizer with merges (llama.cpp needs them) and a ChatML template, trained
    offline in milliseconds; 3 specials, ids 0-2 as in tiny_models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tm.VOCAB, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"])
    core.train_from_iterator(PROMPTS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def model_dir(path: Path, model) -> Path:
    model.save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


def tiny_qwen2(tied: bool):
    """Qwen2 (q/k/v biases) with head_dim = hidden / heads, which its GGUF config implies; tied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**tm._COMMON, "head_dim": tm.HIDDEN // tm.HEADS, "tie_word_embeddings": tied})
    return tm._build(Qwen2ForCausalLM, config)


def logits(model, tok) -> torch.Tensor:
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**batch).logits


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def assert_within_type(got, expected, kind):
    bound = 8 * ROUNDOFF[kind] * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= bound


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_converted_llama_loads_back_as_the_merged_model(tmp_path, kind):
    src = model_dir(tmp_path / "model", tm.tiny_llama())
    out = tmp_path / "gguf" / "run.gguf"
    facts = gguf_export.export(src, tmp_path / "no-adapter", out, kind, metadata={"config_hash": "x"})
    assert facts["source_kind"] == "safetensors" and facts["architecture"] == "llama"
    assert gguf_export.describe(out) == facts and facts["bytes"] == out.stat().st_size and facts["type"] == kind
    tok, ref = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src).eval()
    back_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    # the tokenizer and chat template travel in the file: the same ids for the same text
    assert back_tok(PROMPTS)["input_ids"] == tok(PROMPTS)["input_ids"]
    assert back_tok.chat_template == tok.chat_template
    assert_within_type(logits(load_gguf(out), tok), logits(ref, tok), kind)
    assert sorted(p.name for p in out.parent.iterdir()) == ["gguf.json", "run.gguf"]  # no temporaries


@pytest.mark.parametrize("tied", [True, False])
def test_converted_qwen2_keeps_biases_and_the_tied_head(tmp_path, tied):
    src = model_dir(tmp_path / "model", tiny_qwen2(tied))
    out = tmp_path / "run.gguf"
    gguf_convert.convert(src, out, gguf_export.qtype("f32"))
    tok, ref = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src).eval()
    back = load_gguf(out)
    assert back.config.tie_word_embeddings == tied
    assert_within_type(logits(back, tok), logits(ref, tok), "f32")


def test_converted_qwen3_keeps_the_q_k_norms(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # transformers reads no head_dim from a qwen3 GGUF and takes Qwen3Config's default, 128
    src = model_dir(tmp_path / "model", tm._build(Qwen3ForCausalLM, Qwen3Config(**{**tm._COMMON, "head_dim": 128})))
    out = tmp_path / "run.gguf"
    gguf_convert.convert(src, out, gguf_export.qtype("f32"))
    tok, ref = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src).eval()
    assert_within_type(logits(load_gguf(out), tok), logits(ref, tok), "f32")


def _gguf_source(tmp_path: Path) -> Path:
    """A tiny Q8_0 GGUF model: the kind of file a user downloads."""
    source = tmp_path / "src" / "tiny-q8_0.gguf"
    gguf_convert.convert(model_dir(tmp_path / "hf", tm.tiny_llama()), source, gguf_export.qtype("q8_0"))
    return source


def _merged_from_gguf(tmp_path: Path, source: Path) -> tuple[Path, Path]:
    """What the workflow does with a GGUF source: convert it (gguf_model), ablate, export, merge."""
    base = tmp_path / "base_model"
    loading.convert_gguf(loading.ModelSource(path=str(source.parent), gguf_file=source.name), base, {})
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    layout = architecture.discover(model)
    torch.manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(layout.n_layers + 1, layout.hidden_size), dim=-1)
    ablator = editors.LoraEditor(model, layout, directions)
    ablator.apply(PARAMS)
    ablator.save(tmp_path / "adapter")
    merging.merge(loading.ModelSource(path=str(base)), str(tmp_path / "adapter"), str(tmp_path / "model"),
                  max_ram_gib=4, metadata={}, card="")
    return tmp_path / "model", tmp_path / "adapter"


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_gguf_source_keeps_every_unedited_byte(tmp_path, kind):
    from gguf import GGUFReader

    source = _gguf_source(tmp_path)
    merged, adapter = _merged_from_gguf(tmp_path, source)
    out = tmp_path / "out" / "run.gguf"
    facts = gguf_export.export(merged, adapter, out, kind, source_gguf=source)
    edited = {f"blk.{i}.{n}.weight" for i in range(tm.LAYERS) for n in ("attn_output", "ffn_down")}
    assert set(facts["replaced"]) == edited and facts["source_kind"] == "gguf"

    src, new = GGUFReader(source), GGUFReader(out)
    head = src.tensors[0].field.offset
    assert bytes(new.data[:head]) == bytes(src.data[:head])  # every metadata key and value, byte for byte
    by_name = {t.name: t for t in new.tensors}
    assert [t.name for t in new.tensors] == [t.name for t in src.tensors]
    for t in src.tensors:
        got = by_name[t.name]
        assert list(got.shape) == list(t.shape)
        if t.name in edited:
            assert got.tensor_type.name == kind.upper()
        else:
            assert got.tensor_type == t.tensor_type and bytes(got.data) == bytes(t.data)
    tok, ref = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    # unedited tensors dequantise to exactly the merged model's; only the edited ones are rounded
    assert_within_type(logits(load_gguf(out), tok), logits(ref, tok), kind)


def test_gguf_source_writes_nothing_when_interrupted(tmp_path, monkeypatch):
    source = _gguf_source(tmp_path)
    merged, adapter = _merged_from_gguf(tmp_path, source)
    written = []

    def fail_midway(blob):  # the tensor data section, after a few tensors are in the temporary file
        written.append(blob)
        if len(written) == 5:
            raise KeyboardInterrupt
        return memoryview(blob)

    monkeypatch.setattr(gguf_patch, "memoryview", fail_midway, raising=False)
    out = tmp_path / "out" / "run.gguf"
    with pytest.raises(KeyboardInterrupt):
        gguf_export.export(merged, adapter, out, "f32", source_gguf=source)
    assert len(written) == 5 and list(out.parent.iterdir()) == []


def test_unwritable_type_names_the_key():
    with pytest.raises(ConfigError, match=r"merge\.gguf: 'q4_k_m'.*llama-quantize"):
        gguf_export.qtype("q4_k_m")
    with pytest.raises(ConfigError, match=r"merge\.gguf.*merge\.adapter_only"):
        gguf_export.check_config({"merge": {"gguf": "q8_0", "adapter_only": True}})


def tiny_gemma3(tied: bool = True):
    """Gemma 3 text with head_dim 256 and query_pre_attn_scalar = head_dim: transformers reads no
    query_pre_attn_scalar from a GGUF (Gemma3TextConfig's default is 256) and llama.cpp scales by head_dim.
    A sliding window shorter than the prompts, so the local layers' masks matter; random norm weights,
    so the (1 + weight) shift is exercised."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**{**tm._COMMON, "head_dim": 256, "tie_word_embeddings": tied}, sliding_window=4,
                              query_pre_attn_scalar=256)
    model = tm._build(Gemma3ForCausalLM, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_converted_gemma3_text_loads_back_as_the_merged_model(tmp_path, kind):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    src = model_dir(tmp_path / "model", tiny_gemma3())
    out = tmp_path / "run.gguf"
    assert gguf_convert.convert(src, out, gguf_export.qtype(kind))["architecture"] == "gemma3"
    tok, ref = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src).eval()
    assert max(len(ids) for ids in tok(PROMPTS)["input_ids"]) > ref.config.sliding_window
    back = load_gguf(out)
    assert back.config.model_type == "gemma3_text" and back.config.tie_word_embeddings
    assert_within_type(logits(back, tok), logits(ref, tok), kind)
    # llama.cpp's gemma3 graph multiplies by the stored norm weight: it must hold Gemma's 1 + weight
    reader = GGUFReader(out)
    stored = {t.name: t for t in reader.tensors}["blk.0.post_ffw_norm.weight"]
    hf = load_file(src / "model.safetensors")["model.layers.0.post_feedforward_layernorm.weight"]
    assert torch.equal(torch.from_numpy(stored.data.copy()), hf + 1)
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 4


@pytest.mark.parametrize(("change", "why"), [
    ({"query_pre_attn_scalar": 128}, "query_pre_attn_scalar 128 is not head_dim 256"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is set"),
    ({"hidden_activation": "silu"}, "MLP activation silu"),
    ({"layer_types": ["full_attention"] * tm.LAYERS}, "fixed pattern"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}}, "RoPE base 50000"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "RoPE scaling"),
])
def test_gemma3_that_llama_cpp_runs_differently_names_the_key(change, why):
    config = tiny_gemma3().config
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError, match=rf"merge\.gguf: this Gemma 3's .*{why}.*merge\.gguf: null"):
        gguf_convert.check_architecture(config)


def test_sentencepiece_tokenizer_names_the_key_before_writing(tmp_path):
    """Gemma's own tokenizer is SentencePiece-style (Metaspace, byte fallback), which llama.cpp stores
    as its "llama" tokenizer model; this converter writes byte-level BPE only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator(PROMPTS * 20, trainers.BpeTrainer(vocab_size=tm.VOCAB, special_tokens=["<pad>", "<unk>"]))
    src = tmp_path / "model"
    tiny_gemma3().save_pretrained(src)
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>").save_pretrained(src)
    out = tmp_path / "out" / "run.gguf"
    with pytest.raises(ConfigError, match=r"merge\.gguf: the tokenizer is BPE with a Metaspace decoder.*Gemma"):
        gguf_export.export(src, tmp_path / "adapter", out, "f16")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_architecture_without_a_tensor_map_fails_before_writing(tmp_path):
    src = model_dir(tmp_path / "model", tm.tiny_gpt2())
    out = tmp_path / "out" / "run.gguf"
    with pytest.raises(ConfigError, match=r"merge\.gguf: gpt2 is an architecture without a tensor map"):
        gguf_export.export(src, tmp_path / "adapter", out, "f16")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_unreadable_source_names_model_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ConfigError, match=r"model\.gguf_file: the gguf package cannot read"):
        gguf_patch.read(bad)


def test_unknown_tensor_type_names_model_gguf_file(tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "model.gguf"
    gguf_convert.convert(model_dir(tmp_path / "model", tm.tiny_llama()), path, gguf_export.qtype("f32"))
    info = GGUFReader(path).tensors[0].field
    at = info.offset + sum(int(p.nbytes) for p in info.parts[:4])  # name length, name, n_dims, dims; then type
    data = bytearray(path.read_bytes())
    data[at:at + 4] = (250).to_bytes(4, "little")  # a type no gguf release defines
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"model\.gguf_file: the gguf package cannot read .*250"):
        gguf_patch.read(path)
