"""Streaming merge: the folder equals the whole-model merge's bit for bit, and a full disk leaves nothing."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest
import tiny_models as tm
import torch
from abliterate import architecture, editors, hf_compat, io, loading, merging, streaming_merge
from abliterate.errors import AbliterateError
from safetensors import safe_open
from test_merging import PARAMS, PARAMS_K2, two_directions
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM

SHARD = 40_000  # bytes: every tiny model is split into several shards with an index
# transformers 4.x lacks the internals the streaming merge mirrors: there every merge falls back
streams = pytest.mark.skipif(not hf_compat.mirrors_saving(), reason="this transformers cannot be mirrored; "
                             "test_without_the_internals_the_merge_falls_back covers it")


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _study(tmp_path, factory, dtype=torch.float32, tied=False, route="lora", k=1):
    """A base folder (saved in ``dtype``) and the adapter a study of it exports (``k`` directions)."""
    model = factory()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.to(dtype).save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").float().eval()
    layout = architecture.discover(model)
    torch.manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(layout.n_layers + 1, layout.hidden_size), dim=-1)
    sets = None
    if k > 1:
        directions, sets = two_directions(layout)
    editor = (editors.LoraEditor if route == "lora" else editors.InPlaceEditor)(
        model, layout, directions, direction_sets=sets, n_directions=k)
    editor.apply(PARAMS if k == 1 else PARAMS_K2)
    editor.save(tmp_path / "adapter")
    return loading.ModelSource(path=str(tmp_path / "base"))


def _both(tmp_path, source, monkeypatch, save_dtype=None):
    monkeypatch.setattr(merging, "MAX_SHARD_SIZE", SHARD)
    args = {"max_ram_gib": 4, "metadata": {"m": 1}, "card": "# card\n", "save_dtype": save_dtype}
    whole = merging.merge(source, str(tmp_path / "adapter"), str(tmp_path / "whole"), stream=False, **args)
    streamed = merging.merge(source, str(tmp_path / "adapter"), str(tmp_path / "stream"), **args)
    return whole, streamed


def _assert_same_folder(a, b):
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        if path.suffix == ".safetensors":
            assert path.read_bytes() == (b / path.name).read_bytes(), path.name  # header and data, bit for bit
        elif path.suffix == ".json":
            assert json.loads(path.read_text()) == json.loads((b / path.name).read_text()), path.name


CASES = [(name, False) for name in tm.FACTORIES] + [("llama", True), ("qwen3", True)]


@streams
@pytest.mark.parametrize(("name", "tied"), CASES, ids=[f"{n}{'-tied' if t else ''}" for n, t in CASES])
def test_streamed_folder_equals_the_whole_model_merge(tmp_path, monkeypatch, name, tied):
    source = _study(tmp_path, tm.FACTORIES[name], tied=tied)
    whole, streamed = _both(tmp_path, source, monkeypatch)
    assert not whole["streamed"]
    # fused MoE experts are stored per expert in the checkpoint: that model falls back to the whole merge
    assert streamed["streamed"] == (name != "moe_fused")
    assert (tmp_path / "stream" / streaming_merge.INDEX).exists()  # sharded, with the index
    _assert_same_folder(tmp_path / "whole", tmp_path / "stream")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if tied:
        assert "lm_head.weight" not in _tensors(tmp_path / "stream")


@streams
@pytest.mark.parametrize("route", ["lora", "direct"])
def test_streamed_merge_carries_two_directions(tmp_path, monkeypatch, route):
    """k = 2: a rank-2 adapter (LoRA) or rank-2 direct edits stream into the same folder as the whole merge."""
    source = _study(tmp_path, tm.tiny_llama, route=route, k=2)
    saved, _ = io.load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors") if route == "lora" else \
        io.load_safetensors(tmp_path / "adapter" / "direct_edits.safetensors")
    assert {t.shape[-1] for name, t in saved.items() if "lora_B" in name} == {2}
    _, streamed = _both(tmp_path, source, monkeypatch)
    assert streamed["streamed"]
    _assert_same_folder(tmp_path / "whole", tmp_path / "stream")


@streams
@pytest.mark.parametrize(("dtype", "save_dtype"), [(torch.bfloat16, None), (torch.float16, torch.float32),
                                                   (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("route", ["lora", "direct"])
def test_streamed_merge_rounds_as_the_whole_model_merge(tmp_path, monkeypatch, dtype, save_dtype, route):
    """Half-precision checkpoints (PEFT upcasts the factors; direct edits round the delta first) and merge.dtype."""
    source = _study(tmp_path, tm.tiny_gpt2 if route == "lora" else tm.tiny_llama, dtype, route=route)
    whole, streamed = _both(tmp_path, source, monkeypatch, save_dtype)
    assert streamed["streamed"] and streamed["saved_dtype"] == whole["saved_dtype"]
    _assert_same_folder(tmp_path / "whole", tmp_path / "stream")


@streams
def test_single_file_when_it_fits_and_ram_estimate(tmp_path):
    source = _study(tmp_path, tm.tiny_llama)
    info = merging.merge(source, str(tmp_path / "adapter"), str(tmp_path / "out"), max_ram_gib=4, metadata={},
                         card="")
    assert info["streamed"]
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    # the fixed overhead plus one tensor's working set, not a multiple of the model
    assert streaming_merge.OVERHEAD_BYTES < info["estimated_ram_bytes"] < streaming_merge.OVERHEAD_BYTES + 2**20


def _mount_tmpfs(path, size):
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")


@pytest.mark.parametrize("stream", [True, False])
def test_full_disk_leaves_no_folder_and_says_so(tmp_path, stream):
    source = _study(tmp_path, tm.tiny_llama)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64k")  # the tiny model's weights are 360 kB
    try:
        out = disk / "merged"
        with pytest.raises(AbliterateError, match="disk filled up while writing the merged model to .*merged"):
            merging.merge(source, str(tmp_path / "adapter"), str(out), max_ram_gib=4, metadata={}, card="",
                          stream=stream)
        assert list(disk.iterdir()) == []  # neither the folder nor its temporary
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@streams
def test_full_disk_error_without_a_tmpfs(tmp_path, monkeypatch):
    """The same error where mounting is not allowed: the shard write fails with ENOSPC."""
    source = _study(tmp_path, tm.tiny_llama)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming_merge, "_write_tensor", full)
    with pytest.raises(AbliterateError, match="disk filled up"):
        merging.merge(source, str(tmp_path / "adapter"), str(tmp_path / "out"), max_ram_gib=4, metadata={}, card="")
    assert not (tmp_path / "out").exists()
    assert not io.remove_stale_temporaries(tmp_path / "out")


@streams
def test_hub_source_reads_the_cache_snapshot_at_its_revision(tmp_path, monkeypatch):
    """A hub id streams from the cache's snapshot at the pinned revision (snapshot_download); the hub is
    unreachable here, so the download is replaced by the folder it would return."""
    source = _study(tmp_path, tm.tiny_llama)
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        return str(tmp_path / "base")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    res = loading.Resolved("owner/tiny", None, "abc123", "hub", "owner/tiny@abc123")
    p = streaming_merge.plan(res, loading.load_config(source), tmp_path / "adapter", torch.float32)
    assert calls == [("owner/tiny", "abc123")] and p.folder == tmp_path / "base" and p.edits


def test_without_the_internals_the_merge_falls_back(tmp_path, monkeypatch):
    def missing():
        raise hf_compat.Unmirrored("transformers 4.x lacks them")

    monkeypatch.setattr(hf_compat, "_saving_internals", missing)
    source = _study(tmp_path, tm.FACTORIES["llama"])
    whole, streamed = _both(tmp_path, source, monkeypatch)
    assert not whole["streamed"] and not streamed["streamed"]
    _assert_same_folder(tmp_path / "whole", tmp_path / "stream")
