"""Write a tiny random causal LM and a byte-level tokenizer to a folder, with no network.

For tests and the CPU quick start: any text tokenizes (256 byte tokens plus the
ChatML specials), the chat template is ChatML, and the model (Qwen2 architecture,
about 0.2 M parameters) runs a training step on a laptop core in well under a second.

    python -m recipe.atropos.models.make_tiny_model --out ~/models/tiny-qwen2

``--boxed-answers`` teaches it to end every reply with ``The answer is \\boxed{D}``
(:mod:`.boxed_answers`), for environments that drop groups whose scores are all equal.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def readable_by_transformers_4(config_path: str) -> None:
    """Name the tokenizer as transformers 4 and 5 both load it.

    transformers 5 saves ``tokenizer_class: TokenizersBackend`` and a list of
    ``extra_special_tokens``, which transformers 4 cannot load; an environment running in an
    interpreter of its own with transformers 4 (``services.envs[].python``) loads this tokenizer too.
    """
    with open(config_path) as handle:
        config = json.load(handle)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)


def write_tiny_model(out: str, seed: int = 0, boxed_answers: bool = False) -> str:
    out = os.path.expanduser(out)
    os.makedirs(out, exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(out)
    readable_by_transformers_4(os.path.join(out, "tokenizer_config.json"))
    model = make_model(tokenizer, seed=seed)
    if boxed_answers:
        from .boxed_answers import teach_boxed_answers

        teach_boxed_answers(model, tokenizer, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boxed-answers", action="store_true",
                        help="teach it to end every reply with 'The answer is \\boxed{D}' (a few minutes on CPU)")
    args = parser.parse_args()
    out = write_tiny_model(args.out, seed=args.seed, boxed_answers=args.boxed_answers)
    kind = "boxed-answer" if args.boxed_answers else "random"
    print(f"wrote a tiny {kind} Qwen2 model and byte-level tokenizer to {out}")


if __name__ == "__main__":
    main()
