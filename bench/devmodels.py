"""Generate small Llama-architecture models locally (tests and benchmarks; no hub access).

A model directory gets ``config.json``, ``generation_config.json``, random
weights as ``model.safetensors`` (bf16) and a byte-level BPE tokenizer trained
on a few sentences. Weights are never committed: callers generate them into a
temporary directory. Used by ``tests/worker`` and the benchmarks beside this file
(imported as a sibling module), and from the command line::

    python bench/devmodels.py OUT_DIR [--layers N] [--hidden N] [--heads N] [--kv-heads N]
                                      [--intermediate N] [--vocab N] [--max-positions N] [--seed N] [--large]

Needs ``torch``, ``safetensors``, ``transformers`` and ``tokenizers`` (the worker's vLLM environment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "warm replicas are promoted to dedicated engines when a burst arrives",
    "one for many prewarming keeps several models on an idle gpu",
    "eviction returns pages to the free list without copying any data",
    "hello world, this is a tiny language model used for tests",
] * 20


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(directory: str, vocab_size: int = 400) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    # a plain chat template, so /v1/chat/completions (and the openai client's chat API) works
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def make_llama(
    directory: str,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 256,
    vocab: int = 512,
    seed: int = 0,
    max_positions: int = 512,
) -> str:
    """Write a random Llama model (bf16 safetensors) into ``directory``; returns it.

    vLLM's CPU attention needs head_dim in {32, 64, 128, ...}; the default is 64.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    os.makedirs(directory, exist_ok=True)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
        bos_token_id=0,
        eos_token_id=1,
    )
    config.save_pretrained(directory)
    with open(os.path.join(directory, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, fh)
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": rnd(vocab, hidden),
        "model.norm.weight": torch.ones(hidden).bfloat16(),
        "lm_head.weight": rnd(vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rnd(intermediate, hidden),
            p + "mlp.up_proj.weight": rnd(intermediate, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(hidden).bfloat16(),
        }
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(directory)
    return directory


#: ≈ 1.1 GB in bf16: big enough that loading dominates a cold start, as on real GPUs.
LARGE = {"hidden": 1536, "layers": 17, "heads": 12, "kv_heads": 4, "intermediate": 4096, "vocab": 32000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="model directory to write (created if missing)")
    parser.add_argument("--large", action="store_true", help="the ~1.1 GB benchmark model (LARGE); flags override")
    defaults = {"hidden": 128, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 256, "vocab": 512}
    for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {defaults[name]}")
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = dict(LARGE if args.large else defaults)
    shape |= {name: getattr(args, name) for name in defaults if getattr(args, name) is not None}
    path = make_llama(args.out_dir, **shape, seed=args.seed, max_positions=args.max_positions)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
