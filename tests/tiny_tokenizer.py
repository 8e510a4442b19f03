"""A byte-level tokenizer with a ChatML chat template, built offline in milliseconds.

Paired with a tiny random Llama it gives a complete model folder (weights, tokenizer, template)
that every rule of the workflow can load, without a download.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

# For tests/tiny_models.py (vocab 128): ids 0, 1, 2 are pad, BOS and EOS there.
CHAR_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAR_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# Merges that make yes/no words single tokens, for a tiny judge (abliterate.judge); "Ġ" is a space.
YES_NO_MERGES = [("y", "e"), ("ye", "s"), ("Y", "e"), ("Ye", "s"), ("n", "o"), ("N", "o"),
                 ("Ġ", "yes"), ("Ġ", "Yes"), ("Ġ", "no"), ("Ġ", "No")]


def tiny_tokenizer(chat_template: str | None = CHATML, merges: list[tuple[str, str]] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        additional_special_tokens=SPECIALS[1:],
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_model_dir(path: Path, seed: int = 0, layers: int = 3, chat_template: str | None = CHATML,
                   merges: list[tuple[str, str]] = ()) -> Path:
    """Save a tiny random LlamaForCausalLM with the byte-level tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(chat_template, merges)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def char_tokenizer():
    """Byte-level tokenizer without merges over printable ASCII: 104 ids, fits the tiny models' 128.

    Ids 0, 1, 2 are pad, BOS and EOS as in ``tiny_models``; the chat template writes BOS itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(288), chr(266)] + [chr(c) for c in range(33, 127)]  # byte-level space, newline
    vocab = {t: i for i, t in enumerate(CHAR_SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=CHAR_SPECIALS[4:],
        chat_template=CHAR_TEMPLATE,
    )
