"""transformers seams kept in abliterate.hf_compat."""

from __future__ import annotations

import tiny_models
import torch
from abliterate import hf_compat


def test_the_output_layer_gets_contiguous_states_and_the_same_logits():
    model = tiny_models.tiny_llama()
    ids = tiny_models.input_ids(batch=3, seq=7)
    before = model(input_ids=ids, logits_to_keep=1).logits
    given, taken = [], []
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda _m, args: given.append(args[0].is_contiguous()))
    assert hf_compat.contiguous_output_inputs(model)
    assert not hf_compat.contiguous_output_inputs(model)  # once per model
    head.register_forward_hook(lambda _m, args, _out: taken.append(args[0].is_contiguous()))
    after = model(input_ids=ids, logits_to_keep=1).logits
    assert (given, taken) == ([False], [True])  # the slice of the last states, then its copy
    assert torch.equal(before, after)
